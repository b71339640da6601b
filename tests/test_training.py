"""The shared DeepSpeed loop (CPU, world size 1): what each phase trains, exact resume, start-up checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from massv_vllm.testing.synthetic import write_llava_set
from massv_vllm.training.loop import read_log
from massv_vllm.training.recipes import PRETRAIN, SDVIT, TrainingError, build_parser
from massv_vllm.training.schedule import SampleStream
from massv_vllm.training.trainer import deepspeed_config, train

CONFIGS = Path(__file__).resolve().parent.parent / "train" / "configs"


@pytest.fixture(scope="module")
def captions(tmp_path_factory):
    return write_llava_set(tmp_path_factory.mktemp("captions"), 4)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One feature cache for the module's runs (as phases 1 and 2 share one): the target's vision
    tower then runs once per image for the whole module."""
    return tmp_path_factory.mktemp("feature-cache")


def _generated_jsonl(root: Path, tiny, n: int, text_only: bool = False) -> Path:
    """generate.py-style records (response token ids ending with the end-of-turn token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny.target)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    path = write_llava_set(root, n, kind="instruction")
    rows = json.loads(path.read_text())
    g = torch.Generator().manual_seed(0)
    out = []
    for i, r in enumerate(rows):
        ids = torch.randint(20, 300, (3 + i % 4,), generator=g).tolist() + [end]
        if text_only:
            r.pop("image")
            r["conversations"][0]["value"] = r["conversations"][0]["value"].replace("<image>\n", "")
        r["conversations"].append({"from": "gpt", "value": tok.decode(ids[:-1])})
        out.append({**r, "response_token_ids": ids})
    jsonl = root / ("text.jsonl" if text_only else "generated.jsonl")
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in out))
    return jsonl


def _args(phase, tiny, data, out, *extra, drafter=None, cache=None):
    cache_args = ["--feature-cache", str(cache)] if cache else []
    return build_parser(phase).parse_args(
        [
            "--drafter", str(drafter or tiny.drafter), "--target", str(tiny.target), "--data", str(data),
            "--out", str(out), "--global-batch-size", "4", "--micro-batch-size", "2", "--warmup-steps", "0",
            "--no-progress", "--deepspeed_config", str(CONFIGS / "zero0.json"), *cache_args, *extra,
        ]
    )  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_phase1_step_lowers_loss_and_trains_only_the_projector(tiny_qwen, captions, tmp_path):
    args = _args(PRETRAIN, tiny_qwen, captions, tmp_path / "p1", "--max-steps", "3", "--lr", "1e-2",
                 "--min-lr-ratio", "1.0", "--local_rank=0")  # fmt: skip
    res = train(args, PRETRAIN)
    steps = read_log(tmp_path / "p1" / "train_log.jsonl")
    # 4 samples, global batch 4: every step sees the same fixed batch
    assert [sorted(s["samples"]) for s in steps] == [[0, 1, 2, 3]] * 3
    assert steps[1]["loss"] < steps[0]["loss"] and steps[2]["loss"] < steps[1]["loss"]
    assert all(s["tokens"] > 0 and s["tokens_per_s"] > 0 and s["lr"] == pytest.approx(1e-2) for s in steps)
    before, after = _weights(tiny_qwen.drafter), _weights(res.drafter)
    assert before.keys() == after.keys()
    for k in before:
        if k.startswith("projector."):
            assert not torch.equal(before[k], after[k]), k
        else:
            assert torch.equal(before[k], after[k]), k  # the LM is bit-identical
    prov = json.loads((res.drafter / "provenance.json").read_text())
    assert prov["kind"] == PRETRAIN and prov["data_hash"] and prov["command"] and "git_commit" in prov
    from massv_vllm.serving.checks import check_drafter

    check_drafter(res.drafter)  # a valid drafter folder for vLLM ("method": "massv")


def test_phase2_full_fine_tune_with_frozen_embeddings(tiny_qwen, tmp_path, shared_cache):
    data = _generated_jsonl(tmp_path / "gen", tiny_qwen, 4)
    args = _args(SDVIT, tiny_qwen, data, tmp_path / "p2", "--max-steps", "2", "--lr", "1e-2",
                 "--min-lr-ratio", "1.0", "--freeze-embeddings",
                 "--deepspeed_config", str(CONFIGS / "zero2.json"), cache=shared_cache)  # fmt: skip
    res = train(args, SDVIT)
    steps = read_log(tmp_path / "p2" / "train_log.jsonl")
    assert steps[1]["loss"] < steps[0]["loss"]
    before, after = _weights(tiny_qwen.drafter), _weights(res.drafter)
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("projector.") for k in changed)
    assert {"model.layers.0.self_attn.q_proj.weight", "model.norm.weight"} <= changed
    prov = json.loads((res.drafter / "provenance.json").read_text())
    assert prov["feature_cache"] == str(shared_cache.resolve())  # phase 2 after this one finds it


def test_text_only_drafter_trains_on_text_only_data(tiny_qwen, tmp_path):
    data = _generated_jsonl(tmp_path / "gen", tiny_qwen, 4, text_only=True)
    args = _args(SDVIT, tiny_qwen, data, tmp_path / "t", "--max-steps", "1", drafter=tiny_qwen.text_drafter)
    res = train(args, SDVIT)
    assert res.samples == 4 and res.final_loss > 0
    assert not (tmp_path / "t" / "feature-cache").exists()  # no projector, no image features
    with pytest.raises(TrainingError, match="text-only"):
        train(_args(PRETRAIN, tiny_qwen, data, tmp_path / "t2", drafter=tiny_qwen.text_drafter), PRETRAIN)


class Crash(Exception):
    pass


class _Payload:
    """Unpickling this runs ``os.mkdir(path)``: proof that a file was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        import os

        return (os.mkdir, (self.path,))


