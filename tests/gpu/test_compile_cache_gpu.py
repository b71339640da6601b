"""Engines of the same target with different drafters, one after another, with vLLM's torch.compile
cache on (GPU).

Seen on a fresh H200: a MASSV engine started after a text-only-drafter engine died at start-up in
Inductor ("Expected tensors only, but got: <class 'int'>", in the drafter's dummy_run), because
vLLM keyed both drafters' compiled graphs by the target alone (patches/speculative_config.py).
Here the text-only drafter (a graph over input_ids) and the MASSV drafter (over inputs_embeds)
start in both orders in one process, each in a cache of its own.
"""

from __future__ import annotations

import pytest

from massv_vllm.engine import make_llm, massv_spec, shutdown
from massv_vllm.testing.lossless import greedy, prompt_suite

pytestmark = pytest.mark.gpu

KW = dict(max_model_len=2048, max_num_seqs=8, dtype="float32")


def test_text_only_then_massv_then_text_only_start_with_the_cache_on(tmp_path, monkeypatch):
    from massv_vllm.testing.tiny import build_tiny_set

    cache = tmp_path / "vllm-cache"
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(cache))  # a fresh cache: the first engine fills it
    monkeypatch.delenv("VLLM_DISABLE_COMPILE_CACHE", raising=False)
    tiny = build_tiny_set(tmp_path / "tiny", "qwen2_5_vl")
    suite = prompt_suite(4, max_images=1)
    outs = {}
    for name, drafter in (
        ("text", tiny.text_drafter),
        ("massv", tiny.drafter),
        ("text-again", tiny.text_drafter),
    ):
        llm = make_llm(str(tiny.target), massv_spec(str(drafter), 3), **KW)
        try:
            outs[name] = [o.token_ids for o in greedy(llm, suite, max_tokens=8)]
        finally:
            shutdown(llm)
    dirs = sorted(p.name for p in (cache / "torch_compile_cache").iterdir())
    print(f"\ncompile cache dirs: {dirs}")
    assert len(dirs) >= 2  # a cache per drafter (before the fix: one shared by both)
    assert outs["text"] == outs["massv"] == outs["text-again"]  # all equal the target's T=0 output
