"""is_kv_cache_spec_uniform (vllm/v1/core/kv_cache_utils.py, vLLM 0.26.0): layers of different
sliding windows keep their own windows in one KV-cache group.

A MASSV (or stock ``draft_model``) engine on a Gemma3 target runs with the hybrid KV-cache manager
off: the drafter's sliding and full layers must share one KV-cache group
(``llm_base_proposer.validate_same_kv_cache_group``). vLLM then turns every sliding layer into
full-attention storage that keeps its window (``unify_hybrid_kv_cache_specs``) and asks
``is_kv_cache_spec_uniform`` whether one spec fits all layers, by merging them:

- two different windows (Gemma3-12B 1024, Gemma3-1B 512) raise ``ValueError`` in
  ``merge_window_sizes``, which the function does not catch (it expects ``AssertionError``), so
  any speculative engine of that pair died at start-up (H200, 2026-11-30);
- one window beside full layers merges into *one* full-attention spec that records the window
  (the merge compares only the fields of ``AttentionSpec``), and backends that read the window
  from the metadata (FlashAttention, the CPU scheduler) apply it to every layer of the group,
  full layers included (fixed upstream in the backends by vllm-project/vllm#51756).

The patch answers "not uniform" whenever the layers' windows (or attention chunks) differ; vLLM
then puts them into one group of per-layer specs (``UniformTypeKVCacheSpecs``), where each layer's
metadata carries its own window. Inputs whose windows agree get vLLM's answer.

Scope: engines of a MASSV process; ``always``: every engine (a stock ``draft_model`` Gemma3 pair
fails the same way, and the cost benchmark's stock engine needs it to start).
"""

from __future__ import annotations

import sys

from massv_vllm.patches import replace_function
from massv_vllm.patches.envs import request_patch_applies

VLLM_MODULE = "vllm.v1.core.kv_cache_utils"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_KV_WINDOWS",)


def windows(kv_cache_spec: dict) -> set[tuple]:
    """The distinct (sliding window, attention chunk) pairs of the layers' specs."""
    return {
        (getattr(spec, "sliding_window", None), getattr(spec, "attention_chunk_size", None))
        for spec in kv_cache_spec.values()
    }


def apply() -> None:
    module = sys.modules[VLLM_MODULE]

    def make(original):
        def is_kv_cache_spec_uniform(kv_cache_spec) -> bool:
            if request_patch_applies(SWITCHES[0]) and len(windows(kv_cache_spec)) > 1:
                return False
            return original(kv_cache_spec)

        return is_kv_cache_spec_uniform

    # Callers inside kv_cache_utils look the name up at call time; no other vLLM module imports it.
    replace_function(module, "is_kv_cache_spec_uniform", make, expect=("kv_cache_spec",))
