"""MASSV drafter on vLLM's Qwen2 (Qwen2.5-0.5B/1.5B drafting for Qwen2.5-VL)."""

from __future__ import annotations

from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from massv_vllm.serving.models.common import MassvDrafterMixin


class MassvQwen2DrafterForCausalLM(MassvDrafterMixin, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_massv(self.config)
