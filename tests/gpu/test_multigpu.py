"""Two GPUs (`nvidia-h200-x2`): what `tests/test_multiproc.py` checks on CPU processes, plus the
launchers and server a multi-GPU user runs. Skipped with fewer than two GPUs.

* `vllm serve --tensor-parallel-size 2` with a MASSV drafter answers an image request with drafts
  (the TP=2 lossless and MAL checks are `tests/test_multiproc.py`, which uses both GPUs here);
* `deepspeed --num_gpus 2` runs phase 1 and SDViT with ZeRO-2 and ZeRO-3: the loss falls, the saved
  drafter serves in vLLM, and a run killed after a checkpoint and resumed ends with the same
  weights as the uninterrupted one.

    python3 -m pytest tests/test_multiproc.py tests/gpu/test_multigpu.py -q -s
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from massv_vllm.engine import massv_spec
from massv_vllm.metrics import SpecCounters
from massv_vllm.testing.serve_utils import start_server
from massv_vllm.training.loop import CKPT_DIR, COMPLETE_MARK, read_log
from tests.test_training import _generated_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]
REPO = Path(__file__).resolve().parents[2]
# Four samples at global batch 4: every step sees the same batch, so "the loss falls" compares losses
# on the same data. (With 16 samples the first and last step saw different batches: on 2026-11-30
# phase 1's projector-only loss went 6.1800 -> 6.2123 on the H200, and identically on CPU.)
SAMPLES = 4
STEPS = ["--global-batch-size", "4", "--micro-batch-size", "1", "--max-steps", "6", "--warmup-steps", "0",
         "--lr", "1e-2", "--no-progress", "--dtype", "fp32", "--save-every", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from massv_vllm.testing.tiny import build_tiny_set

    return build_tiny_set(tmp_path_factory.mktemp("tiny"), "qwen2_5_vl")


def test_tp2_server_answers_an_image_request(tiny, tmp_path):
    from massv_vllm.testing.tiny import synthetic_image
    from tests.test_serve import data_url, png, user

    with start_server(
        tiny.target, massv_spec(str(tiny.drafter), 3), tensor_parallel_size=2, max_model_len=2048,
        max_images=1, log_path=tmp_path / "serve.log",
    ) as server:  # fmt: skip
        before = SpecCounters.from_prometheus(server.metrics_text())
        status, body = server.chat(user(data_url(png(synthetic_image(1, (224, 160))))), max_tokens=16)
        assert status == 200, body
        delta = SpecCounters.from_prometheus(server.metrics_text()) - before
        print(f"\nTP=2 server: {body['usage']}, drafts {delta.num_drafts}")
        assert body["choices"][0]["message"]["content"] and delta.num_drafts > 0


def _deepspeed(script: str, tiny, data, out: Path, zero: str, *extra: str, kill_after: int | None = None):
    """``deepspeed --num_gpus 2 train/<script>``; ``kill_after``: SIGKILL the launcher's group once
    the checkpoint of that step is complete (a crash mid-run)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = ["deepspeed", "--num_gpus", "2", str(REPO / "train" / script),
           "--deepspeed_config", str(REPO / f"train/configs/{zero}.json"), "--drafter", str(tiny.drafter),
           "--target", str(tiny.target), "--data", str(data), "--out", str(out), *STEPS, *extra]  # fmt: skip
    if shutil.which("deepspeed") is None:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", *cmd[1:]]
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if kill_after is not None:
        mark = out / CKPT_DIR / f"step-{kill_after:07d}" / COMPLETE_MARK
        deadline = time.monotonic() + 600
        while not mark.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
    log, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, log[-4000:]
    return out / "drafter"


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
@pytest.mark.parametrize("script", ["pretrain_projector.py", "sdvit.py"])
def test_two_gpu_training_and_resume(tiny, tmp_path, script, zero):
    from massv_vllm.testing.synthetic import write_llava_set

    if script == "sdvit.py":
        data = _generated_jsonl(tmp_path / "data", tiny, SAMPLES)
    else:
        data = write_llava_set(tmp_path / "data", SAMPLES)
    extra = ["--image-root", str(Path(data).parent)] if script == "sdvit.py" else []
    straight = _deepspeed(script, tiny, data, tmp_path / "straight", zero, *extra)
    log = read_log(straight.parent / "train_log.jsonl")
    print(f"\n{script} {zero}: loss {log[0]['loss']:.4f} -> {log[-1]['loss']:.4f}")
    assert [sorted(r["samples"]) for r in log] == [list(range(SAMPLES))] * 6  # the same batch each step
    assert len(log) == 6 and log[-1]["loss"] < log[0]["loss"]
    _deepspeed(script, tiny, data, tmp_path / "killed", zero, *extra, kill_after=4)
    resumed = _deepspeed(script, tiny, data, tmp_path / "killed", zero, *extra, "--resume")
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)
    # the drafter serves: vLLM loads it and drafts
    from massv_vllm.engine import make_llm, shutdown
    from massv_vllm.testing.lossless import greedy, prompt_suite

    llm = make_llm(str(tiny.target), massv_spec(str(straight), 3), max_model_len=2048, enforce_eager=True)
    try:
        before = SpecCounters.from_llm(llm)
        greedy(llm, prompt_suite(2, max_images=1), max_tokens=8)
        assert (SpecCounters.from_llm(llm) - before).num_drafts > 0
    finally:
        shutdown(llm)
