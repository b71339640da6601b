"""Train the world's target VLM from scratch: a small ``Qwen2_5_VLForConditionalGeneration``.

The model is built by ``massv_vllm.testing.tiny.make_qwen2_5_vl_target`` (random weights, the world's
tokenizer) and trained with a plain PyTorch loop on the ``target_train`` split: prompts through
the target's own chat template and processor (image placeholders expanded exactly as vLLM does),
loss on the answer tokens only. Training stops at ``max_steps``, at the time budget, or as soon
as greedy attribute accuracy on the ``val`` split reaches ``stop_accuracy``, whichever is first.
A checkpoint written at every evaluation lets a killed run resume where it stopped.

Speed (full size: ~2000 steps of 128 samples in 5 minutes on one H100): the data workers compute
the M-RoPE positions and ship uint8 patches (normalized on the device), and during training the
vision tower's per-image attention loop and its Conv3d patch embedding run as one padded SDPA call
and one matmul. Same functions (tests/test_world_target.py checks them against the stock model);
the saved checkpoint is a stock Qwen2.5-VL that transformers and vLLM load as is.

At the end the saved checkpoint (in its serving dtype) answers the held-out ``eval`` split with
greedy decoding; the answers and their scores go to ``eval_outputs.jsonl``, the per-task accuracy
to ``train_summary.json``.

    python -m benchmarks.world.train_target --world W --tokenizer T --out target/ [--preset small]
"""

from __future__ import annotations

import functools
import json
import os
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from benchmarks import cli
from benchmarks.world.generate_world import load_split, score_answer
from massv_vllm.training.data.records import Record, hf_messages, load_image, parse_llava
from massv_vllm.training.schedule import SampleStream, cosine_lr_factor

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers fork after the tokenizer ran

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Longest answer each task needs (tokens of the world tokenizer) when decoding greedily.
MAX_NEW_TOKENS = {"captioning": 96, "counting": 16, "attribute": 16, "location": 16, "free-form": 160}


def log(msg: str) -> None:
    print(f"[world] {msg}", flush=True)


def device_and_autocast() -> tuple[torch.device, torch.dtype | None]:
    """CUDA with bf16 autocast when available, else CPU in float32."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.bfloat16
    return torch.device("cpu"), None


def read_split(world_dir: str | Path, name: str) -> list[Record]:
    """A world split as Records; ``meta`` keeps the scene and question for scoring."""
    world_dir = Path(world_dir)
    return [parse_llava(obj, world_dir, f"{name}[{i}]") for i, obj in enumerate(load_split(world_dir, name))]


def record_sample(record: Record) -> dict[str, Any]:
    """The data-file view of a record (what ``score_answer`` reads)."""
    return {**record.meta, "task": record.task}


# ---- data ---------------------------------------------------------------------------------------
class PromptEncoder:
    """Chat template + processor of the target: prompt ids with expanded image placeholders."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.end_ids = self.tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.merge = int(processor.image_processor.merge_size)

    def prompt_text(self, record: Record) -> str:
        return self.processor.apply_chat_template(
            hf_messages(record), add_generation_prompt=True, tokenize=False
        )

    def encode(self, record: Record, image: Any) -> dict[str, Any]:
        """input_ids/labels (loss on the answer and its end token) and the image tensors.

        ``pixel_values`` are the processor's resized patches as uint8, *before* rescale/normalize:
        4x less to move between processes, and ``PixelNormalizer`` finishes them on the device
        (same values as the processor's, to float rounding; the data loader is the bottleneck).
        """
        enc = self.processor(
            text=[self.prompt_text(record)],
            images=[image],
            return_tensors="pt",
            do_rescale=False,
            do_normalize=False,
        )
        prompt = enc["input_ids"][0].tolist()
        # The template renders the answer as "<answer><|im_end|>\n"; the answer starts a new
        # pre-token after "assistant\n", so tokenizing it alone gives the same ids as in context.
        answer = self.tokenizer(record.response, add_special_tokens=False)["input_ids"] + self.end_ids
        ids = prompt + answer
        return {
            "input_ids": ids,
            "labels": [-100] * len(prompt) + answer,
            "position_ids": mrope_positions(
                ids, enc["image_grid_thw"].tolist(), self.image_token_id, self.merge
            ),
            "pixel_values": enc["pixel_values"],
            "image_grid_thw": enc["image_grid_thw"],
        }


