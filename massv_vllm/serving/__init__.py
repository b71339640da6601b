"""Serving layer: the drafter config schema, the checks, the projector, the vLLM drafter models and
the vLLM plugin. Everything vLLM loads at serve time lives here (plus ``massv_vllm.patches``)."""
