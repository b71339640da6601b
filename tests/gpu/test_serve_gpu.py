"""(c) `vllm serve TARGET --speculative-config '{"method":"massv",...}'` on the GPU: an OpenAI chat
request with a base64 image is answered, text-only requests too, and /metrics counts drafts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from massv_vllm.metrics import SpecCounters
from massv_vllm.testing.serve_utils import Server, free_port, log_tail
from massv_vllm.testing.tiny import build_tiny_set, synthetic_image
from tests.gpu.conftest import ON_CPU

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tiny = build_tiny_set(tmp_path_factory.mktemp("tiny"), "qwen2_5_vl")
    spec = {"method": "massv", "model": str(tiny.drafter), "num_speculative_tokens": 5}
    port = free_port()
    # `vllm serve` through its module (the GPU kit's `vllm` launcher script has no __main__ guard,
    # which breaks spawned engine processes); the CPU wheel's metadata breaks the CLI entirely.
    cli = (
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
        if ON_CPU
        else [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    )
    argv = [
        *cli,
        str(tiny.target),
        "--speculative-config",
        json.dumps(spec),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--max-model-len",
        "2048",
        "--dtype",
        "float32",
        "--limit-mm-per-prompt",
        json.dumps({"image": 2, "video": 0}),
        "--enforce-eager",
    ]
    if ON_CPU:
        argv += ["--block-size", "16", "--kv-cache-memory-bytes", str(512 << 20)]
    log = tmp_path_factory.mktemp("log") / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "VLLM_NO_USAGE_STATS": "1"},
        )
    srv = Server(proc, port, log, str(tiny.target), argv)
    deadline = time.time() + 600
    while not srv.healthy():
        assert proc.poll() is None and time.time() < deadline, log_tail(log)
        time.sleep(2)
    print("\n$", " ".join(argv))
    yield srv
    srv.stop()


def test_serve_answers_image_chat_and_counts_drafts(server):
    from vllm.multimodal.utils import encode_image_url

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
    print("  /metrics delta:", delta, "MAL", delta.mean_accepted_length)
    assert delta.num_drafts > 0 and delta.num_draft_tokens == 5 * delta.num_drafts
    assert len(delta.accepted_per_pos) == 5
