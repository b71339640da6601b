"""Train the world's small LM: a ``Qwen2ForCausalLM`` on the world's *texts only*.

The stand-in for an off-the-shelf small LM (Qwen2.5-1.5B in the paper): it knows the language of
the world (prompts and generic-style answers, through the target's chat template) but has never
seen an image, nor the target's preferred phrasing. Built by ``massv_vllm.testing.tiny.make_small_lm`` with
the world tokenizer, so its vocab is the target's minus the padding, as with the real pair.

    python -m benchmarks.world.train_lm --world W --tokenizer T --out small_lm/ [--preset small]
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks import cli
from benchmarks.world.generate_world import lm_texts, load_spec
from benchmarks.world.train_target import DTYPES, device_and_autocast, log, lr_at


def chat_text(tokenizer: Any, prompt: str, answer: str) -> str:
    msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(msgs, tokenize=False)


def _batch(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, : len(s)] = ids[i, : len(s)]
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def mean_loss(model: Any, seqs: list[list[int]], pad_id: int, device: torch.device, autocast: Any) -> float:
    model.eval()
    tot, n = 0.0, 0
    for s in range(0, len(seqs), 64):
        b = {k: v.to(device) for k, v in _batch(seqs[s : s + 64], pad_id).items()}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            k = int((b["labels"][:, 1:] != -100).sum())
            tot += float(model(**b).loss) * k
            n += k
    model.train()
    return tot / max(n, 1)


def train_lm(
    world_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    sizes: Any,
    dtype: str = "float32",
    seed: int = 0,
) -> dict[str, Any]:
    """Build and train the small LM on ``world_dir/lm_texts.jsonl``; writes ``train_summary.json``.

    ``sizes`` is a ``benchmarks.world.sizes.LMSizes``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from massv_vllm.testing.tiny import make_small_lm

    world_dir, out = Path(world_dir), Path(out_dir)
    # Vocab = the tokenizer length, below the target's padded one (train_target.build_target).
    make_small_lm(out, tokenizer_dir, "qwen2_5_vl", seed=seed + 1, vocab_multiple=1, **sizes.arch)
    tok = AutoTokenizer.from_pretrained(str(out))
    texts = [json.loads(line) for line in (world_dir / "lm_texts.jsonl").read_text().splitlines() if line]
    if not texts:
        raise ValueError(f"{world_dir / 'lm_texts.jsonl'} holds no texts")
    seqs = tok([chat_text(tok, t["prompt"], t["answer"]) for t in texts], add_special_tokens=False)[
        "input_ids"
    ]
    held_texts = lm_texts(256, seed=seed + 7919, spec=load_spec(world_dir))  # the world's texts, unseen
    held = [chat_text(tok, t["prompt"], t["answer"]) for t in held_texts]
    held_seqs = tok(held, add_special_tokens=False)["input_ids"]

    device, autocast = device_and_autocast()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"small LM: {n_params / 1e6:.1f}M parameters, {len(seqs)} texts, on {device}")
    opt = torch.optim.AdamW(model.parameters(), lr=sizes.lr, weight_decay=0.01, betas=(0.9, 0.98))
    pad_id = tok.pad_token_id
    held_before = mean_loss(model, held_seqs, pad_id, device, autocast)
    rng = random.Random(seed)
    order: list[int] = []
    losses: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    step, stop_reason = 0, "max_steps"
    model.train()
    while step < sizes.max_steps:
        if len(order) < sizes.batch_size:
            perm = list(range(len(seqs)))
            rng.shuffle(perm)
            order += perm
        idx, order = order[: sizes.batch_size], order[sizes.batch_size :]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, sizes.lr, sizes.warmup_steps, sizes.max_steps)
        b = {k: v.to(device, non_blocking=True) for k, v in _batch([seqs[i] for i in idx], pad_id).items()}
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % 10 == 0 or step == 1:
            losses.append((step, float(loss.detach())))
        if step % 200 == 0:
            log(f"small LM: step {step} loss {float(loss):.4f}")
        if time.perf_counter() - t0 > sizes.time_budget_s:
            stop_reason = f"time budget {sizes.time_budget_s:.0f}s"
            break
    seconds = time.perf_counter() - t0
    held_after = mean_loss(model, held_seqs, pad_id, device, autocast)
    model.to(DTYPES[dtype]).save_pretrained(str(out))
    summary = {
        "parameters": n_params,
        "steps": step,
        "stop_reason": stop_reason,
        "train_seconds": round(seconds, 1),
        "loss_curve": losses,
        "held_out_loss_before": held_before,
        "held_out_loss_after": held_after,
        "sizes": asdict(sizes),
        "dtype": dtype,
    }
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"small LM: {step} steps in {seconds:.0f}s; held-out loss {held_before:.3f} -> {held_after:.3f}")
    return summary


def main(argv: list[str] | None = None) -> None:
    from benchmarks.world.sizes import PRESETS

    p = cli.parser(__doc__)
    p.add_argument("--world", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    s = train_lm(a.world, a.tokenizer, a.out, preset.lm, preset.dtype, a.seed)
    print(json.dumps({k: s[k] for k in ("steps", "held_out_loss_before", "held_out_loss_after")}))


if __name__ == "__main__":
    main()
