"""The phases, their command-line options and recipe files (``train/recipes/*.json``).

A recipe holds one section per script (``pretrain_projector``, ``generate``, ``sdvit``) whose keys
are that script's options, checked and converted as argparse would; options given on the command
line override it. ``TrainingError`` is what every training-side step raises for a run that cannot
start or continue.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PRETRAIN = "pretrain_projector"
SDVIT = "sdvit"
GENERATE = "generate"
SCRIPTS = (PRETRAIN, GENERATE, SDVIT)
RECIPE_INFO_KEYS = ("description", "target", "small_lm", "notes")


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


def recipe_keys(parser: argparse.ArgumentParser) -> set[str]:
    """Options a recipe may set: every optional option except paths that must come from the CLI."""
    skip = {"help", "recipe", "local_rank"}
    return {a.dest for a in parser._actions if a.dest not in skip and not a.required}


def load_recipe(path: str | Path, script: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The ``script`` section of a recipe file, validated against ``parser``'s options."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TrainingError(f"recipe {p}: cannot read it: {e}") from e
    if not isinstance(raw, dict):
        raise TrainingError(f"recipe {p}: expected a JSON object")
    problems = [f"unknown top-level key {k!r}" for k in raw if k not in (*SCRIPTS, *RECIPE_INFO_KEYS)]
    section = raw.get(script, {})
    if not isinstance(section, dict):
        problems.append(f"section {script!r} must be an object")
        section = {}
    valid = recipe_keys(parser)
    actions = {a.dest: a for a in parser._actions}
    out = {}
    for k, v in section.items():
        if k not in valid:
            problems.append(f"{script}.{k} is not an option of {script} (valid: {sorted(valid)})")
            continue
        try:
            out[k] = _recipe_value(actions[k], v)
        except (TypeError, ValueError) as e:
            problems.append(f"{script}.{k}={v!r}: {e}")
    if problems:
        raise TrainingError(f"recipe {p}:\n" + "\n".join(f"  - {x}" for x in problems))
    return out


def _recipe_value(action: argparse.Action, value: Any) -> Any:
    """``value`` checked and converted as argparse would treat it on the command line."""
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    convert = action.type or str
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            raise TypeError("expected a list")
        return [convert(str(v)) for v in value]
    if value is not None:
        value = convert(str(value))
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"not one of {list(action.choices)}")
    return value


def parse_args_with_recipe(
    parser: argparse.ArgumentParser, script: str, argv: list[str] | None = None
) -> argparse.Namespace:
    """Parse ``argv``; a ``--recipe FILE`` supplies defaults, explicit options override them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe")
    known, _ = pre.parse_known_args(argv)
    if known.recipe:
        try:
            parser.set_defaults(**load_recipe(known.recipe, script, parser))
        except TrainingError as e:
            parser.error(str(e))
    return parser.parse_args(argv)


def build_parser(phase: str) -> argparse.ArgumentParser:
    if phase not in (PRETRAIN, SDVIT):
        raise ValueError(f"unknown phase {phase!r}")
    first = phase == PRETRAIN
    p = argparse.ArgumentParser(
        prog=f"{phase}.py",
        description=(
            "Phase 1: train the MASSV projector on image-caption pairs."
            if first
            else "Phase 2 (SDViT): fine-tune projector + small LM on the target's own responses."
        ),
    )
    p.add_argument("--recipe", help="JSON recipe (train/recipes/) supplying defaults for these options")
    g = p.add_argument_group("models and output")
    g.add_argument(
        "--drafter", required=True, help="input drafter folder (massv-build-drafter / phase 1 output)"
    )
    g.add_argument(
        "--target", required=True, help="target VLM folder (for its chat template and image features)"
    )
    g.add_argument("--out", required=True, help="output folder (checkpoints, log, drafter/)")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="LLaVA JSON/JSONL file(s) or HF datasets (save_to_disk folder, parquet, imagefolder)"
        + ("" if first else "; normally generate.py's generated.jsonl"),
    )
    g.add_argument("--image-root", help="root of LLaVA image paths (default: beside the data file)")
    g.add_argument("--image-column", default="image", help="HF datasets: image column")
    g.add_argument("--prompt-column", default="prompt", help="HF datasets: instruction column")
    g.add_argument("--response-column", default="response", help="HF datasets: response/caption column")
    g.add_argument("--id-column", default=None, help="HF datasets: id column")
    g.add_argument("--split", default="train", help="HF datasets: split")
    g.add_argument("--max-len", type=int, default=2048, help="skip samples longer than this (tokens)")
    g.add_argument("--max-samples", type=int, default=None, help="use only the first N records")
    g = p.add_argument_group("optimisation")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="used when --max-steps is not given")
    g.add_argument("--global-batch-size", type=int, default=32, help="samples per optimizer step (all GPUs)")
    g.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward pass per GPU")
    g.add_argument("--lr", type=float, default=1e-3 if first else 2e-5)
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: --warmup-ratio x steps")
    g.add_argument("--warmup-ratio", type=float, default=0.03)
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--dtype", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 on GPU, fp32 on CPU"
    )
    if not first:
        g.add_argument("--freeze-lm", action="store_true", help="train only the projector")
        g.add_argument("--freeze-projector", action="store_true", help="keep the phase-1 projector fixed")
        g.add_argument(
            "--freeze-embeddings",
            action="store_true",
            help="freeze the input embeddings (and a tied lm_head)",
        )
    g = p.add_argument_group("parallel drafting (training/parallel.py)")
    g.add_argument(
        "--parallel-draft-tokens",
        type=int,
        default=0,
        metavar="GAMMA",
        help="also train the drafter to propose GAMMA tokens in one forward (vLLM parallel_drafting); "
        "0: off. Use the same value in phase 1 and SDViT",
    )
    g.add_argument(
        "--parallel-anchors", type=int, default=4, help="masked sequences per sample for that loss"
    )
    g = p.add_argument_group("DeepSpeed, checkpoints, logging")
    g.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        dest="deepspeed_config",
        default=None,
        help="DeepSpeed JSON (train/configs/zero{0,1,2,3}.json); default ZeRO-0",
    )
    g.add_argument(
        "--local_rank",
        "--local-rank",
        dest="local_rank",
        type=int,
        default=None,
        help="set by the deepspeed launcher",
    )
    g.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    g.add_argument("--keep-checkpoints", type=int, default=2)
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    g.add_argument("--log-every", type=int, default=10, help="progress-bar update interval (steps)")
    g.add_argument(
        "--min-free-gb", type=float, default=None, help="free disk required at start (default: estimate)"
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = p.add_argument_group("target image features")
    g.add_argument(
        "--feature-cache",
        default=None,
        help="feature cache folder (default: the input drafter's, else <out>/feature-cache)",
    )
    g.add_argument("--no-feature-cache", action="store_true", help="keep features in memory only")
    g.add_argument("--feature-batch-size", type=int, default=16, help="images per target vision forward")
    return p
