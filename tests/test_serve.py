"""`vllm serve` with a MASSV drafter: images and text are answered, bad input gets a clear 4xx.

One server (tiny Qwen2.5-VL target + MASSV drafter, CPU) is shared by the module. Every bad
request must get a 4xx whose message names the problem, and the server must keep serving (a good
request succeeds after each one). These cases needed a patch: patches/image_media_io.py (a header
claiming a huge image was a 500; empty data), media_connector.py (a file:// URL was a 500),
media_fetch.py (an image URL that refuses connections or never answers was a 500, the latter
after 113 s), json_body.py (a JSON array as the body was a 500), input_processing_context.py
(processor errors now say why); and cpu_model_runner.py (on CPU, greedy answers changed when
sampled requests shared the batch). An image sent to a *text-only*
model is checked on the GPU (tests/gpu/test_load.py): a second server costs ~60 s on CPU; vLLM
answers it with "400: <model> is not a multimodal model" (also seen by hand on CPU).
"""

from __future__ import annotations

import base64
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from massv_vllm.engine import massv_spec
from massv_vllm.metrics import SpecCounters
from massv_vllm.testing.serve_utils import start_server
from massv_vllm.testing.synthetic import png_bytes as png
from massv_vllm.testing.synthetic import png_header_only
from massv_vllm.testing.tiny import synthetic_image

pytestmark = pytest.mark.engine

MAX_IMAGES = 2
MAX_MODEL_LEN = 1024


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def user(*image_urls: str, text: str = "Describe the image.") -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


GOOD_PNG = png(synthetic_image(0, (64, 48)))


@pytest.fixture(scope="module")
def server(tiny_qwen, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "massv-server.log"
    with start_server(
        tiny_qwen.target,
        massv_spec(str(tiny_qwen.drafter), 3),
        max_model_len=MAX_MODEL_LEN,
        max_images=MAX_IMAGES,
        log_path=log,
    ) as s:
        yield s


def good_request_works(server) -> None:
    status, body = server.chat(user(data_url(GOOD_PNG)), max_tokens=4, temperature=0)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]
    assert server.healthy()


