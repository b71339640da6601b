"""Several processes on the CPU: what a multi-GPU user runs, short of the GPUs.

* `torchrun --nproc_per_node 2 train/sdvit.py` with ZeRO-2 and ZeRO-3: the loss falls, and the
  drafter saved equals a one-process run's in format and (within tolerance) in weights.
* A tensor-parallel (TP=2) target with a MASSV drafter (vLLM requires draft TP = target TP): T=0
  outputs equal the TP=2 target alone, for a mirror drafter (the target's own text stack, heads
  4/2 KV split over the two ranks) whose drafts are accepted (MAL >= γ + 0.5 on text-only prompts,
  > 2 on image prompts), and for the random tiny drafter (low acceptance; its single KV head is
  replicated on both ranks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from massv_vllm.training.loop import read_log
from tests.test_training import _generated_jsonl

REPO = Path(__file__).resolve().parent.parent
# fp32 everywhere: "--dtype auto" trains in bf16 on a GPU, where one- and two-process weights cannot
# agree within 1e-5. (On the 2-GPU H200, 2026-11-30, both tests failed; the messages were lost with
# the call that ran past its time, and bf16 is what differs from the CPU run.)
TRAIN_ARGS = ["--global-batch-size", "4", "--micro-batch-size", "1", "--max-steps", "6", "--warmup-steps", "0",
              "--lr", "1e-3", "--no-progress", "--dtype", "fp32"]  # fmt: skip


def _sdvit(launcher, tiny, data, out, zero, cache):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    cmd = [*launcher, str(REPO / "train/sdvit.py"), "--deepspeed_config", str(REPO / f"train/configs/{zero}.json"),
           "--drafter", str(tiny.drafter), "--target", str(tiny.target), "--data", str(data), "--out", str(out),
           "--feature-cache", str(cache), *TRAIN_ARGS]  # fmt: skip
    res = subprocess.run(cmd, env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out / "drafter"


@pytest.fixture(scope="module")
def runs(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("multiproc")
    data = _generated_jsonl(root, tiny_qwen, 16)
    cache = root / "cache"
    one = _sdvit([sys.executable], tiny_qwen, data, root / "one", "zero0", cache)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    two = {z: _sdvit(torchrun, tiny_qwen, data, root / z, z, cache) for z in ("zero2", "zero3")}
    return one, two


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_process_sdvit_matches_one_process(runs, zero):
    one, two = runs
    d = two[zero]
    log = [r for r in read_log(d.parent / "train_log.jsonl") if r.get("event") == "step"]
    assert len(log) == 6 and log[-1]["loss"] < log[0]["loss"]
    cfg_one, cfg_two = (json.loads((x / "config.json").read_text()) for x in (one, d))
    assert cfg_two["massv"] == cfg_one["massv"] and cfg_two["architectures"] == cfg_one["architectures"]
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(d / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        assert w1[k].shape == w2[k].shape and w1[k].dtype == w2[k].dtype, k
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=k)
    assert not torch.equal(w2["projector.linears.0.weight"], _initial(d)["projector.linears.0.weight"])


def _initial(trained: Path) -> dict[str, torch.Tensor]:
    """The untrained drafter the run started from (recorded in its provenance)."""
    prov = json.loads((trained / "provenance.json").read_text())
    return load_file(str(Path(prov["inputs"]["drafter"]) / "model.safetensors"))


TP_GAMMA = 3
TP_MAX_TOKENS = 12
TP_KW = dict(
    max_model_len=1024, dtype="float32", tensor_parallel_size=2, max_num_batched_tokens=128, max_num_seqs=4
)


def _tp_run(tiny, spec):
    """T=0 outputs and counter deltas of a TP=2 engine, text-only and image prompts in a batch each."""
    from massv_vllm.engine import make_llm, shutdown
    from massv_vllm.testing.lossless import prompt_suite
    from tests.engine_checks import greedy_by_kind

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        pytest.skip("TP=2 needs two GPUs")
    with pytest.MonkeyPatch.context() as mp:
        # vLLM's CPU workers bind one NUMA node each unless told which cores to use.
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        llm = make_llm(str(tiny.target), spec, **TP_KW)
        try:
            return greedy_by_kind(llm, prompt_suite(6, max_images=2, long_words=100), TP_MAX_TOKENS)
        finally:
            shutdown(llm)


@pytest.fixture(scope="module")
def tp_reference(tiny_qwen):
    return _tp_run(tiny_qwen, None)[0]


def _assert_tp_lossless(reference, outs, counters) -> None:
    from massv_vllm.testing.lossless import divergences

    assert outs.keys() == reference.keys() == {"text", "image"}
    for kind in outs:
        assert divergences(reference[kind], outs[kind]) == [], kind
        c = counters[kind]
        assert c.num_drafts > 0 and c.num_draft_tokens == TP_GAMMA * c.num_drafts


@pytest.mark.engine
def test_tensor_parallel_target_with_mirror_drafter(tiny_qwen, tp_reference, tmp_path):
    from massv_vllm.engine import massv_spec
    from massv_vllm.testing.tiny import make_mirror_drafter

    drafter = make_mirror_drafter(tiny_qwen.target, tiny_qwen.tokenizer, tmp_path / "mirror")
    outs, counters = _tp_run(tiny_qwen, massv_spec(str(drafter), TP_GAMMA))
    _assert_tp_lossless(tp_reference, outs, counters)
    mals = {k: c.mean_accepted_length for k, c in counters.items()}
    print(f"\nTP=2 mirror drafter MAL: {mals}")
    assert mals["text"] >= TP_GAMMA + 0.5 and mals["image"] > 2.0, mals


@pytest.mark.engine
def test_tensor_parallel_low_acceptance_drafter(tiny_qwen, tp_reference):
    from massv_vllm.engine import massv_spec

    outs, counters = _tp_run(tiny_qwen, massv_spec(str(tiny_qwen.drafter), TP_GAMMA))
    _assert_tp_lossless(tp_reference, outs, counters)
    assert all(c.mean_accepted_length < 2.0 for c in counters.values())  # mostly rejected
