"""Training samples: token ids laid out exactly as vLLM serves them, with loss only on the response.

A sample is the target's chat-templated prompt with every image placeholder expanded
(``TargetEncoder.chat_prompt`` + ``TargetEncoder.prompt_ids``, the same expansion vLLM does), then
the response: for phase 1 the caption text tokenized plus the end-of-turn token, for SDViT the
exact token ids the target generated (``generate.py`` records them). Labels are -100 on every
prompt token (image positions included) and the token ids on the response.

Samples that cannot be used (unreadable/missing/oversized images, too long, no response, token
ids outside the target's vocabulary) are skipped and counted in ``ReadStats``; a run never stops on
one bad sample. A generated response holding an image/video placeholder token (the target can
sample one) is cut before it and counted (``ReadStats.cut``): the drafter would otherwise find more
image positions than image features.
"""

from __future__ import annotations

import re
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
    """The reason an image that ``load_image`` refused is counted under."""
    return err.reason if err.reason != "malformed" else "unreadable image"


# Config attributes naming multimodal placeholder / delimiter tokens: Qwen2.5-VL's image_token_id,
# video_token_id, vision_start/end_token_id, vision_token_id; Gemma3's image_token_index (the image
# soft token), boi_token_index / eoi_token_index (start / end of image); audio ones of other VLMs.
_PLACEHOLDER_ATTR = re.compile(r"^(image|video|vision|audio|boi|eoi|boa|eoa)(_\w+)?_token_(id|index)$")
_PLACEHOLDER_TOKENS = (
    "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<image_soft_token>", "<start_of_image>", "<end_of_image>", "<image>", "<video>",
)  # fmt: skip
PLACEHOLDER_CUT = "response cut at an image/video placeholder token"
PLACEHOLDER_ONLY = "response starts with an image/video placeholder token"


def placeholder_token_ids(config: Any, tokenizer: Any = None) -> frozenset[int]:
    """Token ids that only a prompt's multimodal placeholders may hold (image, video, vision
    start/end, Gemma's image soft token and start/end of image): from the target's HF config (a
    ``PretrainedConfig`` or a dict, top level and text config) and its tokenizer's vocabulary.
    The end-of-turn / end-of-sequence tokens are never among them."""
    raw = config if isinstance(config, dict) else config.to_dict()
    out: set[int] = set()
    for section in (raw, raw.get("text_config") or {}, raw.get("vision_config") or {}):
        for k, v in section.items():
            if _PLACEHOLDER_ATTR.match(k) and isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                out.add(v)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        names = set(_PLACEHOLDER_TOKENS)
        for attr in ("image_token", "video_token", "boi_token", "eoi_token"):
            if isinstance(getattr(tokenizer, attr, None), str):
                names.add(getattr(tokenizer, attr))
        out |= {vocab[n] for n in names if n in vocab}
        eos = getattr(tokenizer, "eos_token_id", None)
        out -= set(eos if isinstance(eos, list) else [eos])
    return frozenset(out)


def first_placeholder(ids: list[int], placeholders: frozenset[int]) -> int | None:
    """Position of the first placeholder token in ``ids``, or None."""
    return next((i for i, t in enumerate(ids) if t in placeholders), None)


def valid_token_ids(ids: Any, vocab_size: int) -> bool:
    """A non-empty list of ints (not bools) each in ``[0, vocab_size)``."""
    return isinstance(ids, list) and bool(ids) and all(type(t) is int and 0 <= t < vocab_size for t in ids)


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
        # Token ids must index the drafter's embedding table: the target's (padded) text vocab.
        self.vocab_size = encoder.family.text_vocab_size(encoder.config)
        self.placeholders = placeholder_token_ids(encoder.config, encoder.tokenizer)

    def build(self, index: int, record: Record) -> tuple[Sample, list[Any]] | None:
        """The sample and its loaded images, or None (skip counted in ``stats``)."""
        images = []
        for src in record.images:
            try:
                images.append(load_image(src))
            except DataError as e:
                self.stats.skip(skip_reason(e))
                return None
        got = self._response_ids(record)
        if got is None:
            return None
        response, cut = got
        text = self.encoder.chat_prompt(hf_messages(record))
        try:
            prompt = self.encoder.prompt_ids(text, images)
        except (ValueError, RuntimeError, OSError) as e:  # the processor rejects the image
            self.stats.skip(f"processor error ({type(e).__name__})")
            return None
        # Data from generate.py carries the prompt vLLM actually ran: it must match ours.
        ran = record.meta.get("prompt_token_ids") if self.check_prompt_ids else None
        if ran is not None and ran != prompt.input_ids:
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
        if cut:
            self.stats.note_cut(PLACEHOLDER_CUT)
        return sample, images

    def _response_ids(self, record: Record) -> tuple[list[int], bool] | None:
        """The response's token ids and whether they were cut at a placeholder; None: skipped."""
        if self.response == RESPONSE_TOKEN_IDS:
            ids = record.meta.get("response_token_ids")
            if not isinstance(ids, list) or not ids:
                self.stats.skip("no generated token ids")
                return None
            if not valid_token_ids(ids, self.vocab_size):
                self.stats.skip("generated token ids outside the vocabulary")
                return None
            # verbatim (the end token is there iff the target stopped by itself), but never past a
            # placeholder token: the sample would hold more image positions than images
            cut = first_placeholder(ids, self.placeholders)
            if cut == 0:
                self.stats.skip(PLACEHOLDER_ONLY)
                return None
            return (list(ids), False) if cut is None else (list(ids[:cut]), True)
        text = record.response
        if not text or not text.strip():
            self.stats.skip("no response")
            return None
        ids = self.encoder.tokenizer(text, add_special_tokens=False).input_ids
        if first_placeholder(ids, self.placeholders) is not None:  # a literal "<|image_pad|>" & co.
            self.stats.skip("response text holds an image/video placeholder token")
            return None
        return [*ids, self.end_id], False


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