def test_resume_equals_an_uninterrupted_run(tiny_qwen, tmp_path, shared_cache):
    data = _generated_jsonl(tmp_path / "gen", tiny_qwen, 6)  # 6 samples, batch 4: epochs straddle steps
    common = ("--max-steps", "5", "--lr", "5e-3", "--save-every", "2", "--deepspeed_config", str(CONFIGS / "zero2.json"),
              "--feature-cache", str(shared_cache))  # fmt: skip
    straight = train(_args(SDVIT, tiny_qwen, data, tmp_path / "a", *common), SDVIT)

    def crash(step, _):
        if step == 3:  # step 3 is done and logged, but the last checkpoint is step 2
            raise Crash

    with pytest.raises(Crash):
        train(_args(SDVIT, tiny_qwen, data, tmp_path / "b", *common), SDVIT, on_step=crash)
    assert [s["step"] for s in read_log(tmp_path / "b" / "train_log.jsonl")] == [1, 2, 3]
    # a kill in the middle of saving step 4 leaves a torn folder and DeepSpeed's "latest" empty
    torn = tmp_path / "b" / "checkpoints" / "step-0000004"
    torn.mkdir()
    (torn / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("")
    with pytest.raises(TrainingError, match="--resume"):
        train(_args(SDVIT, tiny_qwen, data, tmp_path / "b", *common), SDVIT)
    # RNG states are JSON; a pickle planted in the checkpoint is never unpickled by --resume
    ckpt2 = tmp_path / "b" / "checkpoints" / "step-0000002"
    assert (ckpt2 / "rng-rank0.json").is_file() and not (ckpt2 / "rng-rank0.pt").exists()
    marker = tmp_path / "pickle-ran"
    torch.save({"python": _Payload(str(marker))}, ckpt2 / "rng-rank0.pt")
    resumed = train(_args(SDVIT, tiny_qwen, data, tmp_path / "b", *common, "--resume"), SDVIT)
    assert not marker.exists()

    log_a, log_b = (read_log(tmp_path / d / "train_log.jsonl") for d in ("a", "b"))
    assert [s["step"] for s in log_b] == [1, 2, 3, 4, 5]  # the lost step 3 was redone, not duplicated
    assert [s["samples"] for s in log_b] == [s["samples"] for s in log_a]
    consumed = [i for s in log_a for i in s["samples"]]
    assert consumed[:6] != list(range(6)) and sorted(consumed[:6]) == list(range(6))  # an epoch: all once
    assert sorted(consumed[6:12]) == list(range(6))
    for a, b in zip(log_a, log_b):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    wa, wb = _weights(straight.drafter), _weights(resumed.drafter)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    assert read_log(tmp_path / "b" / "train_log.jsonl", "resume")[0]["checkpoint"] == "step-0000002"
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*")) == [
        "step-0000004",
        "step-0000005",
    ]
    # a different data set cannot silently continue this run
    other = _generated_jsonl(tmp_path / "gen2", tiny_qwen, 5)
    with pytest.raises(TrainingError, match="prepared data differ"):
        train(_args(SDVIT, tiny_qwen, other, tmp_path / "b", *common, "--resume"), SDVIT)


def test_startup_checks_fail_fast(tiny_qwen, captions, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="is not writable"):
        train(_args(PRETRAIN, tiny_qwen, captions, blocker / "out"), PRETRAIN)
    with pytest.raises(TrainingError, match="not enough free disk space"):
        train(_args(PRETRAIN, tiny_qwen, captions, tmp_path / "o", "--min-free-gb", "1e9"), PRETRAIN)
    with pytest.raises(TrainingError, match="not a multiple"):
        train(_args(PRETRAIN, tiny_qwen, captions, tmp_path / "o", "--micro-batch-size", "3"), PRETRAIN)


