"""Parallel-drafting training (training/parallel.py): sequence layout, anchors, and a phase-1 run."""

from __future__ import annotations

import json
import random

import torch
from safetensors.torch import load_file

from massv_vllm.families import parallel_mask_token_id
from massv_vllm.training.data.samples import IGNORE, Sample
from massv_vllm.training.parallel import choose_anchors, parallel_batch, parallel_sequence


def test_mask_k_is_taught_the_token_k_plus_1_steps_ahead():
    x = [10, 11, 12, 13, 14, 15, 16]
    ids, labels, attn = parallel_sequence(x, t=3, gamma=3, mask_id=99, pad_id=0)
    assert ids == [10, 11, 12, 13, 99, 99, 0]
    # logits at i predict labels[i+1]: mask 1 (index 4) -> x[5]=15, mask 2 (index 5) -> x[6]=16
    assert labels == [IGNORE] * 5 + [15, 16]
    assert attn == [1, 1, 1, 1, 1, 1, 0]
    # near the end of the sample: mask 1 after x[4] -> x[6]=16, mask 2 would be x[7] (none)
    _, labels, _ = parallel_sequence(x, t=4, gamma=3, mask_id=99, pad_id=0)
    assert labels == [IGNORE] * 6 + [16, IGNORE]


def test_anchors_stay_in_the_response_and_are_seeded():
    rng = random.Random(0)
    got = choose_anchors(length=20, prompt_len=8, count=4, rng=rng)
    assert got == sorted(got) and len(set(got)) == 4 and all(7 <= t <= 17 for t in got)
    assert choose_anchors(10, 8, 4, random.Random(0)) == [7]  # only t=7 leaves a mask target
    s = Sample(index=3, id="a", input_ids=torch.arange(30, 50, dtype=torch.int32), prompt_len=8)
    a = parallel_batch([s], None, pad_id=0, mask_id=99, gamma=3, anchors=2, seed=1, position=5)
    b = parallel_batch([s], None, pad_id=0, mask_id=99, gamma=3, anchors=2, seed=1, position=5)
    c = parallel_batch([s], None, pad_id=0, mask_id=99, gamma=3, anchors=2, seed=1, position=9)
    assert torch.equal(a.input_ids, b.input_ids) and a.input_ids.shape[0] == 2
    assert not torch.equal(a.input_ids, c.input_ids) or a.input_ids.shape != c.input_ids.shape


def test_mask_token_is_a_padding_row_never_the_image_token():
    assert parallel_mask_token_id(151936, 152064, 151655) == 151936
    assert parallel_mask_token_id(262144, 262208, 262144) == 262145  # Gemma3's image soft token


def test_phase1_with_parallel_drafting_trains_the_mask_row(tiny_qwen, tmp_path):
    from massv_vllm.serving.checks import check_drafter
    from massv_vllm.testing.synthetic import write_llava_set
    from massv_vllm.training.loop import read_log
    from massv_vllm.training.recipes import PRETRAIN, build_parser
    from massv_vllm.training.trainer import train

    data = write_llava_set(tmp_path / "captions", 4)
    args = build_parser(PRETRAIN).parse_args(
        ["--drafter", str(tiny_qwen.drafter), "--target", str(tiny_qwen.target), "--data", str(data),
         "--out", str(tmp_path / "p1"), "--global-batch-size", "4", "--micro-batch-size", "2",
         "--warmup-steps", "0", "--no-progress", "--max-steps", "3", "--lr", "1e-2", "--min-lr-ratio", "1.0",
         "--parallel-draft-tokens", "3", "--parallel-anchors", "2"]
    )  # fmt: skip
    res = train(args, PRETRAIN)
    steps = read_log(tmp_path / "p1" / "train_log.jsonl")
    assert all("parallel_loss" in s for s in steps) and steps[-1]["parallel_loss"] < steps[0]["parallel_loss"]
    cfg = json.loads((res.drafter / "config.json").read_text())
    m = cfg["massv"]
    assert cfg["pard_token"] == parallel_mask_token_id(
        m["base_vocab_size"], m["target"]["vocab_size"], m["target"]["image_token_id"]
    )
    before, after = (
        load_file(str(tiny_qwen.drafter / "model.safetensors")),
        load_file(str(res.drafter / "model.safetensors")),
    )
    emb = "model.embed_tokens.weight"
    changed_rows = (before[emb] != after[emb]).any(dim=1).nonzero().flatten().tolist()
    assert changed_rows == [cfg["pard_token"]]  # only the mask row of the frozen LM moved
    assert before[emb][cfg["pard_token"]].abs().sum() == 0  # it was zero padding before
    for k in before:
        if k != emb and not k.startswith("projector."):
            assert torch.equal(before[k], after[k]), k
    check_drafter(res.drafter)
