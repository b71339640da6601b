"""is_kv_cache_spec_uniform (vllm/v1/core/kv_cache_utils.py, vLLM 0.26.0): a Gemma3 target and a
Gemma3 drafter with different sliding windows start.

A MASSV (or stock ``draft_model``) engine on a Gemma3 target runs with the hybrid KV-cache manager
off: the drafter's sliding and full layers must share one KV-cache group
(``llm_base_proposer.validate_same_kv_cache_group``). vLLM then turns every sliding layer into
full-attention storage that keeps its window (``unify_hybrid_kv_cache_specs``) and asks
``is_kv_cache_spec_uniform`` whether one spec fits all layers. That function expects a mismatch
to surface as an ``AssertionError`` from ``merge``, but two *different* windows raise
``ValueError`` in ``merge_window_sizes`` instead, so Gemma3-12B (window 1024) with Gemma3-1B
(window 512) died at start-up with "All attention layers in the same KV cache group must have the
same window size" (seen on an H200, 2026-11-30). The patch answers "not uniform" for that case,
as vLLM does for every other mismatch: the layers then go into one group of per-layer specs
(``UniformTypeKVCacheSpecs``), where each layer keeps its own window, which is vLLM's path for a
single window already. Every input on which vLLM did not raise gets vLLM's answer.

Scope: engines of a MASSV process; ``always``: every engine (a stock ``draft_model`` Gemma3 pair
fails the same way, and the cost benchmark's stock engine needs it to start).
"""

from __future__ import annotations

import sys

from massv_vllm.patches import replace_function
from massv_vllm.patches.envs import request_patch_applies

VLLM_MODULE = "vllm.v1.core.kv_cache_utils"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_KV_WINDOWS",)


def apply() -> None:
    module = sys.modules[VLLM_MODULE]

    def make(original):
        def is_kv_cache_spec_uniform(kv_cache_spec) -> bool:
            if not request_patch_applies(SWITCHES[0]):
                return original(kv_cache_spec)
            try:
                return original(kv_cache_spec)
            except ValueError:  # merge_window_sizes: layers of different windows
                return False

        return is_kv_cache_spec_uniform

    # Callers inside kv_cache_utils look the name up at call time; no other vLLM module imports it.
    replace_function(module, "is_kv_cache_spec_uniform", make, expect=("kv_cache_spec",))
