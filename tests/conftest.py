"""Shared fixtures: tiny checkpoints of both families, built once per test session.

Engines are expensive on CPU (~30-45 s to start), so engine tests share one engine per test
module (module-scoped fixtures in those modules) and cache reference outputs per session.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_qwen(tiny_root):
    from massv_vllm.testing.tiny import build_tiny_set

    return build_tiny_set(tiny_root, "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_gemma(tiny_root):
    from massv_vllm.testing.tiny import build_tiny_set

    return build_tiny_set(tiny_root, "gemma3")


@pytest.fixture(params=["qwen2_5_vl", "gemma3"])
def tiny_set(request, tiny_qwen, tiny_gemma):
    return tiny_qwen if request.param == "qwen2_5_vl" else tiny_gemma


def _reference(tiny):
    from massv_vllm.engine import make_llm, shutdown
    from massv_vllm.testing.lossless import greedy
    from tests.engine_checks import ENGINE_KW, MAX_TOKENS, engine_suite

    llm = make_llm(str(tiny.target), None, **ENGINE_KW)
    try:
        return greedy(llm, engine_suite(), MAX_TOKENS, logprobs=2)
    finally:
        shutdown(llm)


@pytest.fixture(scope="session")
def qwen_reference(tiny_qwen):
    """The target's own T=0 outputs on the suite (no speculation)."""
    return _reference(tiny_qwen)


@pytest.fixture(scope="session")
def gemma_reference(tiny_gemma):
    return _reference(tiny_gemma)
