"""One DeepSpeed training loop for both MASSV phases.

* ``pretrain_projector`` (phase 1): only the projector is trained, on image-caption pairs; the
  small LM is frozen and the target's image features come from the feature cache.
* ``sdvit`` (phase 2, self-distilled visual instruction tuning): projector + small LM are
  fine-tuned on the target's own responses (``generate.py``), loss on the response tokens.

Both phases share everything else: data preparation (``massv_vllm.data.samples``), the feature
cache, ZeRO 0-3 through ``deepspeed.initialize`` with a plain ``torch.optim.AdamW`` (no custom ops
to JIT-compile) and a cosine schedule with warm-up, and exact resume. The sample order is an
endless stream of seeded per-epoch permutations; a step consumes the next ``global batch`` stream
positions, so the checkpoint's position (``consumed``) says exactly where to continue, and the
JSONL log records the sample indices of every step (truncated on resume to the checkpoint step,
so the log of a killed-and-resumed run equals that of an uninterrupted one).

Output folder::

    <out>/train_log.jsonl        events; one "step" line per optimizer step (loss, lr, tokens/s, samples)
    <out>/checkpoints/           DeepSpeed checkpoints (model, optimizer, schedule, RNG, stream position)
    <out>/feature-cache/         target image features (phase 2 reuses phase 1's by default)
    <out>/drafter/               the trained drafter (HF format + provenance.json), vLLM "method": "massv"
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from massv_vllm.data.feature_cache import FeatureCache, FeatureCacheError, image_key
from massv_vllm.data.records import DataError, ReadStats, Record, load_image, read_sources
from massv_vllm.data.samples import (
    RESPONSE_TEXT,
    RESPONSE_TOKEN_IDS,
    Sample,
    SampleBuilder,
    collate,
    sample_digest,
)
from massv_vllm.serving.config import MassvConfigError

PRETRAIN = "pretrain_projector"
SDVIT = "sdvit"
GENERATE = "generate"
SCRIPTS = (PRETRAIN, GENERATE, SDVIT)
RECIPE_INFO_KEYS = ("description", "target", "small_lm", "notes")
LOG_NAME = "train_log.jsonl"
CKPT_DIR = "checkpoints"
COMPLETE_MARK = "massv_complete.json"
GENERATION_META = "generation.json"  # written by generate.py beside its output


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


# ---- recipes & options ------------------------------------------------------------------------
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


# ---- distributed ----------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(local_rank: int | None = None) -> Dist:
    """Join the launcher's process group, or make a one-process group when run with plain python."""
    import deepspeed
    import torch.distributed as td

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank or 0))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local = int(os.environ.get("LOCAL_RANK", local_rank or 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not td.is_initialized():
        deepspeed.init_distributed(verbose=False)
    return Dist(td.get_rank(), td.get_world_size(), local, device)


def barrier(dist: Dist) -> None:
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()


def all_sum(values: list[float], dist: Dist) -> list[float]:
    if dist.world == 1:
        return values
    import torch.distributed as td

    t = torch.tensor(values, dtype=torch.float64, device=dist.device)
    td.all_reduce(t)
    return t.tolist()


# ---- start-up checks ------------------------------------------------------------------------------
def check_writable(out: Path) -> None:
    """Fail fast (before any heavy work) when ``out`` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise TrainingError(f"output folder {out} is not writable: {e}") from e


def check_free_space(out: Path, need_bytes: float, what: str, override_gb: float | None) -> None:
    need = need_bytes if override_gb is None else override_gb * 1e9
    what = what if override_gb is None else "--min-free-gb"
    free = shutil.disk_usage(out).free
    if free < need:
        raise TrainingError(
            f"not enough free disk space in {out}: {free / 1e9:.2f} GB free, about {need / 1e9:.2f} GB "
            f"needed ({what}). Free some space, lower --keep-checkpoints, or set --min-free-gb."
        )


# ---- model ----------------------------------------------------------------------------------------
def select_trainable(model: Any, phase: str, args: argparse.Namespace) -> list[str]:
    """Set requires_grad for the phase; returns the trainable parameter names."""
    model.requires_grad_(False)
    if phase == PRETRAIN:
        if model.projector is None:
            raise TrainingError(
                f"drafter {args.drafter} is text-only (no projector): phase 1 trains only the projector. "
                "Train a text-only drafter with sdvit.py on text-only data instead."
            )
        model.projector.requires_grad_(True)
    else:
        if not args.freeze_lm:
            model.base.requires_grad_(True)
            if args.freeze_embeddings:
                model.base.get_input_embeddings().requires_grad_(False)
        if model.projector is not None and not args.freeze_projector:
            model.projector.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise TrainingError("nothing to train: every parameter is frozen (check the --freeze-* options)")
    return names


def make_optimizer(model: Any, args: argparse.Namespace) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, args.adam_beta2), eps=1e-8)


def cosine_with_warmup(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def deepspeed_config(
    path: str | None, *, micro: int, accum: int, world: int, bf16: bool, grad_clip: float
) -> dict[str, Any]:
    """The DeepSpeed config file with batch sizes, precision and clipping filled from the CLI."""
    if path is None:
        cfg: dict[str, Any] = {"zero_optimization": {"stage": 0}}
    else:
        try:
            cfg = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainingError(f"DeepSpeed config {path}: {e}") from e
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise TrainingError(
                f"DeepSpeed config {path} sets '{key}': the trainer builds AdamW and the cosine schedule "
                "itself; set them with --lr/--warmup-steps/--weight-decay instead"
            )
    if cfg.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise TrainingError(f"DeepSpeed config {path}: fp16 is not supported, use bf16 (--dtype bf16)")
    cfg["fp16"] = {"enabled": False}

    def fill(key: str, value: Any, flag: str) -> None:
        have = cfg.get(key, "auto")
        if have not in ("auto", value):
            raise TrainingError(f"DeepSpeed config {path} sets {key}={have!r} but {flag} gives {value!r}")
        cfg[key] = value

    fill("train_micro_batch_size_per_gpu", micro, "--micro-batch-size")
    fill("gradient_accumulation_steps", accum, "--global-batch-size / (--micro-batch-size x GPUs)")
    fill("train_batch_size", micro * accum * world, "--global-batch-size")
    fill("gradient_clipping", grad_clip, "--max-grad-norm")
    b = cfg.get("bf16", {})
    if b.get("enabled", "auto") not in ("auto", bf16):
        raise TrainingError(
            f"DeepSpeed config {path} sets bf16.enabled={b['enabled']} but --dtype gives {bf16}"
        )
    cfg["bf16"] = {**b, "enabled": bf16}
    cfg.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW under ZeRO is fine
    cfg.setdefault("steps_per_print", 10**9)  # progress is ours
    return cfg


# ---- features -------------------------------------------------------------------------------------
def _target_dtype(target: Path) -> torch.dtype:
    raw = json.loads((target / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype") or raw.get("text_config", {}).get("dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


class FeatureSource:
    """Target image features for training: from the cache, computed by the target on a miss.

    During data preparation ``add`` queues every image whose features are missing (on several GPUs
    each rank computes its share of keys); ``get`` serves training and recomputes an entry whose
    shard proved corrupt, when its image file is still at hand.
    """

    def __init__(
        self,
        cache: FeatureCache,
        target: Path,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
        dist: Dist,
    ):
        self.cache = cache
        self.target = target
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.dist = dist
        self._encoder = None
        self._queue: dict[str, Any] = {}
        self._paths: dict[str, Any] = {}
        self._shared = cache.dir is not None  # ranks split the work only through a disk cache

    def _enc(self):
        if self._encoder is None:
            from massv_vllm.target_features import TargetEncoder

            self._encoder = TargetEncoder(self.target, device=self.device, dtype=self.dtype)
        return self._encoder

    def _mine(self, key: str) -> bool:
        return (
            not self._shared or self.dist.world == 1 or int(key[:8], 16) % self.dist.world == self.dist.rank
        )

    def add(self, key: str, image: Any, src: Any) -> None:
        if isinstance(src, (str, Path)):
            self._paths[key] = src
        if key in self.cache or key in self._queue or not self._mine(key):
            return
        self._queue[key] = image
        if len(self._queue) >= self.batch_size:
            self._compute()

    def _compute(self) -> None:
        if not self._queue:
            return
        keys = list(self._queue)
        feats = self._enc().image_features([self._queue[k] for k in keys])
        try:
            for k, f in zip(keys, feats):
                self.cache.put(k, f.to(self.dtype))
        except OSError as e:
            raise FeatureCacheError(f"cannot write the feature cache in {self.cache.dir}: {e}") from e
        self._queue.clear()

    def finish(self, keys: set[str]) -> None:
        """Compute what is queued, publish it and check every needed key is available."""
        self._compute()
        try:
            self.cache.flush()
        except OSError as e:
            raise FeatureCacheError(f"cannot write the feature cache in {self.cache.dir}: {e}") from e
        barrier(self.dist)
        if self.dist.world > 1:
            self.cache.reload()
        missing = [k for k in keys if k not in self.cache]
        if missing:
            raise FeatureCacheError(
                f"{len(missing)} image features missing from {self.cache.dir} after preparation"
            )
        self.release_encoder()

    def release_encoder(self) -> None:
        if self._encoder is not None:
            self._encoder = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def get(self, key: str) -> torch.Tensor:
        t = self.cache.get(key)
        if t is not None:
            return t
        src = self._paths.get(key)
        if src is None:
            raise FeatureCacheError(
                f"cached features of image {key[:12]} were corrupt and removed, and the image is not a file "
                "that can be re-read now; restart the run with --resume to rebuild them"
            )
        image = load_image(src)
        if image_key(image) != key:
            raise FeatureCacheError(f"image {src} changed on disk since data preparation")
        feats = self._enc().image_features([image])[0].to(self.dtype)
        self.cache.put(key, feats)
        self.cache.flush()
        return feats


# ---- data -----------------------------------------------------------------------------------------
def default_image_root(data: Path, image_root: str | None) -> str | None:
    """``--image-root``, else the root recorded by generate.py beside the data, else None."""
    if image_root is not None:
        return image_root
    meta = data.parent / GENERATION_META
    if data.suffix in (".json", ".jsonl") and meta.is_file():
        root = json.loads(meta.read_text()).get("image_root")
        if root:
            return str((data.parent / root).resolve()) if not Path(root).is_absolute() else root
    return None


def iter_records(args: argparse.Namespace, stats: ReadStats) -> Iterator[Record]:
    hf = dict(
        image_column=args.image_column,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        id_column=args.id_column,
        split=args.split,
    )
    for rec, _ in read_sources(args.data, lambda p: default_image_root(p, args.image_root), stats, **hf):
        yield rec


def prepare_samples(
    records: Iterator[Record],
    builder: SampleBuilder,
    features: FeatureSource | None,
    *,
    max_samples: int | None = None,
    progress: bool = False,
) -> list[Sample]:
    """Build every sample (skip-and-count) and queue missing image features for computation."""
    from tqdm import tqdm

    samples: list[Sample] = []
    keys: set[str] = set()
    bar = tqdm(desc="preparing data", unit="rec", disable=not progress, mininterval=2)
    for index, rec in enumerate(records):
        if max_samples is not None and index >= max_samples:
            break
        bar.update()
        built = builder.build(index, rec)
        if built is None:
            continue
        sample, images = built
        if features is not None:
            for key, img, src in zip(sample.image_keys, images, rec.images):
                features.add(key, img, src)
                keys.add(key)
        samples.append(sample)
    bar.close()
    if features is not None:
        features.finish(keys)
    return samples


class SampleStream:
    """Endless sample order: epoch e is a permutation seeded by (seed, e). Position p of the stream
    is sample ``perm(p // n)[p % n]``; a run's progress is the number of positions consumed."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self._epoch = -1
        self._perm: list[int] = []

    def _permutation(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.n, generator=g).tolist()
            self._epoch = epoch
        return self._perm

    def take(self, start: int, count: int) -> list[int]:
        out = []
        for pos in range(start, start + count):
            epoch, off = divmod(pos, self.n)
            out.append(self._permutation(epoch)[off])
        return out


# ---- checkpoint & log -----------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    import numpy as np

    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    return s


def _set_rng_state(s: dict[str, Any]) -> None:
    import numpy as np

    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def complete_tags(ckpt_root: Path) -> list[str]:
    """Checkpoints whose every rank finished writing (they carry COMPLETE_MARK), oldest first."""
    return sorted(p.name for p in ckpt_root.glob("step-*") if (p / COMPLETE_MARK).is_file())


def latest_tag(ckpt_root: Path) -> str | None:
    """The newest complete checkpoint. DeepSpeed's own ``latest`` file is not trusted: it is
    written in place, so a kill at the wrong moment leaves it empty."""
    tags = complete_tags(ckpt_root)
    return tags[-1] if tags else None


class JsonlLog:
    """The run's JSONL log (rank 0 writes). On resume, step lines past the checkpoint are dropped."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by the kill
            if rec.get("event") in ("step", "checkpoint") and rec.get("step", 0) > step:
                continue
            keep.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        tmp.replace(self.path)

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str) + "\n")
            f.flush()


def read_log(path: str | Path, event: str = "step") -> list[dict[str, Any]]:
    """The ``event`` lines of a training log, in order."""
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == event:
            out.append(rec)
    return out


# ---- the loop -------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    drafter: Path
    steps: int
    final_loss: float | None
    samples: int
    stats: ReadStats


def _say(dist: Dist, msg: str) -> None:
    if dist.main:
        print(f"[massv] {msg}", file=sys.stderr, flush=True)


def train(
    args: argparse.Namespace, phase: str, *, on_step: Callable[[int, dict[str, Any]], None] | None = None
) -> TrainResult:
    """Run one phase as configured by ``args`` (``build_parser(phase)``).

    ``on_step(step, log_record)`` is called after every optimizer step (tests use it to stop a run
    at an exact point, as a kill would).
    """
    out = Path(args.out)
    check_writable(out)  # before anything slow
    dist = setup_distributed(args.local_rank)
    ckpt_root = out / CKPT_DIR
    if latest_tag(ckpt_root) is not None and not args.resume:
        raise TrainingError(
            f"{out} already holds checkpoints: pass --resume to continue, or choose another --out"
        )
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and dist.device.type == "cuda")
    model, exclude_frozen = _load_model(args, phase, dist, bf16, out)
    data = _prepare_data(args, phase, model, dist, out)
    engine, geo, ds_cfg = _make_engine(args, model, data, dist, bf16)
    log = JsonlLog(out / LOG_NAME, dist.main)
    run = _Run(args, phase, dist, engine, data, geo, log, ckpt_root, exclude_frozen)
    run.resume_or_start()
    run.loop(on_step)
    drafter = _save_drafter(args, phase, dist, engine, data, ds_cfg, run, out)
    barrier(dist)
    return TrainResult(drafter, run.step, run.last_loss, len(data.samples), data.stats)


def _load_model(args: argparse.Namespace, phase: str, dist: Dist, bf16: bool, out: Path) -> tuple[Any, bool]:
    """The input drafter with the phase's parameters trainable; checks disk space for the run."""
    from massv_vllm.modeling import MassvDrafter

    if bf16 and dist.device.type == "cpu":
        _say(dist, "warning: bf16 on CPU is slow; --dtype fp32 is the CPU default")
    model = MassvDrafter.from_pretrained(args.drafter, dtype=torch.float32)
    trainable = select_trainable(model, phase, args)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    exclude_frozen = n_train < n_params  # frozen weights come from the input drafter on resume
    elt = 2 if bf16 else 4
    ckpt_bytes = (n_train if exclude_frozen else n_params) * elt + n_train * 12  # + fp32 master, Adam m/v
    check_free_space(
        out,
        (args.keep_checkpoints + 1) * ckpt_bytes + n_params * elt + 0.5e9,
        f"{args.keep_checkpoints}+1 checkpoints of {ckpt_bytes / 1e9:.2f} GB and the final drafter",
        args.min_free_gb,
    )
    _say(dist, f"{phase}: {n_train:,} of {n_params:,} parameters trainable ({len(trainable)} tensors)")
    return model, exclude_frozen


@dataclass
class _Data:
    samples: list[Sample]
    stats: ReadStats
    digest: str
    features: FeatureSource | None
    cache_dir: Path | None
    pad_id: int


def _prepare_data(args: argparse.Namespace, phase: str, model: Any, dist: Dist, out: Path) -> _Data:
    from massv_vllm.target_features import TargetEncoder

    target = Path(args.target)
    # Features as vLLM computes them: in the target's dtype on GPU (fp32 on CPU).
    feature_dtype = _target_dtype(target) if dist.device.type == "cuda" else torch.float32
    encoder = TargetEncoder(target, dtype=feature_dtype, load_vision=False)
    read_stats, build_stats = ReadStats(), ReadStats()
    response = RESPONSE_TEXT if phase == PRETRAIN else RESPONSE_TOKEN_IDS
    builder = SampleBuilder(encoder, max_len=args.max_len, response=response, stats=build_stats)
    progress = dist.main and not args.no_progress
    features, cache_dir = None, None
    if model.projector is not None:  # text-only drafters never look at image features
        cache_dir = None if args.no_feature_cache else Path(args.feature_cache or _default_cache(args, out))
        cache = FeatureCache(cache_dir, encoder.fingerprint(), writer=f"r{dist.rank}-{os.getpid()}")
        features = FeatureSource(cache, target, dist.device, feature_dtype, args.feature_batch_size, dist)
    samples = prepare_samples(
        iter_records(args, read_stats), builder, features, max_samples=args.max_samples, progress=progress
    )
    stats = ReadStats(
        seen=read_stats.seen, kept=len(samples), skipped=read_stats.skipped + build_stats.skipped
    )
    _say(dist, f"data: {stats.summary()}")
    if features is not None:
        _say(dist, features.cache.stats.summary() + (f" ({cache_dir})" if cache_dir else " (in memory)"))
    if not samples:
        hint = (
            ""
            if phase == PRETRAIN
            else " (phase 2 needs generate.py output: records with response_token_ids)"
        )
        raise TrainingError(f"no usable samples in {args.data}: {stats.summary()}{hint}")
    pad = encoder.tokenizer.pad_token_id
    return _Data(samples, stats, sample_digest(samples), features, cache_dir, 0 if pad is None else pad)


@dataclass
class _Geometry:
    micro: int
    accum: int
    world: int
    global_batch: int
    max_steps: int


def _make_engine(args: argparse.Namespace, model: Any, data: _Data, dist: Dist, bf16: bool):
    import deepspeed

    micro, world = args.micro_batch_size, dist.world
    if args.global_batch_size % (micro * world):
        raise TrainingError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size {micro} "
            f"x {world} GPU(s)"
        )
    accum = args.global_batch_size // (micro * world)
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * len(data.samples) / args.global_batch_size))
    geo = _Geometry(micro, accum, world, args.global_batch_size, max_steps)
    warmup = args.warmup_steps if args.warmup_steps is not None else int(args.warmup_ratio * max_steps)
    ds_cfg = deepspeed_config(
        args.deepspeed_config, micro=micro, accum=accum, world=world, bf16=bf16, grad_clip=args.max_grad_norm
    )
    optimizer = make_optimizer(model, args)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(warmup, max_steps, args.min_lr_ratio)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_cfg
    )
    return engine, geo, ds_cfg


