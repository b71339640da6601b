"""Training data: readers on on-disk fixtures, skip-and-count, token layout and label masking."""

from __future__ import annotations

import json

import pytest
import torch

from massv_vllm.testing.synthetic import CAPTIONS, write_llava_set
from massv_vllm.testing.tiny import synthetic_image
from massv_vllm.training.data.feature_cache import image_key
from massv_vllm.training.data.records import (
    ReadStats,
    Record,
    hf_messages,
    load_image,
    openai_messages,
    read_records,
)
from massv_vllm.training.data.samples import (
    IGNORE,
    RESPONSE_TOKEN_IDS,
    SampleBuilder,
    collate,
    end_of_turn_id,
    strip_images,
)
from massv_vllm.training.target_features import TargetEncoder


@pytest.fixture(scope="module")
def qwen_enc(tiny_qwen):
    return TargetEncoder(tiny_qwen.target, load_vision=False)


@pytest.fixture(scope="module")
def gemma_enc(tiny_gemma):
    return TargetEncoder(tiny_gemma.target, load_vision=False)


def _build_all(builder, records):
    out = []
    for i, rec in enumerate(records):
        built = builder.build(i, rec)
        if built is not None:
            out.append(built[0])
    return out


def test_llava_json_and_jsonl(tmp_path, qwen_enc):
    path = write_llava_set(tmp_path, 6)
    rows = json.loads(path.read_text())
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for p in (path, tmp_path / "c.jsonl"):
        stats = ReadStats()
        samples = _build_all(SampleBuilder(qwen_enc, max_len=1024), read_records(p, stats=stats))
        assert [s.id for s in samples] == [r["id"] for r in rows]
        assert [s.index for s in samples] == list(range(6))
        assert stats.seen == stats.kept == 6
        # the image keys are the content of the files
        assert samples[2].image_keys == [image_key(load_image(tmp_path / rows[2]["image"]))]


def _hf_dataset(n=3):
    import datasets

    imgs = [synthetic_image(i, (56, 56)) for i in range(n)]
    return datasets.Dataset.from_dict(
        {
            "img": imgs,
            "question": ["Describe the image."] * n,
            "caption": CAPTIONS[:n],
            "key": [f"k{i}" for i in range(n)],
        },
        features=datasets.Features(
            {
                "img": datasets.Image(),
                "question": datasets.Value("string"),
                "caption": datasets.Value("string"),
                "key": datasets.Value("string"),
            }
        ),
    ), imgs


