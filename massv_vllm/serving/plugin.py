"""The vLLM plugin (entry point ``vllm.general_plugins: massv``), loaded by vLLM in every process.

``register()`` checks the vLLM version, registers the drafter architectures with vLLM's
``ModelRegistry`` (lazy "module:Class" strings, so nothing touches CUDA at import) and applies the
patches in ``massv_vllm.patches`` once. vLLM only logs exceptions raised by plugins, so a failure
here is logged loudly and re-raised; a process whose patches failed must not serve.
"""

from __future__ import annotations

import logging

from massv_vllm.families import FAMILIES

logger = logging.getLogger("vllm.massv_vllm")  # under "vllm." so vLLM's log handler prints it
_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    try:
        from vllm import ModelRegistry

        from massv_vllm.patches import apply_all, check_vllm_version

        check_vllm_version()
        for fam in FAMILIES.values():
            if fam.drafter_architecture not in ModelRegistry.get_supported_archs():
                ModelRegistry.register_model(fam.drafter_architecture, fam.vllm_class)
        apply_all()
    except Exception:
        logger.exception("massv-vllm: plugin registration FAILED; MASSV speculative decoding is unavailable")
        raise
    _registered = True