class _Run:
    """Loop state: step, stream position, checkpoints and the log."""

    def __init__(self, args, phase, dist, engine, data, geo, log, ckpt_root, exclude_frozen):
        self.args, self.phase, self.dist, self.engine = args, phase, dist, engine
        self.data, self.geo, self.log, self.ckpt_root = data, geo, log, ckpt_root
        self.exclude_frozen = exclude_frozen
        self.step = 0
        self.consumed = 0  # stream positions used: the exact place to continue
        self.last_loss: float | None = None

    def client_state(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "step": self.step,
            "consumed": self.consumed,
            "samples_digest": self.data.digest,
            "global_batch_size": self.geo.global_batch,
            "seed": self.args.seed,
        }

    def resume_or_start(self) -> None:
        tag = latest_tag(self.ckpt_root) if self.args.resume else None
        if tag is None:
            if self.args.resume:
                _say(self.dist, f"--resume: no checkpoint in {self.ckpt_root}, starting from scratch")
            if self.dist.main and self.log.path.is_file():
                self.log.path.unlink()  # an earlier attempt died before its first checkpoint
            self.log.write(
                "start", phase=self.phase, args=vars(self.args), world_size=self.geo.world,
                samples=len(self.data.samples), max_steps=self.geo.max_steps, data=self.data.stats.to_dict(),
                samples_digest=self.data.digest,
            )  # fmt: skip
            return
        _, state = self.engine.load_checkpoint(
            str(self.ckpt_root), tag=tag, load_module_strict=not self.exclude_frozen,
            load_optimizer_states=True, load_lr_scheduler_states=True,
        )  # fmt: skip
        if state is None:
            raise TrainingError(f"checkpoint {self.ckpt_root / tag} could not be loaded")
        problems = []
        if state["samples_digest"] != self.data.digest:
            problems.append(
                "the prepared data differ (data files, --max-len, --max-samples or target changed)"
            )
        if state["global_batch_size"] != self.geo.global_batch:
            problems.append(
                f"--global-batch-size was {state['global_batch_size']}, now {self.geo.global_batch}"
            )
        if state["phase"] != self.phase or state["seed"] != self.args.seed:
            problems.append(f"the checkpoint is from phase {state['phase']} with --seed {state['seed']}")
        if problems:
            raise TrainingError(f"cannot resume from {self.ckpt_root / tag}: " + "; ".join(problems))
        self.step, self.consumed = state["step"], state["consumed"]
        rng = self.ckpt_root / tag / f"rng-rank{self.dist.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        self.log.truncate_after(self.step)
        self.log.write("resume", step=self.step, consumed=self.consumed, checkpoint=tag)
        _say(self.dist, f"resumed from {tag}: step {self.step}, {self.consumed} samples consumed")

    def save(self) -> None:
        tag = f"step-{self.step:07d}"
        try:
            (self.ckpt_root / tag).mkdir(parents=True, exist_ok=True)
            torch.save(_rng_state(), self.ckpt_root / tag / f"rng-rank{self.dist.rank}.pt")
            # The checkpoint counts once COMPLETE_MARK is written after this (and every rank's
            # files); a kill mid-save leaves the previous one as what --resume uses.
            self.engine.save_checkpoint(
                str(self.ckpt_root), tag=tag, client_state=self.client_state(),
                exclude_frozen_parameters=self.exclude_frozen,
            )  # fmt: skip
        except OSError as e:
            raise TrainingError(f"cannot write checkpoint {self.ckpt_root / tag}: {e}") from e
        barrier(self.dist)  # every rank's shard is on disk
        if self.dist.main:
            mark = self.ckpt_root / tag / COMPLETE_MARK
            tmp = mark.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.client_state()))
            tmp.replace(mark)
            _prune_checkpoints(self.ckpt_root, self.args.keep_checkpoints, tag)
        barrier(self.dist)
        self.log.write("checkpoint", step=self.step, tag=tag, consumed=self.consumed)

    def loop(self, on_step: Callable[[int, dict[str, Any]], None] | None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        args, geo, dist, engine, data = self.args, self.geo, self.dist, self.engine, self.data
        engine.train()
        bar = tqdm(
            total=geo.max_steps, initial=self.step, desc=self.phase, unit="step",
            disable=not dist.main or args.no_progress, dynamic_ncols=True,
        )  # fmt: skip
        # One step of look-ahead: the next step's batches (cache reads, collation) are built on a
        # worker thread while this step runs on the device. Only that thread touches the cache.
        pool = ThreadPoolExecutor(1, thread_name_prefix="massv-batches")
        stream = SampleStream(len(data.samples), args.seed)
        ahead = pool.submit(self._host_step, stream, self.consumed)
        try:
            while self.step < geo.max_steps:
                t0 = time.perf_counter()
                order, batches = ahead.result()
                if self.step + 1 < geo.max_steps:
                    ahead = pool.submit(self._host_step, stream, self.consumed + geo.global_batch)
                rec = self._step(order, batches, t0)
                bar.update()
                if self.step % args.log_every == 0 or self.step == geo.max_steps:
                    bar.set_postfix(
                        loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}"
                    )
                if self.step % args.save_every == 0 or self.step == geo.max_steps:
                    self.save()
                if on_step is not None:
                    on_step(self.step, rec)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()

    def _host_step(self, stream: SampleStream, consumed: int) -> tuple[list[int], list[Any]]:
        """Stream positions ``consumed..+global batch`` and this rank's micro-batches (host memory)."""
        geo, data = self.geo, self.data
        order = stream.take(consumed, geo.global_batch)
        batches = []
        for m in range(geo.accum):
            lo = (m * geo.world + self.dist.rank) * geo.micro  # micro-batch m of this rank
            samples = [data.samples[i] for i in order[lo : lo + geo.micro]]
            feats = None
            if data.features is not None:
                feats = [[data.features.get(k) for k in s.image_keys] for s in samples]
            batch = collate(samples, feats, data.pad_id)
            batches.append(batch.pin_memory() if self.engine.device.type == "cuda" else batch)
        return order, batches

    def _step(self, order: list[int], batches: list[Any], t0: float) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns (and logs) its record."""
        geo, dist, engine, data = self.geo, self.dist, self.engine, self.data
        lr = engine.get_lr()[0]  # the rate this step uses (the schedule advances in engine.step)
        loss_sum = loss_tokens = tokens = 0.0
        for host in batches:
            batch = host.to(engine.device)
            out = engine(
                input_ids=batch.input_ids, image_embeds=batch.image_embeds,
                attention_mask=batch.attention_mask, labels=batch.labels,
            )  # fmt: skip
            engine.backward(out.loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum += float(out.loss.detach()) * out.num_loss_tokens
            loss_tokens += out.num_loss_tokens
            tokens += batch.num_tokens
        loss_sum, loss_tokens, tokens = all_sum([loss_sum, loss_tokens, tokens], dist)
        self.step += 1
        self.consumed += geo.global_batch
        dt = time.perf_counter() - t0
        self.last_loss = loss_sum / max(loss_tokens, 1)
        grad_norm = engine.get_global_grad_norm()
        rec = {
            "step": self.step,
            "epoch": (self.consumed - geo.global_batch) // len(data.samples),
            "loss": self.last_loss,
            "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "tokens": int(tokens),
            "loss_tokens": int(loss_tokens),
            "tokens_per_s": tokens / dt,
            "consumed": self.consumed,
            "samples": [data.samples[i].index for i in order],  # proves no sample lost or repeated
        }
        self.log.write("step", **rec)
        return rec


def _save_drafter(args, phase, dist, engine, data, ds_cfg, run: _Run, out: Path) -> Path:
    """The final HF-format drafter folder (+ provenance.json) under ``<out>/drafter``."""
    import deepspeed

    from massv_vllm.provenance import file_hash, write_provenance

    drafter_out = out / "drafter"
    module = engine.module
    module.base.config.dtype = next(module.parameters()).dtype  # what the weights are saved in
    if ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if dist.main:
                module.save_pretrained(drafter_out, tokenizer_from=args.drafter)
    elif dist.main:
        module.save_pretrained(drafter_out, tokenizer_from=args.drafter)
    if not dist.main:
        return drafter_out
    data_files = sorted(f for d in args.data for f in _data_files(Path(d)))
    write_provenance(
        drafter_out,
        kind=phase,
        inputs={
            "drafter": str(args.drafter),
            "target": str(args.target),
            "data": [str(d) for d in args.data],
        },
        extra={
            "data_hash": file_hash(data_files),
            "samples_digest": data.digest,
            "data_stats": data.stats.to_dict(),
            "steps": run.step,
            "final_loss": run.last_loss,
            "world_size": dist.world,
            "feature_cache": str(data.cache_dir.resolve()) if data.cache_dir else None,
            "options": vars(args),
            "deepspeed_config": ds_cfg,
        },
    )
    run.log.write(
        "end", step=run.step, loss=run.last_loss, drafter=str(drafter_out), data=data.stats.to_dict()
    )
    loss = "n/a" if run.last_loss is None else f"{run.last_loss:.4f}"
    _say(dist, f"done: {run.step} steps, loss {loss}; data {data.stats.summary()}; drafter in {drafter_out}")
    if data.features is not None:
        _say(dist, data.features.cache.stats.summary())
    return drafter_out


def _default_cache(args: argparse.Namespace, out: Path) -> Path:
    """Phase 2 reuses the cache phase 1 recorded in its drafter's provenance (same target)."""
    prov = Path(args.drafter) / "provenance.json"
    if prov.is_file():
        try:
            recorded = json.loads(prov.read_text()).get("feature_cache")
        except json.JSONDecodeError:
            recorded = None
        if recorded and Path(recorded).is_dir():
            return Path(recorded)
    return out / "feature-cache"


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file()]


def _prune_checkpoints(root: Path, keep: int, current: str) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and torn ones (killed mid-save)."""
    keep_tags = set(complete_tags(root)[-max(keep, 1) :]) | {current}
    for p in root.glob("step-*"):
        if p.is_dir() and p.name not in keep_tags and p.name < current:
            shutil.rmtree(p, ignore_errors=True)


def main(phase: str, argv: list[str] | None = None) -> None:
    """CLI entry point of ``train/pretrain_projector.py`` and ``train/sdvit.py``."""
    parser = build_parser(phase)
    args = parse_args_with_recipe(parser, phase, argv)
    try:
        train(args, phase)
    except (TrainingError, DataError, FeatureCacheError, MassvConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
