"""`vllm serve` with MASSV on the GPU, in each form the README shows: an OpenAI chat request with a
base64 image is answered, a text-only one too, and /metrics counts drafts (γ per position).

* ``json``: ``vllm serve TARGET --speculative-config '{"method": "massv", ...}'``;
* ``spec-model``: ``vllm serve TARGET --spec-model DRAFTER`` (γ from the drafter folder);
* ``drafter-folder``: ``vllm serve DRAFTER`` (speculators style: the folder names its target).

Started through the project's own helper (``serve_utils.start_command``) with vLLM's CLI module
(the GPU kit's ``vllm`` launcher has no __main__ guard, which breaks spawned engine processes).
``MASSV_GPU_TESTS_ON_CPU=1`` dry-runs it on the CPU engine.
"""

from __future__ import annotations

import json
import sys

import pytest

from massv_vllm.metrics import SpecCounters
from massv_vllm.testing.serve_utils import start_command
from massv_vllm.testing.tiny import build_tiny_set, synthetic_image
from tests.gpu.conftest import ON_CPU

pytestmark = pytest.mark.gpu
GAMMA = 5  # build_tiny_set's drafters record γ=5 (the spec-model and drafter-folder forms read it)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_set(tmp_path_factory.mktemp("tiny"), "qwen2_5_vl")


def form_args(form: str, tiny) -> list[str]:
    if form == "json":
        spec = {"method": "massv", "model": str(tiny.drafter), "num_speculative_tokens": GAMMA}
        return [str(tiny.target), "--speculative-config", json.dumps(spec)]
    if form == "spec-model":
        return [str(tiny.target), "--spec-model", str(tiny.drafter)]
    return [str(tiny.drafter)]


@pytest.mark.parametrize("form", ["json", "spec-model", "drafter-folder"])
def test_serve_answers_image_chat_and_counts_drafts(form, tiny, tmp_path):
    from vllm.multimodal.utils import encode_image_url

    argv = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *form_args(form, tiny),
            "--served-model-name", "massv", "--max-model-len", "2048", "--dtype", "float32",
            "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 0}), "--enforce-eager"]  # fmt: skip
    if ON_CPU:
        argv += ["--block-size", "16", "--kv-cache-memory-bytes", str(512 << 20)]
    with start_command(argv, model="massv", log_path=tmp_path / "serve.log") as server:
        print("\n$", " ".join(server.argv))
        before = SpecCounters.from_prometheus(server.metrics_text())
        image = {"type": "image_url", "image_url": {"url": encode_image_url(synthetic_image(5, (320, 200)))}}
        status, body = server.chat(
            [{"role": "user", "content": [image, {"type": "text", "text": "Describe the image."}]}],
            max_tokens=32,
            temperature=0.0,
        )
        assert status == 200, body
        assert body["usage"]["completion_tokens"] > 0
        status, body = server.chat(
            [{"role": "user", "content": "Hello, text only."}], max_tokens=16, temperature=0.0
        )
        assert status == 200, body
        delta = SpecCounters.from_prometheus(server.metrics_text()) - before
        print(f"  [{form}] /metrics delta:", delta, "MAL", delta.mean_accepted_length)
        assert delta.num_drafts > 0 and delta.num_draft_tokens == GAMMA * delta.num_drafts
        assert len(delta.accepted_per_pos) == GAMMA
