"""The MASSV drafter on the transformers side (training, evaluation, TVD).

``MassvDrafter`` = the small LM (``Qwen2ForCausalLM`` / ``Gemma3ForCausalLM``, vocab padded to the
target's) + ``Projector``. Its forward takes token ids and the *target's* image embeddings, puts
``projector(image_embeds)`` at the image-token positions and runs the LM; logits of padded vocab
rows are masked to -inf, exactly as the vLLM drafter does.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from massv_vllm.serving.checks import check_drafter
from massv_vllm.serving.config import (
    CONFIG_KEY,
    DEFAULT_GAMMA,
    MassvConfig,
    recorded_gamma,
    speculators_fields,
)
from massv_vllm.serving.projector import Projector

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class DrafterOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    num_loss_tokens: int = 0


def mask_padded_vocab(logits: torch.Tensor, base_vocab_size: int) -> torch.Tensor:
    """-inf for vocab rows that only exist to match the target's padded vocab (in place)."""
    if logits.shape[-1] > base_vocab_size:
        logits[..., base_vocab_size:] = float("-inf")
    return logits


def merge_image_embeds(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    image_token_id: int,
    projected: torch.Tensor,
    response_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Overwrite the image-token positions of ``embeds`` [.., T, H] with ``projected`` [N, H].

    Rows of ``projected`` fill the image positions in reading order (batch-major), the order vLLM
    concatenates a request's image embeddings in. ``response_mask`` (like ``input_ids``; True on
    response tokens) lets a count mismatch say whether a response holds image tokens.
    """
    mask = input_ids == image_token_id
    n = int(mask.sum())
    if n != projected.shape[0]:
        in_response = 0 if response_mask is None else int((mask & response_mask.to(mask.device)).sum())
        if in_response:
            where = (
                f" ({n - in_response} in the prompts, {in_response} in the responses): a response holds "
                "image placeholder tokens, which only a prompt's image expansion may hold "
                "(SampleBuilder cuts generated responses before them)"
            )
        else:
            where = (
                " (all in the prompts)" if response_mask is not None else ""
            ) + ": the prompt's placeholder expansion does not match the images"
        raise ValueError(
            f"{n} image-token positions in input_ids but {projected.shape[0]} image embeddings{where}"
        )
    out = embeds.clone()
    out[mask] = projected.to(embeds.dtype)
    return out


class MassvDrafter(nn.Module):
    def __init__(self, base: nn.Module, massv: MassvConfig):
        super().__init__()
        self.base = base
        self.massv = massv
        self.projector = (
            None if massv.projector is None else Projector(massv.projector, base.config.hidden_size)
        )
        if self.projector is not None:
            self.projector.to(next(base.parameters()).dtype)
        # Parallel drafting (training/parallel.py): the mask token's embedding, trained as a vector
        # of its own and written into its (padding) row of the embedding matrix on save.
        self.mask_token_id: int | None = None
        self.mask_embed: nn.Parameter | None = None
        mask_id = getattr(base.config, "pard_token", None)
        if mask_id is not None:
            self.enable_parallel_drafting(int(mask_id))

    @property
    def config(self) -> Any:
        return self.base.config

    def enable_parallel_drafting(self, mask_token_id: int) -> None:
        """Give the drafter a trainable mask-token embedding (initialised from its current row,
        or from the mean token embedding where that row is the zero padding) and record the id
        as ``pard_token`` in its config, where vLLM reads it."""
        weight = self.base.get_input_embeddings().weight
        if not 0 <= mask_token_id < weight.shape[0]:
            raise ValueError(f"mask token id {mask_token_id} is outside the vocabulary ({weight.shape[0]})")
        with torch.no_grad():
            row = weight[mask_token_id].detach().clone()
            if not row.any():
                row = weight[: self.massv.base_vocab_size].mean(dim=0)
        self.mask_token_id = mask_token_id
        self.mask_embed = nn.Parameter(row)
        self.base.config.pard_token = mask_token_id

    def embed(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        response_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings (with Gemma's scaling), the mask embedding at mask tokens (parallel
        drafting) and projected image embeddings spliced in."""
        table = self.base.get_input_embeddings()
        embeds = table(input_ids)
        if self.mask_embed is not None:
            scale = getattr(table, "embed_scale", None)  # Gemma scales every token embedding
            row = self.mask_embed.to(embeds.dtype) * (1.0 if scale is None else scale.to(embeds.dtype))
            embeds = torch.where((input_ids == self.mask_token_id).unsqueeze(-1), row, embeds)
        if image_embeds is None or self.projector is None:
            return embeds
        projected = self.projector(image_embeds.to(embeds.device))
        return merge_image_embeds(
            embeds, input_ids, self.massv.target.image_token_id, projected, response_mask
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> DrafterOutput:
        """``image_embeds``: [N, input_dim], the target's embeddings for every image token in
        ``input_ids`` (batch-major order). ``labels``: -100 where no loss is taken."""
        response_mask = None if labels is None else labels != -100  # loss positions: the responses
        out = self.base(
            inputs_embeds=self.embed(input_ids, image_embeds, response_mask),
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        logits = mask_padded_vocab(out.logits, self.massv.base_vocab_size)
        if labels is None:
            return DrafterOutput(logits=logits)
        loss, n = causal_lm_loss(logits, labels, self.massv.base_vocab_size)
        return DrafterOutput(logits=logits, loss=loss, num_loss_tokens=n)

    # ---- checkpoint I/O -------------------------------------------------------------------
    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        sd = {k: v for k, v in self.base.state_dict().items()}
        if self.mask_embed is not None:
            key = next(k for k in sd if k.endswith("embed_tokens.weight"))
            sd[key] = sd[key].clone()
            sd[key][self.mask_token_id] = self.mask_embed.detach().to(sd[key].dtype)
        if getattr(self.base.config, "tie_word_embeddings", False):
            sd.pop("lm_head.weight", None)
        if self.projector is not None:
            sd |= {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        return {k: v.detach().contiguous().cpu() for k, v in sd.items()}

    def save_pretrained(
        self,
        out_dir: str | Path,
        tokenizer_from: str | Path | None = None,
        *,
        verifier: str | Path | None = None,
        gamma: int | None = None,
    ) -> Path:
        """Write config.json (+ ``massv`` section), model.safetensors and tokenizer files.

        ``verifier`` (the target folder or hub id) also writes the speculators section, so that
        ``vllm serve <out_dir>`` starts that target with this drafter and ``gamma`` draft tokens
        (default: what the folder recorded before, else 5); a local path is stored absolute."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = self.base.config
        setattr(cfg, CONFIG_KEY, self.massv.to_dict())
        cfg.architectures = [self.massv.family.drafter_architecture]
        if verifier is not None:
            local = Path(verifier)
            name = str(local.resolve()) if local.exists() else str(verifier)
            gamma = gamma or recorded_gamma(cfg.to_dict()) or DEFAULT_GAMMA
            for key, value in speculators_fields(
                cfg.to_dict(), self.massv, gamma=gamma, verifier=name
            ).items():
                setattr(cfg, key, value)
        cfg.save_pretrained(out)
        tmp = out / "model.safetensors.tmp"
        save_file(self.state_dict_for_save(), str(tmp), metadata={"format": "pt"})
        tmp.replace(out / "model.safetensors")  # atomic: a killed save never leaves a torn file
        if tokenizer_from is not None:
            copy_tokenizer_files(Path(tokenizer_from), out)
        return out

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        allow_pickle: bool | None = None,
    ) -> MassvDrafter:
        """Load a drafter folder (validated first: schema, files, tensor shapes)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        info = check_drafter(folder, allow_pickle=allow_pickle)
        sd: dict[str, torch.Tensor] = {}
        for f in info.weight_files:
            if f.suffix == ".safetensors":
                sd |= load_file(str(f))
            else:  # only reachable when the user allowed pickle explicitly
                sd |= torch.load(str(f), map_location="cpu", weights_only=True)
        dtype = dtype or next(iter(sd.values())).dtype
        base = AutoModelForCausalLM.from_config(info.base_config, dtype=dtype)
        model = cls(base, info.massv)
        missing, unexpected = model.load_state_dict(
            {("base." + k if not k.startswith("projector.") else k): v for k, v in sd.items()},
            strict=False,
        )
        tied = {"base.lm_head.weight"} if getattr(info.base_config, "tie_word_embeddings", False) else set()
        tied.add("mask_embed")  # saved as its row of the embedding matrix, read back below
        if set(missing) - tied or unexpected:
            raise ValueError(f"{folder}: missing {sorted(set(missing) - tied)}, unexpected {unexpected}")
        base.tie_weights()
        if model.mask_embed is not None:  # built before the weights were loaded: read its row now
            model.enable_parallel_drafting(model.mask_token_id)
        return model.to(device=device, dtype=dtype)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, base_vocab_size: int
) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over positions with a label (fp32); padded-vocab labels skipped."""
    shift_logits = logits[..., :-1, :].float()
    shift_labels = labels[..., 1:].to(logits.device)
    shift_labels = shift_labels.masked_fill(shift_labels >= base_vocab_size, -100)
    n = int((shift_labels != -100).sum())
    loss = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    ) / max(n, 1)
    return loss, n


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