def mrope_positions(
    input_ids: Sequence[int], grids: Sequence[Sequence[int]], image_token_id: int, merge: int
) -> torch.Tensor:
    """Qwen2.5-VL's 3-D (t, h, w) rope positions [3, L] of one unpadded image+text sequence.

    Text advances all three axes together; an image's tokens take (start, start + row, start + col)
    on the merged grid, and the text after it resumes at start + max(rows, cols) -- what
    ``Qwen2_5_VLModel.get_rope_index`` computes for still images (and vLLM's M-RoPE). Computed in the
    data workers so the training step needs no per-sample Python loop.
    """
    out = torch.empty(3, len(input_ids), dtype=torch.long)
    grid_iter = iter(grids)
    pos = i = 0
    while i < len(input_ids):
        if input_ids[i] != image_token_id:
            out[:, i] = pos
            pos, i = pos + 1, i + 1
            continue
        _, gh, gw = next(grid_iter)
        h, w = gh // merge, gw // merge
        rows = torch.arange(h).repeat_interleave(w)
        cols = torch.arange(w).repeat(h)
        out[0, i : i + h * w] = pos
        out[1, i : i + h * w] = pos + rows
        out[2, i : i + h * w] = pos + cols
        pos, i = pos + max(h, w), i + h * w
    return out


class PixelNormalizer:
    """The processor's rescale + normalize, applied on the device to uint8 patches
    ([N, C * T * P * P], channel-major as the processor flattens them)."""

    def __init__(self, image_processor: Any, device: torch.device):
        self.scale = float(image_processor.rescale_factor)
        self.mean = torch.tensor(image_processor.image_mean, device=device).view(1, -1, 1)
        self.std = torch.tensor(image_processor.image_std, device=device).view(1, -1, 1)

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        if raw.dtype != torch.uint8:
            raise ValueError(f"expected uint8 patches from PromptEncoder.encode, got {raw.dtype}")
        x = raw.float().view(raw.shape[0], self.mean.shape[1], -1) * self.scale
        return ((x - self.mean) / self.std).view(raw.shape[0], -1)


class TrainSet(Dataset):
    """Encoded training samples; ``cache`` keeps each one after its first use (small worlds on
    CPU, where encoding in the training process would otherwise cost as much as the step)."""

    def __init__(self, records: Sequence[Record], encoder: PromptEncoder, cache: bool = False):
        self.records = list(records)
        self.encoder = encoder
        self.cache: dict[int, dict[str, Any]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        r = self.records[i]
        item = self.encoder.encode(r, load_image(r.images[0]))
        if self.cache is not None:
            self.cache[i] = item
        return item


def collate(batch: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    pos = torch.zeros((3, len(batch), n), dtype=torch.long)  # padding gets 0, as get_rope_index does
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k] = torch.tensor(b["input_ids"])
        labels[i, :k] = torch.tensor(b["labels"])
        mask[i, :k] = 1
        pos[:, i, :k] = b["position_ids"]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos,
        "labels": labels,
        "pixel_values": torch.cat([b["pixel_values"] for b in batch]),
        "image_grid_thw": torch.cat([b["image_grid_thw"] for b in batch]),
    }


class StepBatches(Sampler[list[int]]):
    """Batches for steps ``start..total`` from the trainers' seeded sample stream
    (``massv_vllm.training.schedule.SampleStream``), so a resumed run sees exactly the samples it
    would have seen without the interruption."""

    def __init__(self, n: int, batch_size: int, start_step: int, total_steps: int, seed: int = 0):
        self.bs, self.start, self.total = batch_size, start_step, total_steps
        self.stream = SampleStream(n, seed)

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.total):
            yield self.stream.take(step * self.bs, self.bs)


def lr_at(step: int, base: float, warmup: int, total: int, time_fraction: float = 0.0) -> float:
    """The world trainers' rate: linear warm-up, then cosine decay to 10% of ``base`` at ``total``
    steps or at the end of the time budget (``time_fraction`` = elapsed / budget), whichever first."""
    return base * cosine_lr_factor(step, warmup, total, min_ratio=0.1, min_progress=time_fraction)


