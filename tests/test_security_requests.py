"""Bad requests the OpenAI server answered with 500 (or after 113 s): patches/json_body.py and
patches/media_fetch.py, exercised in-process on CPU (no engine). tests/test_serve.py repeats the
first three against a real `vllm serve`.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import socket
import threading
import time

import pytest

from massv_vllm.patches import apply_all

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture
def massv_server_env(monkeypatch):
    """What a MASSV server process looks like to the request patches (patches/envs.py)."""
    apply_all()
    monkeypatch.setenv("MASSV_ACTIVE", "1")
    for env in (
        "MASSV_PATCH_JSON_BODY_ERRORS",
        "MASSV_PATCH_URL_FETCH_ERRORS",
        "MASSV_BLOCK_PRIVATE_MEDIA_URLS",
    ):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.delenv("MASSV_MEDIA_FETCH_TIMEOUT_S", raising=False)
    return monkeypatch


# --- A JSON body that is not an object --------------------------------------------------------


@pytest.fixture(scope="module")
def api_client():
    """vLLM's own FastAPI app (routes, dependencies, exception handlers), without an engine."""
    apply_all()  # before build_app imports the routers, as in `vllm serve`
    from fastapi.testclient import TestClient
    from vllm.entrypoints.openai.api_server import build_app
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args([])
    return TestClient(build_app(args, ("generate",), None), raise_server_exceptions=False)


@pytest.mark.parametrize("body", [[{"role": "user", "content": "hi"}], "hello", 3, None, True])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_body_that_is_not_a_json_object_is_a_400(api_client, massv_server_env, path, body):
    import json

    r = api_client.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert "The request body must be a JSON object" in r.json()["error"]["message"]


def test_body_check_is_scoped_and_switchable(api_client, massv_server_env):
    """Outside a MASSV server, or switched off, vLLM's own handling runs (a 500 in vLLM 0.26.0)."""
    massv_server_env.setenv("MASSV_PATCH_JSON_BODY_ERRORS", "0")
    assert api_client.post("/v1/chat/completions", json=[1]).status_code == 500
    massv_server_env.delenv("MASSV_PATCH_JSON_BODY_ERRORS")
    massv_server_env.delenv("MASSV_ACTIVE")
    assert api_client.post("/v1/chat/completions", json=[1]).status_code == 500
    massv_server_env.setenv("MASSV_PATCH_JSON_BODY_ERRORS", "always")
    assert api_client.post("/v1/chat/completions", json=[1]).status_code == 400


def test_object_bodies_still_reach_validation(api_client, massv_server_env):
    r = api_client.post("/v1/chat/completions", json={"model": "m", "messages": "not a list"})
    assert r.status_code == 400 and "messages" in r.text
    r = api_client.post(
        "/v1/chat/completions", content=b"[1, 2", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400  # not JSON at all: FastAPI's own answer, unchanged


# --- Media URLs ------------------------------------------------------------------------------


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "PNG")
    return buf.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    png = _png()
    redirect_to = ""

    def do_GET(self):
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_host():
    """An HTTP server on loopback serving /img.png and /redirect (to ``_Handler.redirect_to``)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def silent_host():
    """Accepts connections and never answers (the probe's 113-second 500)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def fetch_image(url: str, allowed_media_domains: list[str] | None = None):
    """What the OpenAI server does for an image_url part: MediaConnector.fetch_image_async."""
    from vllm.connections import HTTPConnection
    from vllm.multimodal.media.connector import MediaConnector

    async def run():
        connection = HTTPConnection()  # its aiohttp session belongs to this event loop
        connector = MediaConnector(connection=connection, allowed_media_domains=allowed_media_domains)
        try:
            return await connector.fetch_image_async(url)
        finally:
            for client in (connection._async_client, getattr(connection, "_massv_guarded_client", None)):
                if client is not None:
                    await client.close()

    return asyncio.run(run())


@pytest.fixture
def one_attempt(monkeypatch):
    """vLLM retries a refused connection 3 times with 1 + 4 s sleeps; tests need one attempt."""
    import vllm.envs

    monkeypatch.setattr(vllm.envs, "VLLM_MEDIA_FETCH_MAX_RETRIES", 1, raising=False)


def test_image_url_served_over_http_still_loads(massv_server_env, image_host):
    assert fetch_image(f"http://127.0.0.1:{image_host}/img.png").size == (8, 8)


def test_connection_refused_is_a_400_naming_the_url(massv_server_env, one_attempt):
    url = f"http://127.0.0.1:{closed_port()}/img.png"
    with pytest.raises(ValueError) as e:  # ValueError: the OpenAI server's 400
        fetch_image(url)
    assert f"Failed to fetch media from URL {url}: cannot connect" in str(e.value)


def test_silent_host_is_a_400_after_the_fetch_time_limit(massv_server_env, silent_host):
    massv_server_env.setenv("MASSV_MEDIA_FETCH_TIMEOUT_S", "1.5")
    url = f"http://127.0.0.1:{silent_host}/img.png"
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"no complete answer within 1.5 s \(MASSV_MEDIA_FETCH_TIMEOUT_S\)"):
        fetch_image(url)
    assert time.monotonic() - t0 < 5


def test_fetch_time_limit_defaults(monkeypatch):
    from massv_vllm.patches import PatchError
    from massv_vllm.patches.envs import media_fetch_timeout_s

    monkeypatch.delenv("MASSV_MEDIA_FETCH_TIMEOUT_S", raising=False)
    assert media_fetch_timeout_s(5) == 10  # images: VLLM_IMAGE_FETCH_TIMEOUT is 5 s per attempt
    assert media_fetch_timeout_s(30) == 30  # videos: never below vLLM's own first attempt
    monkeypatch.setenv("MASSV_MEDIA_FETCH_TIMEOUT_S", "0")
    with pytest.raises(PatchError, match="expected seconds"):
        media_fetch_timeout_s(5)


def test_private_hosts_are_fetched_by_default(massv_server_env, image_host):
    """vLLM's behaviour stays the default: loopback URLs are fetched."""
    assert fetch_image(f"http://localhost:{image_host}/img.png").size == (8, 8)


@pytest.mark.parametrize(
    ("host", "needle"),
    [("127.0.0.1", "its host 127.0.0.1 is a loopback address"), ("localhost", "resolves to 127.0.0.1")],
)
def test_private_hosts_can_be_refused(massv_server_env, image_host, host, needle):
    massv_server_env.setenv("MASSV_BLOCK_PRIVATE_MEDIA_URLS", "1")
    with pytest.raises(ValueError) as e:
        fetch_image(f"http://{host}:{image_host}/img.png")
    assert "Refused media URL" in str(e.value) and needle in str(e.value)


def test_allowed_media_domains_are_exempt_but_their_redirects_are_checked(massv_server_env, image_host):
    massv_server_env.setenv("MASSV_BLOCK_PRIVATE_MEDIA_URLS", "1")
    assert fetch_image(f"http://127.0.0.1:{image_host}/img.png", ["127.0.0.1"]).size == (8, 8)
    _Handler.redirect_to = f"http://127.0.0.1:{image_host}/img.png"
    with pytest.raises(ValueError, match="its host 127.0.0.1 is a loopback address"):
        fetch_image(f"http://localhost:{image_host}/redirect", ["localhost"])


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("169.254.169.254", "link-local"),  # cloud metadata endpoints
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "private"),
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("8.8.8.8", None),
        ("2606:4700::1111", None),
    ],
)
def test_non_public_address_kinds(address, kind):
    from massv_vllm.patches.media_fetch import non_public_kind

    assert non_public_kind(address) == kind
