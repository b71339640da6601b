"""The training loop: optimizer steps over the sample stream, checkpoints, exact resume, the log.

The sample order is an endless stream of seeded per-epoch permutations (``schedule.SampleStream``);
a step consumes the next ``global batch`` stream positions, so the checkpoint's position
(``consumed``) says exactly where to continue, and the JSONL log records the sample indices of
every step (truncated on resume to the checkpoint step, so the log of a killed-and-resumed run
equals that of an uninterrupted one). A checkpoint counts once every rank wrote it
(``COMPLETE_MARK``); a kill mid-save leaves the previous one as what ``--resume`` uses.
"""

from __future__ import annotations

import base64
import json
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from massv_vllm.training.data.samples import collate
from massv_vllm.training.distributed import all_sum, barrier, say
from massv_vllm.training.parallel import parallel_batch
from massv_vllm.training.recipes import TrainingError
from massv_vllm.training.schedule import SampleStream

LOG_NAME = "train_log.jsonl"
CKPT_DIR = "checkpoints"
COMPLETE_MARK = "massv_complete.json"


RNG_FILE = "rng-rank{rank}.json"
LEGACY_RNG_FILE = "rng-rank{rank}.pt"


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _tensor(b64: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8).clone()


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as plain JSON values."""
    import numpy as np

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    s: dict[str, Any] = {
        "format": 1,
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        s["cuda"] = _b64(torch.cuda.get_rng_state())
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = s["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(s["torch"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(_tensor(s["cuda"]))


def save_rng_state(folder: Path, rank: int) -> None:
    """This rank's RNG states as JSON (never a pickle: resume must not run code from a file)."""
    path = folder / RNG_FILE.format(rank=rank)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rng_state()))
    tmp.replace(path)


def load_rng_state(folder: Path, rank: int) -> str:
    """Restore this rank's RNG states from a checkpoint; returns "restored", or why not. The JSON
    file is read as data; an ``rng-rank*.pt`` of older versions is a pickle and is not opened."""
    path = folder / RNG_FILE.format(rank=rank)
    if path.is_file():
        try:
            set_rng_state(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise TrainingError(f"cannot restore the RNG states from {path}: {e}") from e
        return "restored"
    if (folder / LEGACY_RNG_FILE.format(rank=rank)).is_file():
        return (
            f"not restored: {LEGACY_RNG_FILE.format(rank=rank)} is a pickle of an older version, not loaded"
        )
    return "not restored: the checkpoint has none"


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


@dataclass
class Geometry:
    micro: int
    accum: int
    world: int
    global_batch: int
    max_steps: int


class Run:
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
                say(self.dist, f"--resume: no checkpoint in {self.ckpt_root}, starting from scratch")
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
        rng = load_rng_state(self.ckpt_root / tag, self.dist.rank)
        if rng != "restored":
            print(
                f"[massv] rank {self.dist.rank}: RNG states {rng}; continuing without them", file=sys.stderr
            )
        self.log.truncate_after(self.step)
        self.log.write("resume", step=self.step, consumed=self.consumed, checkpoint=tag)
        say(self.dist, f"resumed from {tag}: step {self.step}, {self.consumed} samples consumed")

    def save(self) -> None:
        tag = f"step-{self.step:07d}"
        try:
            (self.ckpt_root / tag).mkdir(parents=True, exist_ok=True)
            save_rng_state(self.ckpt_root / tag, self.dist.rank)
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
            par = None
            if getattr(self.args, "parallel_draft_tokens", 0):
                par = parallel_batch(
                    samples, feats, pad_id=data.pad_id, mask_id=self.engine.module.mask_token_id,
                    gamma=self.args.parallel_draft_tokens, anchors=self.args.parallel_anchors,
                    seed=self.args.seed, position=consumed + lo,
                )  # fmt: skip
            pin = self.engine.device.type == "cuda"
            batches.append(tuple(None if b is None else b.pin_memory() if pin else b for b in (batch, par)))
        return order, batches

    def _step(self, order: list[int], batches: list[Any], t0: float) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns (and logs) its record."""
        geo, dist, engine, data = self.geo, self.dist, self.engine, self.data
        lr = engine.get_lr()[0]  # the rate this step uses (the schedule advances in engine.step)
        loss_sum = loss_tokens = tokens = par_sum = par_tokens = 0.0
        for host, host_par in batches:
            batch = host.to(engine.device)
            out = engine(
                input_ids=batch.input_ids, image_embeds=batch.image_embeds,
                attention_mask=batch.attention_mask, labels=batch.labels,
            )  # fmt: skip
            loss, n = out.loss, out.num_loss_tokens
            if host_par is not None:  # parallel drafting: both losses, weighted per target token
                par = host_par.to(engine.device)
                pout = engine(
                    input_ids=par.input_ids, image_embeds=par.image_embeds,
                    attention_mask=par.attention_mask, labels=par.labels,
                )  # fmt: skip
                loss = (loss * n + pout.loss * pout.num_loss_tokens) / max(n + pout.num_loss_tokens, 1)
                n += pout.num_loss_tokens
                par_sum += float(pout.loss.detach()) * pout.num_loss_tokens
                par_tokens += pout.num_loss_tokens
                tokens += par.num_tokens
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum += float(loss.detach()) * n
            loss_tokens += n
            tokens += batch.num_tokens
        loss_sum, loss_tokens, tokens, par_sum, par_tokens = all_sum(
            [loss_sum, loss_tokens, tokens, par_sum, par_tokens], dist
        )
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
        if getattr(self.args, "parallel_draft_tokens", 0):
            rec["parallel_loss"] = par_sum / max(par_tokens, 1)
        self.log.write("step", **rec)
        return rec


def _prune_checkpoints(root: Path, keep: int, current: str) -> None:
    """Keep the newest ``keep`` complete checkpoints; drop older ones and torn ones (killed mid-save)."""
    keep_tags = set(complete_tags(root)[-max(keep, 1) :]) | {current}
    for p in root.glob("step-*"):
        if p.is_dir() and p.name not in keep_tags and p.name < current:
            shutil.rmtree(p, ignore_errors=True)
