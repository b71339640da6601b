"""MediaConnector / HTTPConnection (vllm/multimodal/media/connector.py, vllm/connections.py, vLLM
0.26.0): a media URL the server cannot fetch is a 400 in bounded time; internal hosts can be refused.

vLLM turns 4xx answers of an image host into a 422, but re-raises everything else raw, which the
OpenAI server answers with 500: a refused connection ("Cannot connect to host 127.0.0.1:9 ...",
after ~5 s of retries), a DNS failure, a 5xx of the image host, and a host that accepts and never
answers. The last one took 113 s and gave a 500 with an *empty* message: ``VLLM_IMAGE_FETCH_TIMEOUT``
(5 s) is per attempt, and ``VLLM_MEDIA_FETCH_MAX_RETRIES`` (3) retries with x4 growing timeouts
and sleeps (5 + 1 + 20 + 4 + 80 s), raising a bare ``TimeoutError``. The patch

* bounds the whole fetch of an http(s) URL, retries included, by ``MASSV_MEDIA_FETCH_TIMEOUT_S``
  (default 10 s, or vLLM's per-attempt timeout for the modality if longer: video 30 s);
* answers fetch failures and that timeout with 400 naming the URL and the cause. 400 rather than
  408 or 504: 408 says the *client* was too slow sending its request (and invites resending it
  unchanged), 504 is a 5xx that would page the operator for a URL the client chose; the client
  fixes it by sending a reachable URL or the image as a data: URL, like vLLM's other bad-media 400s;
* with ``MASSV_BLOCK_PRIVATE_MEDIA_URLS=1``, refuses (400) URLs whose host is, or resolves to, a
  loopback, private, link-local or otherwise non-public address, at the first request and at every
  redirect. It builds on vLLM's ``--allowed-media-domains`` allow-list: hosts listed there are the
  operator's explicit choice and are not refused. The check resolves the name just before aiohttp
  does; a DNS server that answers differently a moment later (DNS rebinding) is not covered, so a
  hard guarantee still needs an egress firewall.

Only the async path (``load_from_url_async``, what ``vllm serve`` uses) changes; the sync path of
the offline ``LLM`` fetches URLs its own caller chose.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import socket
from typing import Any

from massv_vllm.patches import replace_method
from massv_vllm.patches.envs import block_private_media_urls, media_fetch_timeout_s, request_patch_applies

VLLM_MODULE = "vllm.multimodal.media.connector"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_URL_FETCH_ERRORS",)

# Hosts of the MediaConnector's --allowed-media-domains, for the checks inside the HTTP client.
_exempt_hosts: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "massv_exempt_media_hosts", default=frozenset()
)


class BlockedMediaURL(Exception):
    """A media URL (or a redirect) to a non-public host. Deliberately neither ``ValueError`` nor
    ``ConnectionError``: vLLM must not retry it nor rewrite it into "Invalid URL"."""


def non_public_kind(address: str) -> str | None:
    """What kind of non-public address ``address`` is (None: a public one)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


async def check_public_host(host: str | None, port: int | None) -> None:
    """Raise ``BlockedMediaURL`` unless every address of ``host`` is public (or it is exempt)."""
    if not host:
        raise BlockedMediaURL("the URL has no host")
    host = host.strip("[]").rstrip(".").lower()
    if host in _exempt_hosts.get():
        return
    try:
        addresses = [str(ipaddress.ip_address(host.split("%", 1)[0]))]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port or 80, type=socket.SOCK_STREAM)
        except OSError as e:
            raise BlockedMediaURL(f"its host {host} cannot be resolved ({e})") from None
        addresses = sorted({info[4][0] for info in infos})
    for address in addresses:
        kind = non_public_kind(address)
        if kind is not None:
            at = "is" if address == host else f"resolves to {address},"
            raise BlockedMediaURL(
                f"its host {host} {at} a {kind} address; this server refuses media URLs of non-public "
                "hosts (MASSV_BLOCK_PRIVATE_MEDIA_URLS=1; hosts in --allowed-media-domains are exempt)"
            )


