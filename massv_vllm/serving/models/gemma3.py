"""MASSV drafter on vLLM's Gemma3 text model (Gemma3-1B drafting for Gemma3-4B/12B/27B).

Text embeddings carry Gemma's sqrt(hidden) scale (``Gemma3Model.embed_input_ids``); projected image
embeddings are inserted unscaled, as the transformers drafter does in training.
"""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models.gemma3 import Gemma3ForCausalLM

from massv_vllm.serving.models.common import MassvDrafterMixin


class MassvGemma3DrafterForCausalLM(MassvDrafterMixin, Gemma3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_massv(self.config)
