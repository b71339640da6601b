"""What the Qwen2 and Gemma3 MASSV drafters add to vLLM's own compiled text models.

Each drafter subclasses vLLM's ``*ForCausalLM`` (paged attention, torch.compile, CUDA graphs all
inherited) and adds: the projector applied in ``embed_input_ids`` at the positions vLLM marks as
image embeddings, -inf logits for vocab rows that only pad the drafter to the target's vocab, and
validation of the ``massv`` config section. It deliberately does not implement
``SupportsMultiModal``: the drafter has no vision tower and no multimodal processor of its own.
"""

from __future__ import annotations

from typing import Any

import torch

from massv_vllm.serving.config import MassvConfigError, massv_config_from_hf
from massv_vllm.serving.projector import Projector

_UNSET: Any = object()


class MassvDrafterMixin:
    """Mixed into a vLLM ``*ForCausalLM`` subclass; call ``_init_massv(config)`` after super()."""

    def _init_massv(self, config: Any) -> None:
        self.massv = massv_config_from_hf(config)
        problems = self.massv.check_base(config)
        if problems:
            raise MassvConfigError("MASSV drafter config", problems)
        self.base_vocab_size = self.massv.base_vocab_size
        self.projector = (
            None if self.massv.projector is None else Projector(self.massv.projector, config.hidden_size)
        )

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: Any = _UNSET,
        *,
        is_multimodal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings, with ``projector(target image embeddings)`` at ``is_multimodal``.

        ``multimodal_embeddings`` are the target's own encoder outputs (post-merger for
        Qwen2.5-VL, post-projector for Gemma3) for the image tokens in this window, in order.
        """
        if self.projector is None and multimodal_embeddings is not _UNSET:
            # A text-only drafter tells vLLM's probe (llm_base_proposer.load_model) that it takes
            # no multimodal inputs, so vLLM neither gathers nor passes any.
            raise TypeError("text-only MASSV drafter: no multimodal embeddings")
        embeds = self.model.embed_input_ids(input_ids)
        if multimodal_embeddings is _UNSET or not multimodal_embeddings:
            return embeds
        if is_multimodal is None:
            raise ValueError("multimodal_embeddings given without is_multimodal")
        flat = torch.cat([e.reshape(-1, e.shape[-1]) for e in multimodal_embeddings])
        if flat.shape[-1] != self.massv.projector.input_dim:
            raise ValueError(
                f"image embeddings of width {flat.shape[-1]} but the projector takes "
                f"{self.massv.projector.input_dim}"
            )
        from vllm.model_executor.models.utils import _merge_multimodal_embeddings

        return _merge_multimodal_embeddings(embeds, [self.projector(flat)], is_multimodal)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = super().compute_logits(hidden_states)  # type: ignore[misc]
        if logits is not None and logits.shape[-1] > self.base_vocab_size:
            logits[..., self.base_vocab_size :] = float("-inf")
        return logits
