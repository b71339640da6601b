"""SpeculativeConfig (vllm/config/speculative.py, vLLM 0.26.0): MASSV drafters get their own
torch.compile cache.

vLLM keys its compile cache by ``VllmConfig.compute_hash()``, into which
``SpeculativeConfig.compute_hash`` puts, for ``draft_model``, only ``uses_aux_hidden_states``
(False). The drafter is compiled under ``<that cache dir>/rank_i_j/draft_model`` (the draft
VllmConfig shares the target's ``compilation_config``, whose ``cache_dir`` is already set), so two
engines with the same target and settings but *different drafters* share one compiled drafter
graph. A text-only drafter's graph takes ``input_ids``; a MASSV drafter's takes
``inputs_embeds``; loading one for the other died in Inductor at start-up ("Expected tensors
only, but got: <class 'int'>", seen on an H200 when a MASSV engine followed a text-only one).
The patch adds the draft model config's own hash (its folder, config and dtype) to the factors
when the drafter is a MASSV one; every other speculative method keeps vLLM's key.
"""

from __future__ import annotations

from massv_vllm.patches import replace_method

VLLM_MODULE = "vllm.config.speculative"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_COMPILE_CACHE_KEY",)


def massv_drafter_hash(spec_config) -> str | None:
    """The draft model config's hash when ``spec_config`` drafts with a MASSV drafter, else None."""
    from massv_vllm.families import DRAFTER_ARCHITECTURES

    draft = getattr(spec_config, "draft_model_config", None)
    if spec_config.method != "draft_model" or draft is None:
        return None
    archs = getattr(draft.hf_config, "architectures", None) or [None]
    if archs[0] not in DRAFTER_ARCHITECTURES:
        return None
    return draft.compute_hash()


def apply() -> None:
    from vllm.config.speculative import SpeculativeConfig
    from vllm.utils.hashing import safe_hash

    def make(original):
        def compute_hash(self) -> str:
            base = original(self)
            extra = massv_drafter_hash(self)
            if extra is None:
                return base
            return safe_hash(f"{base}|massv:{extra}".encode(), usedforsecurity=False).hexdigest()

        return compute_hash

    replace_method(SpeculativeConfig, "compute_hash", make, expect=("self",))
