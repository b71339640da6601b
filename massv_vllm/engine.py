"""One place that turns "target + speculative config" into vLLM engine arguments.

Used by the tests, the benchmarks and the training data generator, so all of them run the engine
the same way. On a machine without a GPU (vLLM's CPU backend) it applies what that backend needs:
eager mode, a bounded KV cache (``gpu_memory_utilization`` means a share of RAM there) and
16-token blocks (Gemma3's hybrid layout otherwise picks a block size the CPU kernels reject).
``parse_engine_args`` reads the command lines' extra engine arguments (``--engine-arg KEY=VALUE``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch


def on_gpu() -> bool:
    """Whether a CUDA GPU is visible, asked through NVML as vLLM asks it (vllm/env_override.py).

    torch's default check goes through the CUDA runtime and marks the process, so that an engine
    process forked from it later dies with "Cannot re-initialize CUDA in forked subprocess"; vLLM
    does not see that mark and forks anyway (a benchmark whose first engine came after this call
    before vLLM was imported, H200, 2026-12-01)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.is_available()


def engine_kwargs(
    target: str,
    speculative_config: dict[str, Any] | None = None,
    *,
    max_model_len: int = 4096,
    max_images: int = 4,
    dtype: str = "auto",
    probe: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    kw: dict[str, Any] = dict(
        model=target,
        max_model_len=max_model_len,
        dtype=dtype,
        limit_mm_per_prompt={"image": max_images, "video": 0},
        disable_log_stats=False,  # spec-decode counters for LLM.get_metrics()
        speculative_config=speculative_config,
        seed=0,
    )
    if probe:
        kw["worker_extension_cls"] = "massv_vllm.testing.debug.DrafterProbe"
    if not on_gpu():
        kw.update(enforce_eager=True, kv_cache_memory_bytes=512 << 20, block_size=16)
    kw.update(overrides)
    return kw


def parse_engine_args(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (``--engine-arg``) as ``LLM(...)`` / ``engine_kwargs`` keyword arguments.

    VALUE is parsed as JSON when it is valid JSON (numbers, booleans, objects), else kept as a
    string; dashes in KEY become underscores (``max-num-seqs`` = ``max_num_seqs``).
    """
    kw: dict[str, Any] = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep or not k:
            raise ValueError(f"--engine-arg {it!r}: expected KEY=VALUE")
        try:
            kw[k.replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            kw[k.replace("-", "_")] = v
    return kw


def make_llm(target: str, speculative_config: dict[str, Any] | None = None, **kw: Any):
    from vllm import LLM

    return LLM(**engine_kwargs(target, speculative_config, **kw))


def massv_spec(drafter: str, num_speculative_tokens: int = 5, **extra: Any) -> dict[str, Any]:
    return {"method": "massv", "model": drafter, "num_speculative_tokens": num_speculative_tokens, **extra}


def shutdown(llm: Any) -> None:
    """Stop an engine's background processes now (instead of whenever it is garbage collected),
    so the next engine in the same process gets the memory back."""
    import gc

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
    del llm
    gc.collect()


@contextlib.contextmanager
def engine_env(env: dict[str, str] | None) -> Iterator[None]:
    """Set environment variables while an engine starts: its processes inherit them (e.g. a
    patch switch for one engine of a benchmark); restored afterwards."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
