"""vLLM worker extension for benchmarks/cost.py: force 100% acceptance at unchanged cost.

``LLM(..., worker_extension_cls="benchmarks.cost_ext.ZeroFinalNorms")``, then
``llm.collective_rpc("massv_zero_final_norms")``. With the final norm of every decoder (target and
drafter) zeroed, every hidden state reaching the LM head is 0, so all logits are 0 and greedy
decoding picks token 0 in both models: every draft token is accepted. Nothing else changes, so
each step costs exactly what it costs with real weights (same shapes, kernels and batch sizes).
Only for dummy-weight timing runs: the outputs are meaningless.
"""

from __future__ import annotations

from typing import Any


def _unwrap(model: Any) -> Any:
    return model.unwrap() if hasattr(model, "unwrap") else model


def zero_final_norms(model: Any) -> list[str]:
    """Make the final norm of every decoder stack in ``model`` output zeros; returns their names.

    A decoder stack is a module with ``embed_tokens``, ``layers`` and ``norm`` (vLLM's
    Qwen2Model / Gemma3Model); vision towers have no ``embed_tokens`` and are left alone.
    Gemma's RMSNorm scales by ``1 + weight``, so its weight goes to -1 instead of 0.
    """
    import torch

    done = []
    for name, mod in _unwrap(model).named_modules():
        norm = getattr(mod, "norm", None)
        if not (
            hasattr(mod, "embed_tokens") and hasattr(mod, "layers") and isinstance(norm, torch.nn.Module)
        ):
            continue
        weight = getattr(norm, "weight", None)
        if weight is None:
            continue
        gemma_style = "Gemma" in type(norm).__name__
        with torch.no_grad():
            weight.fill_(-1.0 if gemma_style else 0.0)
        done.append(f"{name + '.' if name else ''}norm ({type(norm).__name__})")
    return done


class ZeroFinalNorms:
    """Mixed into vLLM's worker class (``worker_extension_cls``)."""

    def massv_zero_final_norms(self) -> dict[str, list[str]]:
        runner = self.model_runner
        out = {"target": zero_final_norms(runner.model)}
        drafter = getattr(runner, "drafter", None)
        if drafter is not None and getattr(drafter, "model", None) is not None:
            out["drafter"] = zero_final_norms(drafter.model)
        return out
