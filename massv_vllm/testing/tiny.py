"""Tiny checkpoints built locally from configs (no hub): tokenizers, VLM targets and small LMs.

Used by the tests, the examples and the synthetic-world pipeline. Every folder written here is a
regular HF-format checkpoint (config.json + model.safetensors + tokenizer/processor files) that
loads in transformers and in vLLM, with the same structure as the real families:
Qwen2.5-VL + Qwen2, and Gemma3 (SigLIP + projector) + Gemma3 text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
GEMMA_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]

# The chat templates of the real checkpoints (Qwen2.5-VL-7B-Instruct, gemma-3-*-it), so prompt
# layout and image placeholder expansion match what users of the real models get.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    '{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = "" -%}'
    "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}"
    "{{'<start_of_turn>model\n'}}{%- endif -%}"
)

DEFAULT_CORPUS = [
    "Describe the image.",
    "There is a small red circle in the top left and a large blue square in the center.",
    "How many triangles are there? There are two triangles.",
    "What colour is the square in the bottom right? It is green.",
    "Where is the yellow triangle? The yellow triangle is on the left.",
    "The picture shows a purple circle, an orange square and a green triangle.",
    "Write a short story about the shapes. Once upon a time a blue circle met a red square.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9.",
    "Hello! How are you today? I am fine, thank you. Please answer the question.",
]


@dataclass(frozen=True)
class TinyFamily:
    """What differs between the two supported model families when building tiny checkpoints."""

    name: str  # "qwen2_5_vl" | "gemma3"
    specials: tuple[str, ...]
    chat_template: str


TINY_FAMILIES = {
    "qwen2_5_vl": TinyFamily("qwen2_5_vl", tuple(QWEN_SPECIALS), QWEN_CHAT_TEMPLATE),
    "gemma3": TinyFamily("gemma3", tuple(GEMMA_SPECIALS), GEMMA_CHAT_TEMPLATE),
}


def train_tokenizer(
    out_dir: str | Path,
    family: str,
    corpus: Iterable[str] = DEFAULT_CORPUS,
    vocab_size: int = 512,
) -> Path:
    """Train a byte-level BPE tokenizer on ``corpus`` and save it in HF format for ``family``.

    The special tokens and chat template are those of the real family, so processors, chat
    templates and vLLM's placeholder expansion behave as with the real checkpoints.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fam = TINY_FAMILIES[family]
    if family == "qwen2_5_vl":  # byte-level BPE, like Qwen2's tokenizer
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece-style "▁" pieces with literal newline tokens, like Gemma's
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
        alphabet = [chr(c) for c in range(33, 127)] + ["▁"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(fam.specials),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    if family == "gemma3":
        # vLLM's Gemma3 processor merges "\n" runs and looks these up as single tokens.
        tok.add_tokens([AddedToken("\n" * n, normalized=False) for n in range(1, 5)])
    if family == "qwen2_5_vl":
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token=None,
            additional_special_tokens=list(fam.specials[1:]),
            extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        )
    else:
        hf = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            additional_special_tokens=list(fam.specials[4:]),
            extra_special_tokens={
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
                "image_token": "<image_soft_token>",
            },
        )
    hf.chat_template = fam.chat_template
    out = Path(out_dir)
    hf.save_pretrained(out)
    return out


def _tok_ids(tok_dir: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    specials = {t for fam in TINY_FAMILIES.values() for t in fam.specials}
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials if t in tok.get_vocab()}
    return ids | {"__len__": len(tok)}


def _copy_tokenizer(tok_dir: Path, out: Path) -> None:
    for f in tok_dir.iterdir():
        if f.is_file():
            (out / f.name).write_bytes(f.read_bytes())


def _save_model(model: torch.nn.Module, out: Path, dtype: torch.dtype) -> None:
    model.to(dtype).save_pretrained(out, safe_serialization=True)


def _rename_keys(path: Path, old_prefix: str, new_prefix: str) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(path)
    sd = {(new_prefix + k[len(old_prefix) :] if k.startswith(old_prefix) else k): v for k, v in sd.items()}
    save_file(sd, path, metadata={"format": "pt"})


