"""The target's image features on the transformers side: exactly what vLLM hands the drafter.

vLLM's drafter receives the target's ``embed_multimodal`` outputs from the encoder cache:
Qwen2.5-VL's vision tower *after the patch merger* (width ``vision_config.out_hidden_size``) and
Gemma3's SigLIP tower *after multi_modal_projector* (width = text hidden size). ``TargetEncoder``
computes the same tensors with transformers, from the same HF processor vLLM uses, so training
(phase 1/2, TVD) and serving feed the drafter identical features. It also builds prompt token ids
the way vLLM does (chat template, then the processor's placeholder expansion), so image-token
positions in training match serving.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from massv_vllm.families import Family, family_of_target
from massv_vllm.serving.checks import target_config_from_dir
from massv_vllm.serving.config import MassvConfigError


@dataclass
class PromptInputs:
    input_ids: list[int]  # chat template applied, image placeholders expanded
    num_image_tokens: list[int]  # per image, in order


class TargetEncoder:
    """The frozen vision side of a target VLM (its language model is dropped to save memory)."""

    def __init__(
        self,
        target_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        load_vision: bool = True,
    ):
        from transformers import AutoProcessor

        self.target_dir = Path(target_dir)
        self.config = target_config_from_dir(self.target_dir)
        fam = family_of_target(self.config)
        if fam is None:
            raise MassvConfigError(
                f"target {self.target_dir}", f"{self.config.architectures} is not a supported VLM"
            )
        self.family: Family = fam
        self.image_token_id = fam.image_token_id(self.config)
        self.embed_dim = fam.image_embed_dim(self.config)
        self.processor = AutoProcessor.from_pretrained(str(self.target_dir), trust_remote_code=False)
        self.tokenizer = self.processor.tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.vision: torch.nn.Module | None = self._load_vision() if load_vision else None

    def _load_vision(self) -> torch.nn.Module:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(
            str(self.target_dir), dtype=self.dtype, trust_remote_code=False
        )
        inner = model.model
        # Only the vision tower (+ merger/projector) is needed; free the language model.
        inner.language_model = None
        if hasattr(model, "lm_head"):
            model.lm_head = None
        return inner.to(self.device).eval().requires_grad_(False)

    # ---- prompts ---------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The target's chat template over HF-style messages ({"type": "image"} content items)."""
        return self.processor.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def prompt_ids(self, text: str, images: list[Any]) -> PromptInputs:
        """Token ids of a templated prompt with each image placeholder expanded, as vLLM does."""
        if images:
            out = self.processor(text=[text], images=[images], return_tensors="pt")
        else:
            out = self.processor(text=[text], return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        counts = self._tokens_per_image(out, len(images))
        if sum(counts) != sum(1 for t in ids if t == self.image_token_id):
            raise ValueError("image placeholder count does not match the processor's expansion")
        return PromptInputs(input_ids=ids, num_image_tokens=counts)

    def _tokens_per_image(self, proc_out: Any, n: int) -> list[int]:
        if n == 0:
            return []
        if self.family.name == "qwen2_5_vl":
            merge = self.config.vision_config.spatial_merge_size
            return [int(g.prod()) // merge**2 for g in proc_out["image_grid_thw"]]
        return [int(self.config.mm_tokens_per_image)] * n

    # ---- features ----------------------------------------------------------------------------
    @torch.no_grad()
    def image_features(self, images: list[Any]) -> list[torch.Tensor]:
        """Per image, the [num_image_tokens, embed_dim] embeddings vLLM passes to the drafter."""
        if self.vision is None:
            raise RuntimeError("TargetEncoder was created with load_vision=False")
        if not images:
            return []
        ip = self.processor.image_processor
        if self.family.name == "qwen2_5_vl":
            px = ip(images=images, return_tensors="pt")
            pixel_values = px["pixel_values"].to(self.device, self.dtype)
            grid = px["image_grid_thw"].to(self.device)
            feats = self.vision.get_image_features(pixel_values, grid).pooler_output
            return [f.float().cpu() for f in feats]
        px = ip(images=images, return_tensors="pt")
        pixel_values = px["pixel_values"].to(self.device, self.dtype)
        feats = self.vision.get_image_features(pixel_values).pooler_output
        return [f.float().cpu() for f in feats]

    def fingerprint(self) -> str:
        """Identity of everything that determines the features (cache invalidation key)."""
        h = hashlib.sha256()
        for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
            p = self.target_dir / name
            if p.is_file():
                h.update(name.encode())
                h.update(p.read_bytes())
        for p in sorted(self.target_dir.glob("*.safetensors")):
            st = p.stat()
            h.update(json.dumps([p.name, st.st_size, int(st.st_mtime)]).encode())
        h.update(str(self.dtype).encode())
        return h.hexdigest()[:16]