def test_deepspeed_config_is_filled_from_the_cli(tmp_path):
    cfg = deepspeed_config(str(CONFIGS / "zero2.json"), micro=2, accum=4, world=2, bf16=True, grad_clip=0.5)
    assert cfg["train_batch_size"] == 16 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["bf16"]["enabled"] is True and cfg["gradient_clipping"] == 0.5
    assert cfg["zero_optimization"]["stage"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(
        TrainingError, match="train_micro_batch_size_per_gpu=8 but --micro-batch-size gives 2"
    ):
        deepspeed_config(str(bad), micro=2, accum=1, world=1, bf16=False, grad_clip=1.0)
    bad.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(TrainingError, match="sets 'optimizer'"):
        deepspeed_config(str(bad), micro=2, accum=1, world=1, bf16=False, grad_clip=1.0)


def test_sample_stream_is_a_seeded_permutation_per_epoch():
    s = SampleStream(5, seed=3)
    first = s.take(0, 12)
    assert sorted(first[:5]) == sorted(first[5:10]) == list(range(5)) and first[:5] != first[5:10]
    assert SampleStream(5, seed=3).take(7, 5) == first[7:12]  # any position, same answer
    assert SampleStream(5, seed=4).take(0, 5) != first[:5]


def test_launcher_arguments_are_accepted(tiny_qwen):
    p = build_parser(SDVIT)
    base = ["--drafter", "d", "--target", "t", "--data", "x.json", "--out", "o"]
    assert p.parse_args([*base, "--local_rank=3"]).local_rank == 3
    assert (
        p.parse_args([*base, "--local-rank", "1", "--deepspeed-config", "c.json"]).deepspeed_config
        == "c.json"
    )


def test_rng_states_round_trip_through_json(tmp_path):
    import random

    import numpy as np

    from massv_vllm.training.loop import load_rng_state, save_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(3)  # mid-stream states (NumPy's cached gaussian)
    save_rng_state(tmp_path, 0)
    want = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    assert load_rng_state(tmp_path, 0) == "restored"
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[:2] == want[:2] and torch.equal(got[2], want[2])
    assert json.loads((tmp_path / "rng-rank0.json").read_text())["format"] == 1
    # an older checkpoint's pickle is reported, never opened
    other = tmp_path / "old"
    other.mkdir()
    marker = tmp_path / "pickle-ran"
    torch.save({"python": _Payload(str(marker))}, other / "rng-rank0.pt")
    assert load_rng_state(other, 0).startswith("not restored") and not marker.exists()


def test_generation_json_cannot_move_the_image_root(tmp_path):
    from massv_vllm.training.data.records import DataError
    from massv_vllm.training.prepare import default_image_root

    gen = tmp_path / "gen"
    (gen / "images").mkdir(parents=True)
    data = gen / "generated.jsonl"
    data.write_text("")
    meta = gen / "generation.json"
    for root in (".", "images"):  # generate.py's own folder (datasets inputs): fine
        meta.write_text(json.dumps({"image_root": root}))
        assert default_image_root(data, None) == str((gen / root).resolve())
    (gen / "up").symlink_to(tmp_path)
    for root in ("/", "..", "../elsewhere", "images/../..", "up", str(tmp_path)):
        meta.write_text(json.dumps({"image_root": root}))
        with pytest.raises(DataError, match="outside the data's folder.*pass --image-root"):
            default_image_root(data, None)
        assert default_image_root(data, "/chosen/by/the/user") == "/chosen/by/the/user"
    for bad in ('{"image_root": 5}', '{"image_root": "a\\u0000b"}', "not json", "[1]"):
        meta.write_text(bad)
        if bad == "[1]":
            assert default_image_root(data, None) is None
            continue
        with pytest.raises(DataError, match="pass --image-root"):
            default_image_root(data, None)


def test_drafter_provenance_cannot_choose_the_feature_cache(tmp_path):
    from massv_vllm.training.prepare import _default_cache

    phase1 = tmp_path / "phase1"
    drafter = phase1 / "drafter"
    drafter.mkdir(parents=True)
    out = tmp_path / "phase2"
    args = build_parser(SDVIT).parse_args(
        ["--drafter", str(drafter), "--target", "t", "--data", "x.json", "--out", str(out)]
    )
    prov = drafter / "provenance.json"
    assert _default_cache(args, out) == out / "feature-cache"  # no provenance
    (phase1 / "feature-cache").mkdir()
    prov.write_text(json.dumps({"feature_cache": str(phase1 / "feature-cache")}))
    assert _default_cache(args, out) == (phase1 / "feature-cache").resolve()  # phase 1's own: reused
    victim = tmp_path / "home" / ".ssh"
    victim.mkdir(parents=True)
    (tmp_path / "elsewhere" / "feature-cache").mkdir(parents=True)
    for recorded in (str(victim), "/", str(tmp_path / "elsewhere" / "feature-cache"), 7, None):
        prov.write_text(json.dumps({"feature_cache": recorded}))
        assert _default_cache(args, out) == out / "feature-cache"
    # nor through a symlink beside the drafter
    (phase1 / "feature-cache").rmdir()
    (phase1 / "feature-cache").symlink_to(victim)
    prov.write_text(json.dumps({"feature_cache": str(victim)}))
    assert _default_cache(args, out) == out / "feature-cache"
    prov.write_text("[not an object")
    assert _default_cache(args, out) == out / "feature-cache"
