"""Training samples: token ids laid out exactly as vLLM serves them, with loss only on the response.

A sample is the target's chat-templated prompt with every image placeholder expanded
(``TargetEncoder.chat_prompt`` + ``TargetEncoder.prompt_ids``, the same expansion vLLM does), then
the response: for phase 1 the caption text tokenized plus the end-of-turn token, for SDViT the
exact token ids the target generated (``generate.py`` records them). Labels are -100 on every
prompt token (image positions included) and the token ids on the response.

Samples that cannot be used (unreadable/missing images, too long, no response) are skipped and
counted in ``ReadStats``; a run never stops on one bad sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from massv_vllm.training.data.records import IMAGE_MARK, DataError, ReadStats, Record, hf_messages, load_image

IGNORE = -100
RESPONSE_TEXT = "text"  # phase 1: tokenize the record's response (caption) + end-of-turn token
RESPONSE_TOKEN_IDS = "token_ids"  # SDViT: the target's own generated token ids, verbatim


@dataclass
class Sample:
    index: int  # ordinal of the record in the input stream: what the training log records
    id: str
    input_ids: torch.Tensor  # int32 [T]: prompt (placeholders expanded) + response
    prompt_len: int  # labels are IGNORE before this position
    image_keys: list[str] = field(default_factory=list)  # content keys into the feature cache
    image_tokens: list[int] = field(default_factory=list)  # placeholder tokens per image

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def labels(self) -> torch.Tensor:
        lab = self.input_ids.to(torch.long).clone()
        lab[: self.prompt_len] = IGNORE
        return lab


def skip_reason(err: DataError) -> str:
    msg = str(err)
    if "not found" in msg:
        return "missing image"
    if "zero size" in msg:
        return "empty image"
    return "unreadable image"


def end_of_turn_id(encoder: Any) -> int:
    """The token that closes an assistant turn in the target's chat template (what the target
    emits to stop: ``<|im_end|>`` for Qwen, ``<end_of_turn>`` for Gemma3)."""
    probe = Record(id="probe", images=[], turns=[("user", "Hi"), ("assistant", "Yes")])
    prompt = encoder.chat_prompt(hf_messages(probe))
    full = encoder.chat_prompt(hf_messages(probe, with_response=True), add_generation_prompt=False)
    if not full.startswith(prompt + "Yes"):
        raise ValueError("the target's chat template does not append the response after the prompt")
    suffix = full[len(prompt) + len("Yes") :]
    ids = encoder.tokenizer(suffix, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError("the target's chat template adds no end-of-turn token after a response")
    return int(ids[0])


def strip_images(record: Record) -> Record:
    """The record as a text-only prompt: images dropped, ``<image>`` markers removed."""
    turns = [(r, t.replace(IMAGE_MARK + "\n", "").replace(IMAGE_MARK, "")) for r, t in record.turns]
    return Record(id=record.id, images=[], turns=turns, task=record.task, meta=dict(record.meta))


class SampleBuilder:
    """Turns ``Record``s into ``Sample``s for one target (prompt layout identical to serving)."""

    def __init__(
        self,
        encoder: Any,
        *,
        max_len: int,
        response: str = RESPONSE_TEXT,
        stats: ReadStats | None = None,
        check_prompt_ids: bool = True,
    ):
        if response not in (RESPONSE_TEXT, RESPONSE_TOKEN_IDS):
            raise ValueError(f"response must be {RESPONSE_TEXT!r} or {RESPONSE_TOKEN_IDS!r}")
        self.encoder = encoder
        self.max_len = max_len
        self.response = response
        self.stats = stats if stats is not None else ReadStats()
        self.check_prompt_ids = check_prompt_ids
        self.end_id = end_of_turn_id(encoder)

    def build(self, index: int, record: Record) -> tuple[Sample, list[Any]] | None:
        """The sample and its loaded images, or None (skip counted in ``stats``)."""
        images = []
        for src in record.images:
            try:
                images.append(load_image(src))
            except DataError as e:
                self.stats.skip(skip_reason(e))
                return None
        response = self._response_ids(record)
        if response is None:
            return None
        text = self.encoder.chat_prompt(hf_messages(record))
        try:
            prompt = self.encoder.prompt_ids(text, images)
        except (ValueError, RuntimeError, OSError) as e:  # the processor rejects the image
            self.stats.skip(f"processor error ({type(e).__name__})")
            return None
        # Data from generate.py carries the prompt vLLM actually ran: it must match ours.
        ran = record.meta.get("prompt_token_ids") if self.check_prompt_ids else None
        if ran is not None and list(ran) != prompt.input_ids:
            self.stats.skip("prompt differs from generation")
            return None
        ids = prompt.input_ids + response
        if len(ids) > self.max_len:
            self.stats.skip("too long")
            return None
        from massv_vllm.training.data.feature_cache import image_key

        sample = Sample(
            index=index,
            id=record.id,
            input_ids=torch.tensor(ids, dtype=torch.int32),
            prompt_len=len(prompt.input_ids),
            image_keys=[image_key(im) for im in images],
            image_tokens=list(prompt.num_image_tokens),
        )
        return sample, images

    def _response_ids(self, record: Record) -> list[int] | None:
        if self.response == RESPONSE_TOKEN_IDS:
            ids = record.meta.get("response_token_ids")
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                self.stats.skip("no generated token ids")
                return None
            return list(ids)  # verbatim: the end token is there iff the target stopped by itself
        text = record.response
        if not text or not text.strip():
            self.stats.skip("no response")
            return None
        ids = self.encoder.tokenizer(text, add_special_tokens=False).input_ids
        return list(ids) + [self.end_id]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] long, right-padded
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE on prompt and padding
    image_embeds: torch.Tensor | None  # [sum image tokens, D], batch-major reading order
    num_tokens: int  # real (unpadded) tokens

    def _map(self, fn) -> Batch:
        embeds = None if self.image_embeds is None else fn(self.image_embeds)
        return Batch(fn(self.input_ids), fn(self.attention_mask), fn(self.labels), embeds, self.num_tokens)

    def to(self, device: torch.device | str) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        return self._map(lambda t: t.pin_memory())


def collate(samples: list[Sample], features: list[list[torch.Tensor]] | None, pad_id: int) -> Batch:
    """Right-pad to the longest sample; image features concatenated batch-major, image by image."""
    n = max(len(s) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s)] = s.input_ids.to(torch.long)
        mask[i, : len(s)] = 1
        labels[i, : len(s)] = s.labels()
    embeds = None
    if features is not None:
        flat = [f for per_sample in features for f in per_sample]
        if flat:
            embeds = torch.cat(flat, dim=0)
    return Batch(ids, mask, labels, embeds, int(mask.sum()))


def sample_digest(samples: list[Sample]) -> str:
    """Identity of exactly what is trained on (ids, tokens, prompt split, image content)."""
    import hashlib

    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.index}|{s.id}|{s.prompt_len}|{','.join(s.image_keys)}|".encode())
        h.update(s.input_ids.numpy().tobytes())
    return h.hexdigest()


def relative_image_paths(record: Record, image_root: Path) -> list[str] | None:
    """Image paths of ``record`` relative to ``image_root``; None if any image is not a file path."""
    out = []
    root = image_root.resolve()
    for src in record.images:
        if not isinstance(src, (str, Path)):
            return None
        out.append(Path(src).resolve().relative_to(root).as_posix())
    return out