def _guarded() -> bool:
    return block_private_media_urls() and request_patch_applies(SWITCHES[0])


async def _on_request_start(session, ctx, params) -> None:
    if _guarded():
        await check_public_host(params.url.host, params.url.port)


async def _on_request_redirect(session, ctx, params) -> None:
    if not _guarded():
        return
    from yarl import URL

    location = params.response.headers.get("Location") or params.response.headers.get("URI")
    if location:
        target = URL(location)
        target = target if target.absolute else params.url.join(target)
        await check_public_host(target.host, target.port)


def _short(url: str, n: int = 200) -> str:
    return url if len(url) <= n else url[:n] + "..."


def fetch_failure(url: str, exc: BaseException, limit: float, expired: bool) -> ValueError:
    """The 400 error for a failed fetch of ``url``: names the URL and the cause."""
    import aiohttp
    import requests

    if expired:
        cause = (
            f"no complete answer within {limit:g} s (MASSV_MEDIA_FETCH_TIMEOUT_S); send a reachable URL "
            "or the image itself as a data: URL"
        )
    elif isinstance(exc, aiohttp.ClientResponseError):
        cause = f"the host answered HTTP {exc.status}"
    elif isinstance(exc, requests.HTTPError) and exc.response is not None:
        cause = f"the host answered HTTP {exc.response.status_code}"
    elif isinstance(exc, TimeoutError):
        cause = "the host did not answer in time"
    elif isinstance(exc, (aiohttp.ClientConnectionError, requests.ConnectionError, ConnectionError)):
        cause = f"cannot connect ({exc or type(exc).__name__})"
    else:
        cause = f"{type(exc).__name__}: {exc}"
    return ValueError(f"Failed to fetch media from URL {_short(url)}: {cause}")


def apply() -> None:
    import aiohttp
    import requests
    from urllib3.util import parse_url
    from vllm.connections import HTTPConnection
    from vllm.multimodal.media.connector import MediaConnector

    block_private_media_urls()  # a bad setting fails at start-up (PatchError), not per request
    media_fetch_timeout_s(None)
    fetch_errors = (aiohttp.ClientError, requests.RequestException, TimeoutError, ConnectionError)

    def make_load(original):
        async def load_from_url_async(self, url: str, media_io: Any, *, fetch_timeout: int | None = None):
            scheme = parse_url(url).scheme if url[:5].lower() != "data:" else "data"
            if not (scheme and scheme.startswith("http")) or not request_patch_applies(SWITCHES[0]):
                return await original(self, url, media_io, fetch_timeout=fetch_timeout)
            limit = media_fetch_timeout_s(fetch_timeout)
            exempt = frozenset(h.lower() for h in self.allowed_media_domains or ())
            token = _exempt_hosts.set(exempt)
            deadline = asyncio.timeout(limit)
            try:
                async with deadline:
                    return await original(self, url, media_io, fetch_timeout=fetch_timeout)
            except BlockedMediaURL as e:
                raise ValueError(f"Refused media URL {_short(url)}: {e}") from None
            except fetch_errors as e:
                raise fetch_failure(url, e, limit, deadline.expired()) from e
            finally:
                _exempt_hosts.reset(token)

        return load_from_url_async

    def make_client(original):
        async def get_async_client(self):
            if not _guarded():
                return await original(self)
            # A session of its own whose trace hooks check the first request and every redirect;
            # otherwise what vLLM creates (aiohttp.ClientSession(trust_env=True)).
            client = self.__dict__.get("_massv_guarded_client")
            if client is None or client.closed or not self.reuse_client:
                trace = aiohttp.TraceConfig()
                trace.on_request_start.append(_on_request_start)
                trace.on_request_redirect.append(_on_request_redirect)
                client = aiohttp.ClientSession(trust_env=True, trace_configs=[trace])
                self._massv_guarded_client = client
            return client

        return get_async_client

    replace_method(
        MediaConnector,
        "load_from_url_async",
        make_load,
        expect=("self", "url", "media_io", "fetch_timeout"),
    )
    replace_method(HTTPConnection, "get_async_client", make_client, expect=("self",))
