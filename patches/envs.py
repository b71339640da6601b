"""One environment variable per patch (the pattern of ArcticInference's ``envs.py``).

Each switch takes ``1`` (on, the default except where the table says) or ``0`` (off: the patch is
not installed and vLLM's own code runs). Every patch also has a *scope*: it acts only on engines that serve a MASSV drafter,
except the position fix, which serves any ``draft_model`` of an M-RoPE target. ``always`` widens
the scope of the bad-request and CPU-sampler fixes to every engine of the environment.

| variable | patch | scope |
|---|---|---|
| ``MASSV_PATCH_ALIAS`` | ``"method": "massv"`` alias, drafter checks, Gemma3 hybrid-KV setting | MASSV |
| ``MASSV_PATCH_DRAFT_POSITIONS`` | 1-D draft positions for M-RoPE targets | any draft model of an M-RoPE target |
| ``MASSV_PATCH_DRAFT_IMAGES`` | image embeddings reach the drafter (window, layout, log line) | MASSV |
| ``MASSV_PATCH_DRAFT_WINDOWS`` | each drafter layer's attention metadata carries its own sliding window | MASSV |
| ``MASSV_FAST_DRAFT`` | draft decode steps as full CUDA graphs (eager loop on CPU) | MASSV |
| ``MASSV_FAST_DRAFT_FIRST_PASS`` | also the first draft pass of decode steps, the only one with parallel drafting | MASSV |
| ``MASSV_FAST_DRAFT_ONE_GRAPH`` | draft steps 2..γ as one graph, not one per step (default ``0``) | MASSV |
| ``MASSV_PATCH_COMPILE_CACHE_KEY`` | the drafter is part of the torch.compile cache key | MASSV |
| ``MASSV_PATCH_KV_WINDOWS`` | layers of different sliding windows keep their own windows in one KV-cache group (and start) | MASSV (``always``: all) |
| ``MASSV_PATCH_CPU_REJECTION_SAMPLER`` | CPU rejection sampler keeps dtypes | MASSV (``always``: all) |
| ``MASSV_PATCH_CPU_SEEDED_CHUNKS`` | seeded requests survive chunked prefill on CPU | MASSV (``always``: all) |
| ``MASSV_PATCH_IMAGE_ERRORS`` | oversized / empty images are a 400 | MASSV (``always``: all) |
| ``MASSV_PATCH_FILE_URL_ERRORS`` | refused ``file://`` URLs are a 400 | MASSV (``always``: all) |
| ``MASSV_PATCH_PROCESSOR_ERRORS`` | processor errors name their cause | MASSV (``always``: all) |
| ``MASSV_PATCH_JSON_BODY_ERRORS`` | a body that is not a JSON object is a 400 | MASSV (``always``: all) |
| ``MASSV_PATCH_URL_FETCH_ERRORS`` | failed / silent media URL fetches are a 400, in bounded time | MASSV (``always``: all) |

Settings of the URL-fetch patch (they act where it acts):

| variable | default | meaning |
|---|---|---|
| ``MASSV_MEDIA_FETCH_TIMEOUT_S`` | 10, or vLLM's per-attempt fetch timeout if longer | seconds one media URL may take, vLLM's retries included |
| ``MASSV_BLOCK_PRIVATE_MEDIA_URLS`` | 0 (vLLM's behaviour) | 1: refuse http(s) media URLs (and redirects) to loopback, private, link-local and other non-public addresses |

"MASSV" for the request-handling patches means: the process (or the process that started it)
resolved a MASSV speculative config; ``MASSV_ACTIVE`` carries that to vLLM's child processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ACTIVE_ENV = "MASSV_ACTIVE"  # set by the alias patch in process 0, inherited by engine processes


@dataclass(frozen=True)
class Switch:
    env: str
    doc: str
    widenable: bool = False  # accepts "always"
    default: str = "1"

    def value(self) -> str:
        raw = os.environ.get(self.env, self.default).strip().lower()
        allowed = ("0", "1", "always") if self.widenable else ("0", "1")
        if raw not in allowed:
            from massv_vllm.patches import PatchError

            raise PatchError(f"{self.env}={raw!r}: expected one of {', '.join(allowed)}")
        return raw

    def enabled(self) -> bool:
        return self.value() != "0"

    def always(self) -> bool:
        return self.value() == "always"


SWITCHES: dict[str, Switch] = {
    s.env: s
    for s in (
        Switch("MASSV_PATCH_ALIAS", '"massv" alias and drafter checks in process 0'),
        Switch("MASSV_PATCH_DRAFT_POSITIONS", "1-D draft positions and KV slots for M-RoPE targets"),
        Switch("MASSV_PATCH_DRAFT_IMAGES", "target image embeddings reach MASSV drafters"),
        Switch("MASSV_PATCH_DRAFT_WINDOWS", "one attention-metadata group per sliding window of the drafter"),
        Switch("MASSV_FAST_DRAFT", "MASSV draft decode steps replayed as full CUDA graphs"),
        Switch(
            "MASSV_FAST_DRAFT_FIRST_PASS",
            "the first draft pass of decode steps (parallel drafting's only one) as a full CUDA graph too",
        ),
        Switch(
            "MASSV_FAST_DRAFT_ONE_GRAPH",
            "draft steps 2..γ captured as one CUDA graph instead of one per step (off: 1-2 % slower on an H200)",
            default="0",
        ),
        Switch("MASSV_PATCH_COMPILE_CACHE_KEY", "MASSV drafters get their own torch.compile cache"),
        Switch(
            "MASSV_PATCH_KV_WINDOWS",
            "layers of different sliding windows keep their own windows in one KV-cache group",
            True,
        ),
        Switch("MASSV_PATCH_CPU_REJECTION_SAMPLER", "dtype-preserving expand kernel on CPU", True),
        Switch("MASSV_PATCH_CPU_SEEDED_CHUNKS", "seeded requests with chunked prefill on CPU", True),
        Switch("MASSV_PATCH_IMAGE_ERRORS", "oversized or empty images answered with 400", True),
        Switch("MASSV_PATCH_FILE_URL_ERRORS", "refused file:// URLs answered with 400", True),
        Switch("MASSV_PATCH_PROCESSOR_ERRORS", "processor errors name their cause", True),
        Switch(
            "MASSV_PATCH_JSON_BODY_ERRORS", "a request body that is not a JSON object answered with 400", True
        ),
        Switch("MASSV_PATCH_URL_FETCH_ERRORS", "failed or silent media URL fetches answered with 400", True),
    )
}

MEDIA_FETCH_TIMEOUT_ENV = "MASSV_MEDIA_FETCH_TIMEOUT_S"
DEFAULT_MEDIA_FETCH_TIMEOUT_S = 10.0
BLOCK_PRIVATE_MEDIA_URLS_ENV = "MASSV_BLOCK_PRIVATE_MEDIA_URLS"


def media_fetch_timeout_s(vllm_timeout: float | None) -> float:
    """Seconds one media URL may take in all (vLLM's per-attempt ``VLLM_*_FETCH_TIMEOUT`` and its
    ``VLLM_MEDIA_FETCH_MAX_RETRIES`` retries with x4 growing timeouts could add up to ~110 s).
    Unset: 10 s, or vLLM's per-attempt timeout for the modality if longer (video: 30 s)."""
    raw = os.environ.get(MEDIA_FETCH_TIMEOUT_ENV, "").strip()
    if not raw:
        return max(DEFAULT_MEDIA_FETCH_TIMEOUT_S, float(vllm_timeout or 0))
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        from massv_vllm.patches import PatchError

        raise PatchError(f"{MEDIA_FETCH_TIMEOUT_ENV}={raw!r}: expected seconds in (0, 3600]")
    return value


def block_private_media_urls() -> bool:
    """Whether media URLs of non-public hosts are refused (off by default: vLLM fetches any URL)."""
    raw = os.environ.get(BLOCK_PRIVATE_MEDIA_URLS_ENV, "0").strip().lower()
    if raw not in ("0", "1"):
        from massv_vllm.patches import PatchError

        raise PatchError(f"{BLOCK_PRIVATE_MEDIA_URLS_ENV}={raw!r}: expected one of 0, 1")
    return raw == "1"


def switch(env: str) -> Switch:
    return SWITCHES[env]


def massv_active() -> bool:
    """Whether this process serves (or was started for) a MASSV drafter."""
    return os.environ.get(ACTIVE_ENV) == "1"


def set_massv_active(active: bool) -> None:
    if active:
        os.environ[ACTIVE_ENV] = "1"
    else:
        os.environ.pop(ACTIVE_ENV, None)


def request_patch_applies(env: str) -> bool:
    """Scope of the request-handling fixes: MASSV processes, or every process with ``always``."""
    sw = SWITCHES[env]
    return sw.always() or (sw.enabled() and massv_active())