# ---- generation and scoring ----------------------------------------------------------------------
@torch.no_grad()
def greedy_answers(
    model: Any,
    encoder: PromptEncoder,
    records: Sequence[Record],
    device: torch.device,
    autocast: torch.dtype | None,
    batch_size: int = 64,
) -> list[str]:
    """Greedy answers of ``model`` (transformers ``generate``) to ``records``' prompts, in order."""
    proc, tok = encoder.processor, encoder.tokenizer
    was_training = model.training
    model.eval()
    side = tok.padding_side
    tok.padding_side = "left"  # generation appends on the right
    out: list[str | None] = [None] * len(records)
    order = sorted(range(len(records)), key=lambda i: MAX_NEW_TOKENS[records[i].task])
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            recs = [records[i] for i in idx]
            enc = proc(
                text=[encoder.prompt_text(r) for r in recs],
                images=[[load_image(r.images[0])] for r in recs],
                padding=True,
                return_tensors="pt",
            ).to(device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                gen = model.generate(
                    **enc,
                    max_new_tokens=max(MAX_NEW_TOKENS[r.task] for r in recs),
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            for i, t in zip(idx, texts):
                out[i] = t.strip()
    finally:
        tok.padding_side = side
        model.train(was_training)
    return [t or "" for t in out]


def chance_attribute_accuracy(world_dir: str | Path) -> float:
    """Accuracy of guessing one of the world's colours at random."""
    from benchmarks.world.generate_world import load_spec

    return 1 / len(load_spec(world_dir).colours)


def score_outputs(records: Sequence[Record], outputs: Sequence[str]) -> dict[str, Any]:
    """Per-task accuracy of ``outputs`` against the scenes (recomputed from the text, nothing cached)."""
    per: dict[str, list[bool]] = {}
    for r, o in zip(records, outputs):
        per.setdefault(r.task, []).append(score_answer(r.task, o, record_sample(r)))
    return {t: {"n": len(v), "accuracy": sum(v) / len(v)} for t, v in sorted(per.items())}


def eval_rows(records: Sequence[Record], outputs: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {
            "id": r.id,
            "task": r.task,
            "prompt": r.prompt.replace("<image>\n", ""),
            "output": o,
            "reference": r.response,
            "correct": score_answer(r.task, o, record_sample(r)),
        }
        for r, o in zip(records, outputs)
    ]


# ---- training -------------------------------------------------------------------------------------
def build_target(out_dir: Path, tokenizer_dir: Path, arch: dict, window_px: int, seed: int) -> None:
    """Random-init target with the world tokenizer; the vision window set to ``window_px``."""
    from massv_vllm.testing.tiny import make_qwen2_5_vl_target

    # As with the real pair (Qwen2.5-VL-7B: 152064 rows, Qwen2.5-1.5B: 151936), the target's vocab
    # is larger than the small LM's (the tokenizer length, train_lm.py), so the drafter's vocab has
    # padding rows: a parallel drafter's mask token is the first of them.
    make_qwen2_5_vl_target(out_dir, tokenizer_dir, seed=seed, vocab_padding=1, **arch)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vision_config"]["window_size"] = window_px
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def linear_patch_embed(model: Any) -> None:
    """Run the vision patch embedding (a Conv3d whose stride equals its kernel) as one matmul.

    Same function and same weights (the checkpoint is unchanged); the convolution path re-plans
    for every new image-batch shape, which dominates a step on CPU.
    """
    pe = model.model.visual.patch_embed
    conv = pe.proj

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        w = conv.weight
        return hidden_states.to(w.dtype) @ w.reshape(w.shape[0], -1).t()

    pe.forward = forward


def _segments(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, torch.Tensor]:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    n_seg, max_len = lengths.numel(), int(lengths.max())
    seg = torch.repeat_interleave(torch.arange(n_seg, device=lengths.device), lengths)
    off = torch.arange(seg.numel(), device=lengths.device) - cu_seqlens[:-1].long()[seg]
    key_mask = torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]
    return seg, off, n_seg, max_len, key_mask


def padded_vision_attention(model: Any) -> None:
    """Run the vision tower's attention as one padded, masked SDPA call over all images/windows.

    transformers' non-flash path loops over the ``cu_seqlens`` segments (one SDPA call per image or
    window, per layer); this computes the same attention (each token attends within its segment)
    in a single call. Same weights and function; used for training and evaluation speed only.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    def forward(
        self: Any,
        hidden_states: torch.Tensor,
        cu_seqlens: torch.Tensor,
        position_embeddings: Any = None,
        **_: Any,
    ) -> torch.Tensor:
        n = hidden_states.shape[0]
        q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
        seg, off, n_seg, max_len, key_mask = _segments(cu_seqlens)

        def pad(x: torch.Tensor) -> torch.Tensor:  # [n, H, D] -> [segments, H, max_len, D]
            out = x.new_zeros(n_seg, max_len, *x.shape[1:])
            out[seg, off] = x
            return out.transpose(1, 2)

        o = torch.nn.functional.scaled_dot_product_attention(
            pad(q), pad(k), pad(v), attn_mask=key_mask[:, None, None, :], scale=self.scaling
        )
        return self.proj(o.transpose(1, 2)[seg, off].reshape(n, -1))

    for blk in model.model.visual.blocks:
        blk.attn.forward = types.MethodType(forward, blk.attn)


def param_groups(model: Any, vision_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer groups: the vision tower (its rate times ``vision_lr_scale``) and the rest.

    Until the language model attends to the image tokens, the vision tower's gradients are mostly
    noise, and Adam turns noise into full-size steps: at a small model's rate that re-randomizes
    the tower within ~100 steps. A lower rate keeps the random features (which already tell the
    colours apart) until the gradients carry signal.
    """
    vision = [p for n, p in model.named_parameters() if n.startswith("model.visual.")]
    ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": vision, "lr_scale": vision_lr_scale}, {"params": rest, "lr_scale": 1.0}]


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


class _TrainState:
    """Step, clock and logs of a training run; saved with the weights at every evaluation."""

    def __init__(self) -> None:
        self.step = 0
        self.elapsed = 0.0
        self.waited = 0.0  # seconds spent waiting for the data loader
        self.skipped = 0  # updates skipped for a non-finite loss/gradient
        self.bad_steps_in_row = 0
        self.history: list[dict[str, Any]] = []
        self.losses: list[tuple[int, float]] = []

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load(self, d: dict[str, Any]) -> None:
        vars(self).update({k: d[k] for k in vars(self) if k in d})


def _evaluate_and_checkpoint(
    model: Any,
    opt: Any,
    encoder: PromptEncoder,
    val: list[Record],
    st: _TrainState,
    t0: float,
    device: torch.device,
    autocast: torch.dtype | None,
    state_path: Path,
) -> float:
    outs = greedy_answers(model, encoder, val, device, autocast)
    acc = score_outputs(val, outs)["attribute"]["accuracy"]
    st.elapsed = time.perf_counter() - t0
    loss = st.losses[-1][1] if st.losses else float("nan")
    st.history.append(
        {"step": st.step, "seconds": round(st.elapsed, 1), "val_attribute_accuracy": acc, "loss": loss}
    )
    log(
        f"target: step {st.step} loss {loss:.4f} val attribute accuracy {acc:.3f} "
        f"({st.elapsed:.0f}s, {st.waited:.0f}s of it waiting for data)"
    )
    _atomic_save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "state": st.to_dict()}, state_path
    )
    return acc