def test_hf_save_to_disk_and_parquet(tmp_path, qwen_enc):
    ds, imgs = _hf_dataset()
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    folder = tmp_path / "imagefolder" / "train"  # imagefolder: images + metadata.jsonl
    folder.mkdir(parents=True)
    meta = []
    for i, im in enumerate(imgs):
        im.save(folder / f"{i}.png")
        meta.append(
            {
                "file_name": f"{i}.png",
                "question": "Describe the image.",
                "caption": CAPTIONS[i],
                "key": f"k{i}",
            }
        )
    (folder / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    cols = dict(image_column="img", prompt_column="question", response_column="caption", id_column="key")
    for src in (tmp_path / "saved", tmp_path / "d.parquet", tmp_path / "imagefolder"):
        if src.name == "imagefolder":
            cols["image_column"] = "image"
        samples = _build_all(SampleBuilder(qwen_enc, max_len=1024), read_records(src, **cols))
        assert [s.id for s in samples] == ["k0", "k1", "k2"]
        # content keys: the same image in any container hits the same cache entry
        assert [s.image_keys[0] for s in samples] == [image_key(im) for im in imgs]
        ids = samples[1].input_ids[samples[1].prompt_len :].tolist()
        assert ids == qwen_enc.tokenizer(CAPTIONS[1], add_special_tokens=False).input_ids + [
            end_of_turn_id(qwen_enc)
        ]


def test_broken_images_and_long_samples_are_skipped_and_counted(tmp_path, qwen_enc):
    path = write_llava_set(tmp_path, 6)
    rows = json.loads(path.read_text())
    (tmp_path / rows[0]["image"]).write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt bytes
    (tmp_path / rows[1]["image"]).unlink()  # missing file
    (tmp_path / rows[2]["image"]).write_bytes(b"")  # zero-size file
    rows[3]["conversations"][1]["value"] = "word " * 400  # over --max-len
    rows.append({"id": "escape", "image": "../outside.png", "conversations": rows[4]["conversations"]})
    path.write_text(json.dumps(rows))
    read = ReadStats()
    builder = SampleBuilder(qwen_enc, max_len=256)
    samples = _build_all(builder, read_records(path, stats=read))
    assert [s.id for s in samples] == [rows[4]["id"], rows[5]["id"]]
    assert dict(builder.stats.skipped) == {"unreadable image": 2, "missing image": 1, "too long": 1}
    assert dict(read.skipped) == {"path outside image root": 1}


def test_corrupt_image_in_hf_dataset_is_skipped(tmp_path, qwen_enc):
    import datasets

    ds, _ = _hf_dataset()
    raw = ds.cast_column("img", datasets.Image(decode=False)).to_dict()
    raw["img"][1] = {"bytes": b"not an image", "path": None}
    bad = datasets.Dataset.from_dict(raw, features=ds.features.copy())
    bad.save_to_disk(str(tmp_path / "bad"))
    builder = SampleBuilder(qwen_enc, max_len=1024)
    cols = dict(image_column="img", prompt_column="question", response_column="caption", id_column="key")
    samples = _build_all(builder, read_records(tmp_path / "bad", **cols))
    assert [s.id for s in samples] == ["k0", "k2"]
    assert builder.stats.skipped["unreadable image"] == 1


@pytest.fixture(scope="module")
def vllm_prompt(tiny_qwen, tiny_gemma):
    """The prompt vLLM itself builds for a chat (its renderer: chat template, tokenization and the
    multimodal processor's placeholder expansion, what ``LLM.chat`` runs), without an engine."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers import renderer_from_config
    from vllm.renderers.params import ChatParams

    from massv_vllm.engine import engine_kwargs

    renderers = {}

    def render(family, record, images):
        if family not in renderers:
            tiny = tiny_qwen if family == "qwen2_5_vl" else tiny_gemma
            config = EngineArgs(**engine_kwargs(str(tiny.target), max_model_len=1024)).create_engine_config()
            renderers[family] = renderer_from_config(config)
        renderer = renderers[family]
        params = ChatParams(
            chat_template_kwargs=dict(
                add_generation_prompt=True, continue_final_message=False, tools=None, tokenize=False
            )
        )
        _, (out,) = renderer.render_chat(
            [openai_messages(record, images)], params, renderer.default_chat_tok_params
        )
        embeds = []  # per image: the positions vLLM fills with image embeddings
        for r in out["mm_placeholders"].get("image", []):
            mask = [True] * r.length if r.is_embed is None else r.is_embed.tolist()
            embeds.append([r.offset + i for i, m in enumerate(mask) if m])
        return out["prompt_token_ids"], embeds

    return render


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_labels_mask_prompt_and_image_positions(family, request, vllm_prompt):
    enc = request.getfixturevalue("qwen_enc" if family == "qwen2_5_vl" else "gemma_enc")
    end_tok = {"qwen2_5_vl": "<|im_end|>", "gemma3": "<end_of_turn>"}[family]
    assert end_of_turn_id(enc) == enc.tokenizer.convert_tokens_to_ids(end_tok)
    imgs = [synthetic_image(1, (84, 56)), synthetic_image(2, (56, 56))]
    rec = Record(
        id="r",
        images=imgs,
        turns=[("user", "<image>\nCompare <image> please."), ("assistant", "A red circle.")],
    )
    sample, _ = SampleBuilder(enc, max_len=1024).build(7, rec)
    served_ids, served_images = vllm_prompt(family, rec, imgs)  # what vLLM serves for this chat
    ids, labels = sample.input_ids.long(), sample.labels()
    assert sample.prompt_len == len(served_ids)
    assert ids[: sample.prompt_len].tolist() == served_ids  # identical to the serving layout
    image_pos = (ids == enc.image_token_id).nonzero().flatten().tolist()
    assert image_pos == [i for per_image in served_images for i in per_image]
    assert sample.image_tokens == [len(p) for p in served_images] and len(image_pos) > 0
    assert (labels[: sample.prompt_len] == IGNORE).all()
    assert (labels[image_pos] == IGNORE).all()
    response = enc.tokenizer("A red circle.", add_special_tokens=False).input_ids + [end_of_turn_id(enc)]
    assert labels[sample.prompt_len :].tolist() == response == ids[sample.prompt_len :].tolist()
    assert sample.index == 7 and sample.image_keys == [image_key(i) for i in imgs]


def test_generated_token_ids_are_used_verbatim(qwen_enc):
    img = synthetic_image(3, (56, 56))
    rec = Record(id="g", images=[img], turns=[("user", "<image>\nDescribe the image.")])
    prompt = qwen_enc.prompt_ids(qwen_enc.chat_prompt(hf_messages(rec)), [img]).input_ids
    gen = [40, 41, 42, 7]  # whatever the target produced, end token or not
    builder = SampleBuilder(qwen_enc, max_len=1024, response=RESPONSE_TOKEN_IDS)
    ok = Record(
        id="g", images=[img], turns=rec.turns, meta={"response_token_ids": gen, "prompt_token_ids": prompt}
    )
    sample, _ = builder.build(0, ok)
    assert sample.input_ids.tolist() == prompt + gen
    assert sample.labels()[sample.prompt_len :].tolist() == gen
    # a prompt that differs from what vLLM ran, or no token ids at all: skipped and counted
    bad = Record(
        id="b",
        images=[img],
        turns=rec.turns,
        meta={"response_token_ids": gen, "prompt_token_ids": prompt[1:]},
    )
    assert builder.build(1, bad) is None
    assert builder.build(2, Record(id="n", images=[img], turns=[*rec.turns, ("assistant", "x")])) is None
    assert dict(builder.stats.skipped) == {"prompt differs from generation": 1, "no generated token ids": 1}


def test_text_only_records(qwen_enc):
    rec = Record(
        id="t", images=[synthetic_image(0)], turns=[("user", "<image>\nHi there"), ("assistant", "Hello")]
    )
    t = strip_images(rec)
    assert t.images == [] and t.turns[0] == ("user", "Hi there")
    sample, images = SampleBuilder(qwen_enc, max_len=1024).build(0, t)
    assert images == [] and sample.image_keys == []
    assert qwen_enc.image_token_id not in sample.input_ids.tolist()


def test_collate_pads_right_and_orders_features_batch_major(qwen_enc):
    builder = SampleBuilder(qwen_enc, max_len=1024)
    recs = [
        Record(
            id="a",
            images=[synthetic_image(0, (56, 56))],
            turns=[("user", "<image>\nHi"), ("assistant", "Yes")],
        ),
        Record(
            id="b", images=[], turns=[("user", "Hello"), ("assistant", "A long answer about the shapes.")]
        ),
        Record(
            id="c",
            images=[synthetic_image(1, (84, 56)), synthetic_image(2, (56, 56))],
            turns=[("user", "<image><image>\nCompare"), ("assistant", "No")],
        ),
    ]
    samples = [builder.build(i, r)[0] for i, r in enumerate(recs)]
    feats = [
        [torch.full((n, 4), float(10 * i + j)) for j, n in enumerate(s.image_tokens)]
        for i, s in enumerate(samples)
    ]
    b = collate(samples, feats, pad_id=0)
    n = max(len(s) for s in samples)
    assert b.input_ids.shape == (3, n) and b.num_tokens == sum(len(s) for s in samples)
    for i, s in enumerate(samples):
        assert b.attention_mask[i].tolist() == [1] * len(s) + [0] * (n - len(s))
        assert (b.labels[i, len(s) :] == IGNORE).all()
        assert b.labels[i, : len(s)].tolist() == s.labels().tolist()
    # one embedding row per image token, in reading order: sample a, then c's two images
    expect = (
        [0.0] * samples[0].image_tokens[0]
        + [20.0] * samples[2].image_tokens[0]
        + [21.0] * samples[2].image_tokens[1]
    )
    assert b.image_embeds[:, 0].tolist() == expect
    assert int((b.input_ids == qwen_enc.image_token_id).sum()) == len(expect)


def _generated(img, prompt, gen, **meta):
    turns = [("user", "<image>\nDescribe the image.")]
    return Record(
        id="g",
        images=[img],
        turns=turns,
        meta={"response_token_ids": gen, "prompt_token_ids": prompt, **meta},
    )


def test_generated_token_ids_outside_the_vocabulary_are_skipped(qwen_enc):
    img = synthetic_image(3, (56, 56))
    rec = Record(id="g", images=[img], turns=[("user", "<image>\nDescribe the image.")])
    prompt = qwen_enc.prompt_ids(qwen_enc.chat_prompt(hf_messages(rec)), [img]).input_ids
    vocab = qwen_enc.config.get_text_config().vocab_size  # the drafter's embedding rows
    builder = SampleBuilder(qwen_enc, max_len=1024, response=RESPONSE_TOKEN_IDS)
    assert builder.build(0, _generated(img, prompt, [40, vocab - 1])) is not None  # the last row is fine
    bad = [[40, vocab], [10**9], [-5, 40], [2**70], [40, True], [40, 4.0], [40, "41"]]
    assert all(builder.build(i, _generated(img, prompt, ids)) is None for i, ids in enumerate(bad, 1))
    # a prompt_token_ids of the wrong type is a mismatch, not a crash
    assert builder.build(9, _generated(img, 7, [40])) is None
    assert builder.build(10, _generated(img, [2**70], [40])) is None
    assert dict(builder.stats.skipped) == {
        "generated token ids outside the vocabulary": len(bad),
        "prompt differs from generation": 2,
    }


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_placeholder_tokens_in_generated_responses_are_cut_and_counted(family, request):
    enc = request.getfixturevalue("qwen_enc" if family == "qwen2_5_vl" else "gemma_enc")
    tok = enc.tokenizer
    names = {
        "qwen2_5_vl": ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"],
        "gemma3": ["<image_soft_token>", "<start_of_image>", "<end_of_image>"],
    }[family]
    placeholders = [tok.convert_tokens_to_ids(n) for n in names]
    assert enc.image_token_id in placeholders
    img = synthetic_image(3, (56, 56))
    rec = Record(id="g", images=[img], turns=[("user", "<image>\nDescribe the image.")])
    prompt = enc.prompt_ids(enc.chat_prompt(hf_messages(rec)), [img]).input_ids
    end = end_of_turn_id(enc)
    builder = SampleBuilder(enc, max_len=1024, response=RESPONSE_TOKEN_IDS)
    for i, ph in enumerate(placeholders):
        sample, _ = builder.build(i, _generated(img, prompt, [40, 41, ph, 42, enc.image_token_id, end]))
        assert sample.input_ids.tolist() == prompt + [40, 41]  # cut at the first placeholder
        assert int((sample.input_ids == enc.image_token_id).sum()) == sum(sample.image_tokens)
    assert builder.build(9, _generated(img, prompt, [enc.image_token_id, 40, end])) is None
    assert builder.build(10, _generated(img, prompt, [40, 41, end])) is not None  # untouched
    assert dict(builder.stats.cut) == {"response cut at an image/video placeholder token": len(names)}
    assert dict(builder.stats.skipped) == {"response starts with an image/video placeholder token": 1}
    assert builder.stats.summary().endswith(
        f"; cut: {len(names)} response cut at an image/video placeholder token"
    )
    # a caption that spells a placeholder out is tokenized to it: skipped, not trained on
    text = SampleBuilder(enc, max_len=1024)
    cap = Record(id="c", images=[img], turns=[*rec.turns, ("assistant", f"A {names[0]} circle.")])
    assert text.build(0, cap) is None
    assert dict(text.stats.skipped) == {"response text holds an image/video placeholder token": 1}


def test_image_placeholder_in_a_response_is_named_in_the_mismatch_error(tiny_qwen):
    from massv_vllm.training.modeling import MassvDrafter

    d = MassvDrafter.from_pretrained(tiny_qwen.drafter).eval()
    im = d.massv.target.image_token_id
    ids = torch.tensor([[30, im, im, 31, 40, im, 41]])  # prompt: 4 tokens (2 image), response: 3
    labels = torch.tensor([[IGNORE] * 4 + [40, im, 41]])
    feats = torch.randn(2, d.massv.projector.input_dim)
    with pytest.raises(
        ValueError, match=r"3 image-token positions .* \(2 in the prompts, 1 in the responses\)"
    ):
        d(ids, image_embeds=feats, labels=labels)
    with pytest.raises(ValueError, match=r"\(all in the prompts\): the prompt's placeholder expansion"):
        d(ids[:, :4], image_embeds=feats[:1], labels=labels[:, :4])


def test_decompression_bomb_image_is_a_counted_skip(tmp_path, qwen_enc):
    from massv_vllm.testing.synthetic import png_header_only

    path = write_llava_set(tmp_path, 3)
    rows = json.loads(path.read_text())
    (tmp_path / rows[1]["image"]).write_bytes(png_header_only(20_000, 20_000))
    builder = SampleBuilder(qwen_enc, max_len=1024)
    samples = _build_all(builder, read_records(path))
    assert [s.id for s in samples] == [rows[0]["id"], rows[2]["id"]]
    assert dict(builder.stats.skipped) == {"image too large": 1}