def test_image_request_is_answered_with_massv_drafts(server):
    before = SpecCounters.from_prometheus(server.metrics_text())
    images = [data_url(png(synthetic_image(s, size))) for s, size in [(1, (224, 160)), (2, (56, 300))]]
    status, body = server.chat(user(*images), max_tokens=24, temperature=0)
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["message"]["content"]
    assert body["usage"]["completion_tokens"] > 1
    # Two images of the tiny processor's 28-px grid: the prompt holds their placeholder tokens.
    assert body["usage"]["prompt_tokens"] > (224 // 28) * (160 // 28) // 4
    delta = SpecCounters.from_prometheus(server.metrics_text()) - before
    assert delta.num_drafts > 0
    assert delta.num_draft_tokens >= delta.num_drafts
    assert len(delta.accepted_per_pos) == 3  # one counter per speculative position


def test_text_only_request(server):
    before = SpecCounters.from_prometheus(server.metrics_text())
    status, body = server.chat(
        [{"role": "user", "content": "Hello! How are you?"}], max_tokens=16, temperature=0
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["content"]
    assert (SpecCounters.from_prometheus(server.metrics_text()) - before).num_drafts > 0


def test_streaming_request(server):
    import urllib.request

    req = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps(
            {
                "model": server.model,
                "messages": user(data_url(GOOD_PNG)),
                "max_tokens": 12,
                "temperature": 0,
                "stream": True,
            }
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        lines = [ln.decode().strip() for ln in r if ln.strip()]
    assert lines[-1] == "data: [DONE]"
    text = "".join(
        (json.loads(ln[5:])["choices"] or [{}])[0].get("delta", {}).get("content") or "" for ln in lines[:-1]
    )
    status, body = server.chat(user(data_url(GOOD_PNG)), max_tokens=12, temperature=0)
    assert status == 200
    assert text == body["choices"][0]["message"]["content"]  # streamed == non-streamed at T=0


BAD_REQUESTS = {
    # name: (messages, extra params, substring the error message must contain)
    "corrupt_bytes": (user(data_url(b"this is not an image" * 8)), {}, "cannot identify image"),
    "truncated_png": (user(data_url(GOOD_PNG[: len(GOOD_PNG) // 2])), {}, "truncated"),
    "empty_data_url": (user("data:image/png;base64,"), {}, "empty"),
    "invalid_base64": (user("data:image/png;base64,@@not*base64@@"), {}, "base64"),
    "zero_width_png": (user(data_url(png_header_only(0, 32))), {}, "cannot identify image"),
    "decompression_bomb": (user(data_url(png_header_only(50_000, 50_000))), {}, "too large"),
    "too_many_images": (user(*[data_url(GOOD_PNG)] * (MAX_IMAGES + 1)), {}, f"At most {MAX_IMAGES} image"),
    "file_url_not_allowed": (user("file:///etc/hostname"), {}, "allowed-local-media-path"),
    # Nothing listens on port 1 (vLLM's own sockets take ephemeral ports); vLLM retries ~5 s.
    "image_url_connection_refused": (
        user("http://127.0.0.1:1/image.png"),
        {},
        "Failed to fetch media from URL http://127.0.0.1:1/image.png: cannot connect",
    ),
    "extreme_aspect_ratio": (user(data_url(png(synthetic_image(3, (1, 400))))), {}, "aspect ratio"),
    "prompt_too_long": (
        user(data_url(GOOD_PNG), text="The quick brown fox. " * 400),
        {},
        "maximum context length",
    ),
    "negative_max_tokens": (user(data_url(GOOD_PNG)), {"max_tokens": -1}, "max_tokens"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_clear_4xx_and_server_keeps_serving(server, name):
    messages, params, expected = BAD_REQUESTS[name]
    status, body = server.chat(messages, **{"max_tokens": 4, "temperature": 0, **params})
    assert 400 <= status < 500, (status, body)
    message = body["error"]["message"]
    assert expected.lower() in message.lower(), message
    assert server.alive()
    good_request_works(server)


def test_json_array_body_gets_clear_400(server):
    """patches/json_body.py: a JSON array was "500: 'list' object has no attribute 'get'"."""
    status, body = server.request("POST", "/v1/chat/completions", [{"model": server.model, "messages": []}])
    assert status == 400, (status, body)
    assert "The request body must be a JSON object" in body["error"]["message"]
    good_request_works(server)


@pytest.fixture
def silent_image_host():
    """A host that accepts connections and never answers (the probe's 500 after 113 s)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)  # the kernel completes the handshakes; nobody ever reads or writes
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/image.png"


def test_image_url_that_never_answers_gets_400_within_the_fetch_limit(server, silent_image_host):
    """patches/media_fetch.py: MASSV_MEDIA_FETCH_TIMEOUT_S (default 10 s) bounds vLLM's retries."""
    t0 = time.monotonic()
    status, body = server.chat(user(silent_image_host), max_tokens=4, temperature=0)
    assert 400 <= status < 500, (status, body)
    assert "no complete answer within 10 s" in body["error"]["message"]
    assert silent_image_host in body["error"]["message"]
    assert time.monotonic() - t0 < 30
    good_request_works(server)


def test_bad_requests_mixed_with_good_ones_concurrently(server):
    """Failures while other requests are in flight must not disturb them."""
    baseline_status, baseline = server.chat(user(data_url(GOOD_PNG)), max_tokens=16, temperature=0)
    assert baseline_status == 200
    jobs = [("good", user(data_url(GOOD_PNG)), {"max_tokens": 16})] * 6
    jobs += [(name, m, {"max_tokens": 4, **p}) for name, (m, p, _) in BAD_REQUESTS.items()]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: (j[0], *server.chat(j[1], temperature=0, **j[2])), jobs))
    for name, status, body in results:
        if name == "good":
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == baseline["choices"][0]["message"]["content"]
        else:
            assert 400 <= status < 500, (name, status, body)
    assert server.healthy()


def test_greedy_answers_unchanged_when_sampled_requests_share_the_batch(server):
    """vLLM's CPU rejection sampler expanded per-request temperatures into uninitialised memory
    whenever a batch was not all-greedy (patches/cpu_model_runner.py); greedy answers changed."""
    prompts = [user(data_url(png(synthetic_image(s, (96, 64))))) for s in range(4)]
    prompts += [[{"role": "user", "content": t}] for t in ("Hello!", "Describe a circle.")]
    alone = []
    for m in prompts:
        status, body = server.chat(m, max_tokens=16, temperature=0)
        assert status == 200, body
        alone.append(body["choices"][0]["message"]["content"])
    jobs = [(m, {"temperature": 0}) for m in prompts]
    jobs += [(prompts[i], {"temperature": 0.8, "seed": i}) for i in range(3)]
    jobs += [(prompts[i], {"temperature": 1.0}) for i in range(3, 6)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda j: server.chat(j[0], max_tokens=16, **j[1]), jobs))
    assert all(status == 200 for status, _ in results)
    together = [body["choices"][0]["message"]["content"] for _, body in results[: len(prompts)]]
    assert together == alone


def test_load_generator_sequential_vs_concurrent(server, tmp_path):
    """benchmarks/load.py against this server: the greedy answers of a sequential run (the
    reference) must survive 12 concurrent requests with images, streams, sampled requests and
    cancelled streams; no errors, cancelled streams aborted, server drained and healthy."""
    from benchmarks import load

    common = ["--url", server.url, "--requests", "12", "--max-images", str(MAX_IMAGES), "--max-tokens", "12",
              "--sampled-fraction", "0.25"]  # fmt: skip
    ref = tmp_path / "sequential.json"
    assert load.main([*common, "--cancel", "0", "--concurrency", "1", "--save-reference", str(ref)]) == 0
    out = tmp_path / "concurrent.json"
    # Cancelled streams ask for far more tokens than the ~1-3 s the server may take to see the
    # disconnect on a busy 2-core machine (at 200, all three once ran to completion).
    concurrent = ["--cancel", "3", "--cancel-max-tokens", "700", "--concurrency", "64"]
    assert load.main([*common, *concurrent, "--reference", str(ref), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["checks"]["answers_equal_reference"]
    assert report["runs"]["server"]["completed"] == 12
    assert report["runs"]["server"]["cancelled"] == 3


def test_load_reports_the_whole_server_process_trees_memory(server):
    """benchmarks/load.py's memory before/after: the API server's process and its engine process
    (a child), not just the process it started; no GPU memory where there is no nvidia-smi."""
    import psutil

    from benchmarks import load

    mem = load.server_memory(server.proc.pid)
    top = psutil.Process(server.proc.pid)
    assert top.children(recursive=True), "vllm serve runs its engine in a child process"
    assert mem["rss_mib"] > top.memory_info().rss / 2**20 + 50
    assert mem["gpu_mib"] is None and mem["gpu_scope"] is None
    gone = 2**22 + 12345  # above Linux's largest PID: no such process
    assert load.server_memory(gone) == {"rss_mib": None, "gpu_mib": None, "gpu_scope": None}


def test_serving_patches_are_registered():
    from vllm.connections import HTTPConnection
    from vllm.entrypoints.serve.utils import api_utils
    from vllm.multimodal.media.connector import MediaConnector
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.processing.context import InputProcessingContext
    from vllm.platforms import current_platform

    from massv_vllm.patches import apply_all, is_patched

    apply_all()
    expected = [
        (ImageMediaIO, "load_bytes", "image_media_io"),
        (MediaConnector, "_load_file_url", "media_connector"),
        (MediaConnector, "load_from_url_async", "media_fetch"),
        (HTTPConnection, "get_async_client", "media_fetch"),
        (api_utils, "validate_json_request", "json_body"),
        (InputProcessingContext, "call_hf_processor", "input_processing_context"),
    ]
    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        expected.append((CPUModelRunner, "_postprocess_triton", "cpu_model_runner"))
    missing = [mod for cls, name, mod in expected if not is_patched(cls, name)]
    assert not missing, f"add {missing} to PATCH_MODULES in patches/__init__.py"


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
def test_cpu_expand_kernel_keeps_dtype_and_values(dtype):
    from massv_vllm.patches.cpu_model_runner import expand_kernel_impl

    values = torch.tensor([0, 3, 5], dtype=dtype) if dtype != torch.float32 else torch.tensor([0.0, 0.8, 0.5])
    cu = torch.tensor([2, 2, 5], dtype=torch.int32)  # request 1 has no draft tokens
    out = torch.full((7,), -7, dtype=dtype)  # longer than cu[-1]: the tail stays untouched
    expand_kernel_impl(out, values, cu, replace_from=0, replace_to=1)
    one = torch.tensor([1], dtype=dtype)
    expected = torch.cat([one, one, values[2:].repeat(3), torch.tensor([-7, -7], dtype=dtype)])
    assert out.dtype == dtype
    assert torch.equal(out, expected)


def test_processor_error_summary_names_sizes_not_contents():
    from PIL import Image

    from massv_vllm.patches.input_processing_context import describe_inputs

    text = "secret prompt " * 1000
    summary = describe_inputs(
        {"text": text, "images": [Image.new("RGB", (1, 400)), Image.new("RGB", (5, 6))]}
    )
    assert summary == f"text of {len(text)} characters, 2 images (1x400, 5x6)"
