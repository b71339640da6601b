"""One DeepSpeed training loop for both MASSV phases.

* ``pretrain_projector`` (phase 1): only the projector is trained, on image-caption pairs; the
  small LM is frozen and the target's image features come from the feature cache.
* ``sdvit`` (phase 2, self-distilled visual instruction tuning): projector + small LM are
  fine-tuned on the target's own responses (``generate.py``), loss on the response tokens.

Both phases share everything else: data preparation (``prepare``), the feature
cache, ZeRO 0-3 through ``deepspeed.initialize`` with a plain ``torch.optim.AdamW`` (no custom ops
to JIT-compile) and a cosine schedule with warm-up, and exact resume (``loop``).

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
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from massv_vllm.serving.config import MassvConfigError
from massv_vllm.training.data.feature_cache import FeatureCacheError
from massv_vllm.training.data.records import DataError, ReadStats
from massv_vllm.training.distributed import Dist, barrier, say, setup_distributed
from massv_vllm.training.loop import CKPT_DIR, LOG_NAME, Geometry, JsonlLog, Run, latest_tag
from massv_vllm.training.prepare import PreparedData, prepare_data
from massv_vllm.training.recipes import PRETRAIN, TrainingError, build_parser, parse_args_with_recipe
from massv_vllm.training.schedule import cosine_with_warmup


@dataclass
class TrainResult:
    drafter: Path
    steps: int
    final_loss: float | None
    samples: int
    stats: ReadStats


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
    data = prepare_data(args, phase, model, dist, out)
    engine, geo, ds_cfg = _make_engine(args, model, data, dist, bf16)
    log = JsonlLog(out / LOG_NAME, dist.main)
    run = Run(args, phase, dist, engine, data, geo, log, ckpt_root, exclude_frozen)
    run.resume_or_start()
    run.loop(on_step)
    drafter = _save_drafter(args, phase, dist, engine, data, ds_cfg, run, out)
    barrier(dist)
    return TrainResult(drafter, run.step, run.last_loss, len(data.samples), data.stats)


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
    if getattr(args, "parallel_draft_tokens", 0) and model.mask_embed is not None:
        model.mask_embed.requires_grad_(True)  # the mask token's embedding learns in both phases
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


def _load_model(args: argparse.Namespace, phase: str, dist: Dist, bf16: bool, out: Path) -> tuple[Any, bool]:
    """The input drafter with the phase's parameters trainable; checks disk space for the run."""
    from massv_vllm.training.modeling import MassvDrafter

    if bf16 and dist.device.type == "cpu":
        say(dist, "warning: bf16 on CPU is slow; --dtype fp32 is the CPU default")
    model = MassvDrafter.from_pretrained(args.drafter, dtype=torch.float32)
    if getattr(args, "parallel_draft_tokens", 0):
        from massv_vllm.families import parallel_mask_token_id

        if args.parallel_draft_tokens < 2 or args.parallel_anchors < 1:
            raise TrainingError("--parallel-draft-tokens must be >= 2 and --parallel-anchors >= 1")
        if model.mask_token_id is None:  # first parallel phase: take a padding row
            m = model.massv
            model.enable_parallel_drafting(
                parallel_mask_token_id(m.base_vocab_size, m.target.vocab_size, m.target.image_token_id)
            )
        say(dist, f"parallel drafting: γ={args.parallel_draft_tokens}, mask token {model.mask_token_id}")
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
    say(dist, f"{phase}: {n_train:,} of {n_params:,} parameters trainable ({len(trainable)} tensors)")
    return model, exclude_frozen


def _make_engine(args: argparse.Namespace, model: Any, data: PreparedData, dist: Dist, bf16: bool):
    import deepspeed

    micro, world = args.micro_batch_size, dist.world
    if args.global_batch_size % (micro * world):
        raise TrainingError(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size {micro} "
            f"x {world} GPU(s)"
        )
    accum = args.global_batch_size // (micro * world)
    max_steps = args.max_steps or max(1, math.ceil(args.epochs * len(data.samples) / args.global_batch_size))
    geo = Geometry(micro, accum, world, args.global_batch_size, max_steps)
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


def _save_drafter(args, phase, dist, engine, data, ds_cfg, run: Run, out: Path) -> Path:
    """The final HF-format drafter folder (+ provenance.json) under ``<out>/drafter``."""
    import deepspeed

    from massv_vllm.provenance import file_hash, write_provenance

    drafter_out = out / "drafter"
    module = engine.module
    # The speculators section names the target this drafter was trained against and its γ (the
    # parallel-drafting γ when trained for it, else what the input drafter recorded, else 5).
    save_kw = dict(
        tokenizer_from=args.drafter,
        verifier=args.target,
        gamma=getattr(args, "parallel_draft_tokens", 0) or None,
    )
    module.base.config.dtype = next(module.parameters()).dtype  # what the weights are saved in
    if ds_cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            if dist.main:
                module.save_pretrained(drafter_out, **save_kw)
    elif dist.main:
        module.save_pretrained(drafter_out, **save_kw)
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
    say(dist, f"done: {run.step} steps, loss {loss}; data {data.stats.summary()}; drafter in {drafter_out}")
    if data.features is not None:
        say(dist, data.features.cache.stats.summary())
    return drafter_out


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return [p for p in path.rglob("*") if p.is_file()]


def main(phase: str, argv: list[str] | None = None) -> None:
    """CLI entry point of ``train/pretrain_projector.py`` and ``train/sdvit.py``."""
    parser = build_parser(phase)
    args = parse_args_with_recipe(parser, phase, argv)
    try:
        train(args, phase)
    except (TrainingError, DataError, FeatureCacheError, MassvConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