def _pad_to(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def make_qwen2_5_vl_target(
    out_dir: str | Path,
    tok_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 256,
    vision_hidden: int = 64,
    vision_depth: int = 2,
    vision_heads: int = 2,
    out_hidden_size: int | None = None,
    vocab_multiple: int = 64,
    vocab_padding: int = 0,
    max_position_embeddings: int = 4096,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A tiny Qwen2_5_VLForConditionalGeneration (random weights) with processor and tokenizer.

    ``vocab_size`` is the tokenizer length plus ``vocab_padding`` rounded up to ``vocab_multiple``,
    as the real checkpoints pad theirs (152064 vs 151665 tokens).
    """
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tok_dir, out = Path(tok_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _tok_ids(tok_dir)
    vocab = _pad_to(ids["__len__"] + vocab_padding, vocab_multiple)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                # M-RoPE sections (t, h, w) in rotary half-dims; they sum to head_dim // 2.
                "mrope_section": _mrope_section(hidden_size // num_heads),
            },
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_heads=vision_heads,
            out_hidden_size=out_hidden_size or hidden_size,
            fullatt_block_indexes=[vision_depth - 1],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    _save_model(model, out, dtype)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    image_processor = Qwen2VLImageProcessor(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
    )
    proc = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    proc.save_pretrained(out)
    _write_generation_config(out, "qwen2_5_vl", ids)
    return out


def _gemma_layer_types(num_layers: int) -> list[str]:
    """Gemma3's 5:1 sliding/full pattern, squeezed so even 2 layers hold both kinds (the real
    models mix them, and that decides how vLLM groups the KV cache)."""
    return [
        "full_attention" if i % 6 == 5 or i == num_layers - 1 else "sliding_attention"
        for i in range(num_layers)
    ]


def _gemma_attention(num_layers: int, head_dim: int, sliding_window: int) -> dict[str, Any]:
    """Gemma3's attention keys of a text config (tiny target and tiny LM alike): head size and query
    scale, the sliding/full layer mix and the RoPE base of each kind of layer."""
    return dict(
        head_dim=head_dim,
        query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window,
        layer_types=_gemma_layer_types(num_layers),
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    )


def _mrope_section(head_dim: int) -> list[int]:
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def make_gemma3_target(
    out_dir: str | Path,
    tok_dir: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    intermediate_size: int = 256,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    vision_heads: int = 2,
    image_size: int = 64,
    patch_size: int = 8,
    mm_tokens_per_image: int = 16,
    sliding_window: int = 64,
    vocab_multiple: int = 64,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A tiny Gemma3ForConditionalGeneration (SigLIP tower + projector, random weights)."""
    from transformers import (
        AutoTokenizer,
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    tok_dir, out = Path(tok_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _tok_ids(tok_dir)
    # Gemma3 puts the image soft token *after* the tokenizer's vocabulary (262144 in 262208);
    # keep that shape: the text vocab is padded past the image token id.
    vocab = _pad_to(ids["__len__"] + 1, vocab_multiple)
    cfg = Gemma3Config(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
            **_gemma_attention(num_layers, head_dim, sliding_window),
            bos_token_id=ids["<bos>"],
            eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
            pad_token_id=ids["<pad>"],
        ),
        vision_config=dict(
            hidden_size=vision_hidden,
            intermediate_size=vision_hidden * 2,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            image_size=image_size,
            patch_size=patch_size,
            vision_use_head=False,
        ),
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():
        # transformers initialises the projector matrix to zeros, which makes every image embed to
        # 0: give the random target a projector that actually passes image information on.
        torch.nn.init.normal_(
            model.model.multi_modal_projector.mm_input_projection_weight, std=vision_hidden**-0.5
        )
    _save_model(model, out, dtype)
    # transformers 5.17 writes the SigLIP tower as "vision_tower.*"; the published Gemma3
    # checkpoints (and vLLM's loader) use "vision_tower.vision_model.*".
    _rename_keys(out / "model.safetensors", "vision_tower.", "vision_tower.vision_model.")
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    image_processor = Gemma3ImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    proc = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA_CHAT_TEMPLATE,
        image_seq_length=mm_tokens_per_image,
    )
    proc.save_pretrained(out)
    _write_generation_config(out, "gemma3", ids)
    return out


def make_small_lm(
    out_dir: str | Path,
    tok_dir: str | Path,
    family: str,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    head_dim: int | None = None,
    intermediate_size: int = 128,
    vocab_multiple: int = 32,
    max_position_embeddings: int = 4096,
    tie_word_embeddings: bool = True,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A tiny same-family text LM (Qwen2ForCausalLM or Gemma3ForCausalLM), the drafter's base.

    Its vocab is the tokenizer length rounded to ``vocab_multiple`` (smaller than the target's,
    as Qwen2.5-1.5B's 151936 is smaller than Qwen2.5-VL-7B's 152064), so the drafter builder's
    vocab padding is exercised.
    """
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen2Config

    tok_dir, out = Path(tok_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = _tok_ids(tok_dir)
    vocab = _pad_to(ids["__len__"], vocab_multiple)
    if family == "qwen2_5_vl":
        cfg = Qwen2Config(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|endoftext|>"],
            tie_word_embeddings=tie_word_embeddings,
        )
    elif family == "gemma3":
        cfg = Gemma3TextConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
            **_gemma_attention(num_layers, head_dim or hidden_size // num_heads, sliding_window=64),
            bos_token_id=ids["<bos>"],
            eos_token_id=ids["<eos>"],
            pad_token_id=ids["<pad>"],
            tie_word_embeddings=tie_word_embeddings,
        )
        cfg.architectures = ["Gemma3ForCausalLM"]
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(TINY_FAMILIES)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    _save_model(model, out, dtype)
    _copy_tokenizer(tok_dir, out)
    _write_generation_config(out, family, ids)
    return out


# generation_config.json's bos token and eos tokens per family (eos: both the plain end and the chat's
# end of turn); the targets and the small LMs of a family must stop on the same tokens.
_GENERATION_TOKENS = {
    "qwen2_5_vl": ("<|endoftext|>", ["<|im_end|>", "<|endoftext|>"]),
    "gemma3": ("<bos>", ["<eos>", "<end_of_turn>"]),
}


def _write_generation_config(out: Path, family: str, ids: dict[str, int]) -> None:
    bos, eos = _GENERATION_TOKENS[family]
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": ids[bos], "eos_token_id": [ids[t] for t in eos]}, indent=2) + "\n"
    )


@dataclass(frozen=True)
class TinySet:
    """A complete tiny family: tokenizer, target VLM, small LM, MASSV and text-only drafters."""

    family: str
    tokenizer: Path
    target: Path
    small_lm: Path
    drafter: Path
    text_drafter: Path


def build_tiny_set(root: str | Path, family: str, dtype: torch.dtype = torch.float32) -> TinySet:
    """Build (or reuse, if complete) every tiny checkpoint of ``family`` under ``root``."""
    from massv_vllm.build import build_drafter

    root = Path(root)
    s = TinySet(
        family=family,
        tokenizer=root / f"{family}-tokenizer",
        target=root / f"{family}-target",
        small_lm=root / f"{family}-small-lm",
        drafter=root / f"{family}-massv-drafter",
        text_drafter=root / f"{family}-text-drafter",
    )
    if (s.text_drafter / "provenance.json").is_file():
        return s
    train_tokenizer(s.tokenizer, family)
    make_target = make_qwen2_5_vl_target if family == "qwen2_5_vl" else make_gemma3_target
    make_target(s.target, s.tokenizer, dtype=dtype)
    make_small_lm(s.small_lm, s.tokenizer, family, dtype=dtype)
    build_drafter(s.small_lm, s.target, s.drafter)
    build_drafter(s.small_lm, s.target, s.text_drafter, text_only=True)
    return s


def make_mirror_drafter(
    target_dir: str | Path,
    tok_dir: str | Path,
    out_dir: str | Path,
    text_only: bool = False,
    sliding_window: int | None = None,
) -> Path:
    """A MASSV drafter that *is* the target's language model: the target's own text stack (same
    weights, vocab and norms) and an identity projector, which hands the target's image
    embeddings through unchanged.

    On text it computes exactly what the target computes, so greedy drafts are accepted (MAL
    close to γ + 1): the accepted-prefix path of speculative decoding (accepted tokens, KV reuse,
    bonus token) is exercised. After an image it differs a little from the target (1-D instead of
    M-RoPE positions for Qwen2.5-VL, causal instead of bidirectional image attention for Gemma3),
    so acceptance there is high but not total. ``text_only``: no projector (the text-only
    baseline's shape; it sees image placeholders as plain tokens). Also written: ``<out_dir>-lm``,
    the plain text LM. ``sliding_window`` (Gemma3): the drafter's window instead of the target's,
    as Gemma3-1B's 512 beside Gemma3-12B's 1024; the same as the target's on sequences shorter
    than both.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, Gemma3TextConfig, Qwen2Config

    from massv_vllm.build import build_drafter
    from massv_vllm.training.modeling import MassvDrafter

    target, out = Path(target_dir), Path(out_dir)
    lm_dir = out.with_name(out.name + "-lm")
    tcfg = AutoConfig.from_pretrained(str(target))
    text = tcfg.get_text_config().to_dict()
    if tcfg.model_type == "qwen2_5_vl":
        rope = {k: v for k, v in text["rope_parameters"].items() if k != "mrope_section"}
        keep = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rms_norm_eps",
            "hidden_act",
            "tie_word_embeddings",
            "bos_token_id",
            "eos_token_id",
        ]
        cfg = Qwen2Config(**{k: text[k] for k in keep if k in text}, rope_parameters=rope)
        prefix = ""  # the tiny Qwen2.5-VL target stores model.* and lm_head.* (vLLM's names)
    elif tcfg.model_type == "gemma3":
        drop = {"model_type", "architectures", "dtype", "transformers_version", "_name_or_path"}
        if sliding_window is not None:
            text["sliding_window"] = sliding_window
        cfg = Gemma3TextConfig(**{k: v for k, v in text.items() if k not in drop})
        cfg.architectures = ["Gemma3ForCausalLM"]
        prefix = "language_model."
    else:
        raise ValueError(f"no mirror drafter for model_type {tcfg.model_type!r}")
    if sliding_window is not None and tcfg.model_type != "gemma3":
        raise ValueError(f"sliding_window is for Gemma3 mirrors, not {tcfg.model_type!r}")
    sd = load_file(str(target / "model.safetensors"))
    lm_sd = {
        k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix + "model.") or k == "lm_head.weight"
    }
    model = AutoModelForCausalLM.from_config(cfg)
    missing, unexpected = model.load_state_dict(lm_sd, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]:
        raise RuntimeError(f"mirror LM weights do not fit: missing {missing}, unexpected {unexpected}")
    lm_dir.mkdir(parents=True, exist_ok=True)
    _save_model(model, lm_dir, next(iter(sd.values())).dtype)
    _copy_tokenizer(Path(tok_dir), lm_dir)
    gen = target / "generation_config.json"
    if gen.is_file():
        (lm_dir / "generation_config.json").write_bytes(gen.read_bytes())
    build_drafter(lm_dir, target, out, projector_depth=1, text_only=text_only)
    if text_only:
        return out
    drafter = MassvDrafter.from_pretrained(out)
    lin = drafter.projector.linears[0]
    if lin.weight.shape[0] != lin.weight.shape[1]:
        raise ValueError(f"image embedding width {lin.weight.shape[1]} != LM width {lin.weight.shape[0]}")
    with torch.no_grad():
        lin.weight.copy_(torch.eye(lin.weight.shape[0], dtype=lin.weight.dtype))
        lin.bias.zero_()
    drafter.save_pretrained(out, tokenizer_from=lm_dir)
    return out


def synthetic_image(seed: int, size: tuple[int, int] = (224, 160)):
    """A deterministic, content-rich RGB test image (fractal + coloured shapes) of ``size``."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    w, h = size
    x0, y0 = rng.uniform(-2.0, -0.5), rng.uniform(-1.2, 0.2)
    img = Image.effect_mandelbrot((w, h), (x0, y0, x0 + 1.5, y0 + 1.0), rng.randint(20, 90))
    img = img.convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, 4)):
        cx, cy, r = rng.randint(0, w), rng.randint(0, h), rng.randint(5, max(6, min(w, h) // 3))
        color = tuple(rng.randint(0, 255) for _ in range(3))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    return img
