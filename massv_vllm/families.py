"""Supported target families: which small LMs draft for which VLMs, and where their facts live.

A family binds a VLM target architecture to the text architecture of its drafter and knows how to
read, from the target's HF config, the three numbers the drafter must agree with: the image token
id, the width of the image embeddings vLLM hands over (post-merger / post-projector), and the
text vocab size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str
    target_architectures: tuple[str, ...]
    target_model_types: tuple[str, ...]
    base_architecture: str  # the small LM's HF architecture
    base_model_types: tuple[str, ...]
    drafter_architecture: str  # what a MASSV drafter folder's config.json names
    vllm_class: str  # lazy "module:Class" for vLLM's ModelRegistry
    # Attribute of the target config holding the image placeholder id vLLM fills with embeddings.
    image_token_attr: str

    def image_token_id(self, target_cfg: Any) -> int:
        return int(getattr(target_cfg, self.image_token_attr))

    def image_embed_dim(self, target_cfg: Any) -> int:
        """Width of the image embeddings the target's ``embed_multimodal`` returns in vLLM."""
        if self.name == "qwen2_5_vl":
            # Qwen2.5-VL: output of the patch merger (vision_config.out_hidden_size).
            return int(target_cfg.vision_config.out_hidden_size)
        # Gemma3: output of multi_modal_projector, in the text hidden size.
        return int(target_cfg.get_text_config().hidden_size)

    def text_vocab_size(self, target_cfg: Any) -> int:
        return int(target_cfg.get_text_config().vocab_size)


FAMILIES: dict[str, Family] = {
    "qwen2_5_vl": Family(
        name="qwen2_5_vl",
        target_architectures=("Qwen2_5_VLForConditionalGeneration",),
        target_model_types=("qwen2_5_vl",),
        base_architecture="Qwen2ForCausalLM",
        base_model_types=("qwen2",),
        drafter_architecture="MassvQwen2DrafterForCausalLM",
        vllm_class="massv_vllm.serving.models.qwen2:MassvQwen2DrafterForCausalLM",
        image_token_attr="image_token_id",
    ),
    "gemma3": Family(
        name="gemma3",
        target_architectures=("Gemma3ForConditionalGeneration",),
        target_model_types=("gemma3",),
        base_architecture="Gemma3ForCausalLM",
        base_model_types=("gemma3_text",),
        drafter_architecture="MassvGemma3DrafterForCausalLM",
        vllm_class="massv_vllm.serving.models.gemma3:MassvGemma3DrafterForCausalLM",
        image_token_attr="image_token_index",
    ),
}

DRAFTER_ARCHITECTURES = {f.drafter_architecture: f for f in FAMILIES.values()}


def family_of_target(target_cfg: Any) -> Family | None:
    """The family whose VLM architecture ``target_cfg`` is, or None (not a supported VLM)."""
    archs = set(getattr(target_cfg, "architectures", None) or [])
    model_type = getattr(target_cfg, "model_type", None)
    for fam in FAMILIES.values():
        if archs & set(fam.target_architectures) or model_type in fam.target_model_types:
            return fam
    return None


def family_of_base(base_model_type: str) -> Family | None:
    for fam in FAMILIES.values():
        if base_model_type in fam.base_model_types:
            return fam
    return None


def parallel_mask_token_id(base_vocab_size: int, vocab_size: int, image_token_id: int) -> int:
    """The token id a parallel-drafting drafter uses for its mask slots (vLLM's ``pard_token``).

    It is the first row of the drafter's vocabulary *padding* (ids ``base_vocab_size`` ..
    ``vocab_size - 1``, which the drafter never predicts: ``compute_logits`` masks them), so no
    new vocabulary is needed. It must not be the target's image token: Gemma3's first padding row,
    262144, *is* the image soft token."""
    for token in range(base_vocab_size, vocab_size):
        if token != image_token_id:
            return token
    raise ValueError(
        f"no free padding row for a parallel-drafting mask token: the drafter's vocabulary "
        f"({base_vocab_size}) is not padded below the target's ({vocab_size})"
    )