def _train_loop(
    model: Any,
    encoder: PromptEncoder,
    train: list[Record],
    val: list[Record],
    sizes: Any,
    seed: int,
    device: torch.device,
    autocast: torch.dtype | None,
    state_path: Path,
) -> tuple[_TrainState, str]:
    from tqdm import tqdm

    opt = torch.optim.AdamW(
        param_groups(model, sizes.vision_lr_scale),
        lr=sizes.lr,
        weight_decay=sizes.weight_decay,
        betas=(0.9, 0.98),
    )
    st = _TrainState()
    if state_path.is_file():  # resume an interrupted run where it stopped
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        st.load(saved["state"])
        log(f"target: resuming at step {st.step} ({st.elapsed:.0f}s already spent)")
    processor = encoder.processor
    normalize = PixelNormalizer(processor.image_processor, device)
    workers = min(sizes.workers, max(0, (os.cpu_count() or 1) - 2)) if device.type == "cuda" else 0
    loader = DataLoader(
        TrainSet(train, encoder, cache=sizes.cache_samples and workers == 0),
        batch_sampler=StepBatches(len(train), sizes.batch_size, st.step, sizes.max_steps, seed),
        collate_fn=functools.partial(collate, pad_id=processor.tokenizer.pad_token_id),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    model.train()
    stop_reason = "max_steps"
    t0 = time.perf_counter() - st.elapsed
    bar = tqdm(total=sizes.max_steps, initial=st.step, desc="target", mininterval=5, disable=None)
    t_wait = time.perf_counter()
    for batch in loader:
        st.waited += time.perf_counter() - t_wait
        lr = lr_at(
            st.step,
            sizes.lr,
            sizes.warmup_steps,
            sizes.max_steps,
            (time.perf_counter() - t0) / sizes.time_budget_s,
        )
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch["pixel_values"] = normalize(batch["pixel_values"])
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(**batch).loss
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # A non-finite loss or gradient (a bf16 overflow) skips the update instead of poisoning
        # the weights; too many in a row means the run diverged.
        if torch.isfinite(loss) and torch.isfinite(grad_norm):
            opt.step()
            st.bad_steps_in_row = 0
        else:
            st.skipped += 1
            st.bad_steps_in_row += 1
            if st.bad_steps_in_row >= 20:
                raise RuntimeError(
                    f"target training diverged: 20 non-finite steps in a row at step {st.step}"
                )
        opt.zero_grad(set_to_none=True)
        st.step += 1
        bar.update(1)
        if st.step % 10 == 0 or len(st.losses) == 0:
            st.losses.append((st.step, float(loss.detach())))
            bar.set_postfix(loss=f"{st.losses[-1][1]:.3f}")
        over_time = time.perf_counter() - t0 > sizes.time_budget_s
        if st.step % sizes.eval_every == 0 or st.step == sizes.max_steps or over_time:
            acc = _evaluate_and_checkpoint(model, opt, encoder, val, st, t0, device, autocast, state_path)
            if acc >= sizes.stop_accuracy:
                stop_reason = f"val attribute accuracy {acc:.3f} >= {sizes.stop_accuracy}"
                break
            if over_time:
                stop_reason = f"time budget {sizes.time_budget_s:.0f}s"
                break
        t_wait = time.perf_counter()
    bar.close()
    st.elapsed = time.perf_counter() - t0
    return st, stop_reason


def train_target(
    world_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    sizes: Any,
    dtype: str = "float32",
    seed: int = 0,
    eval_limit: int | None = None,
) -> dict[str, Any]:
    """Build, train and evaluate the target; returns (and writes) ``train_summary.json``.

    ``sizes`` is a ``benchmarks.world.sizes.TargetSizes``.
    """
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    world_dir, tokenizer_dir, out = Path(world_dir), Path(tokenizer_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"
    if not state_path.is_file():  # a fresh start (no interrupted run to resume): random weights
        build_target(out, tokenizer_dir, sizes.arch, sizes.window_px, seed)
    device, autocast = device_and_autocast()
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).to(device)
    linear_patch_embed(model)
    padded_vision_attention(model)
    encoder = PromptEncoder(AutoProcessor.from_pretrained(str(out)))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"target: {n_params / 1e6:.1f}M parameters on {device} (autocast {autocast})")

    train, val = read_split(world_dir, "target_train"), read_split(world_dir, "val")
    st, stop_reason = _train_loop(model, encoder, train, val, sizes, seed, device, autocast, state_path)
    log(f"target: stopped at step {st.step} ({stop_reason}) after {st.elapsed:.0f}s")

    # Save in the serving dtype, then evaluate *that* checkpoint on the held-out split.
    model.to(DTYPES[dtype]).save_pretrained(str(out))
    model = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    served = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out), dtype=DTYPES[dtype]).to(device)
    ev = read_split(world_dir, "eval")[:eval_limit]
    outs = greedy_answers(served, encoder, ev, device, autocast if DTYPES[dtype] == torch.float32 else None)
    rows = eval_rows(ev, outs)
    (out / "eval_outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    accuracy = score_outputs(ev, outs)
    summary = {
        "parameters": n_params,
        "steps": st.step,
        "stop_reason": stop_reason,
        "train_seconds": round(st.elapsed, 1),
        "data_wait_seconds": round(st.waited, 1),
        "skipped_updates": st.skipped,
        "samples_seen": st.step * sizes.batch_size,
        "loss_curve": st.losses,
        "val_history": st.history,
        "eval_accuracy": accuracy,
        "attribute_accuracy": accuracy.get("attribute", {}).get("accuracy"),
        "chance_attribute_accuracy": chance_attribute_accuracy(world_dir),
        "sizes": asdict(sizes),
        "dtype": dtype,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    state_path.unlink(missing_ok=True)
    log("target: eval accuracy " + ", ".join(f"{t} {v['accuracy']:.3f}" for t, v in accuracy.items()))
    return summary


def main(argv: list[str] | None = None) -> None:
    from benchmarks.world.sizes import PRESETS

    p = cli.parser(__doc__)
    p.add_argument("--world", required=True, help="world folder (generate_world output)")
    p.add_argument("--tokenizer", required=True, help="world tokenizer folder")
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    s = train_target(a.world, a.tokenizer, a.out, preset.target, preset.dtype, a.seed)
    print(json.dumps({k: s[k] for k in ("steps", "stop_reason", "train_seconds", "eval_accuracy")}, indent=2))


if __name__ == "__main__":
    main()
