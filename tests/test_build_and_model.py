"""Builder, vocab padding, projector splicing and save/load of the transformers-side drafter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from massv_vllm.build import build_drafter
from massv_vllm.serving.checks import check_pair, target_config_from_dir
from massv_vllm.serving.config import MassvConfigError
from massv_vllm.training.modeling import MassvDrafter, merge_image_embeds


def _small_vocab(path) -> int:
    return json.loads((path / "config.json").read_text())["vocab_size"]


def test_builder_pads_vocab_and_sizes_projector(tiny_set):
    tcfg = target_config_from_dir(tiny_set.target)
    info = check_pair(tiny_set.drafter, tcfg, tiny_set.target)
    m = info.massv
    text_vocab = tcfg.get_text_config().vocab_size
    small_vocab = _small_vocab(tiny_set.small_lm)
    assert small_vocab < text_vocab  # the fixture really exercises padding
    assert info.base_config.vocab_size == text_vocab == m.target.vocab_size
    assert m.base_vocab_size == small_vocab
    expected_width = (
        tcfg.vision_config.out_hidden_size
        if tiny_set.family == "qwen2_5_vl"
        else tcfg.text_config.hidden_size
    )
    assert m.projector.input_dim == m.target.image_embed_dim == expected_width
    assert m.target.image_token_id == (
        tcfg.image_token_id if tiny_set.family == "qwen2_5_vl" else tcfg.image_token_index
    )
    with safe_open(str(tiny_set.drafter / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
        w0 = f.get_tensor("projector.linears.0.weight")
        w1 = f.get_tensor("projector.linears.1.weight")
    assert emb.shape[0] == text_vocab
    assert torch.count_nonzero(emb[small_vocab:]) == 0  # padded rows are zero
    assert w0.shape == (m.projector.hidden_dim, expected_width)
    assert w1.shape == (info.base_config.hidden_size, m.projector.hidden_dim)
    assert (tiny_set.drafter / "provenance.json").is_file()
    assert (tiny_set.drafter / "tokenizer.json").is_file()


def test_builder_keeps_small_lm_weights(tiny_qwen):
    from transformers import AutoModelForCausalLM

    small = AutoModelForCausalLM.from_pretrained(str(tiny_qwen.small_lm))
    drafter = MassvDrafter.from_pretrained(tiny_qwen.drafter)
    n = small.get_input_embeddings().weight.shape[0]
    assert torch.equal(drafter.base.get_input_embeddings().weight[:n], small.get_input_embeddings().weight)
    sd = dict(small.named_parameters())
    for name, p in drafter.base.named_parameters():
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(p, sd[name]), name


def test_text_only_drafter(tiny_set):
    d = MassvDrafter.from_pretrained(tiny_set.text_drafter)
    assert d.projector is None and d.massv.text_only
    ids = torch.tensor([[30, 31, d.massv.target.image_token_id, 32]])
    # images are ignored, so passing some changes nothing
    a = d(ids).logits
    b = d(ids, image_embeds=torch.randn(1, d.massv.target.image_embed_dim)).logits
    assert torch.equal(a, b)


def test_projector_output_is_spliced_at_image_positions(tiny_set):
    d = MassvDrafter.from_pretrained(tiny_set.drafter).eval()
    tok = d.massv.target.image_token_id
    ids = torch.tensor([[30, tok, tok, 31, tok, 32]])
    feats = torch.randn(3, d.massv.projector.input_dim)
    emb = d.embed(ids, feats)
    plain = d.base.get_input_embeddings()(ids)
    mask = ids[0] == tok
    assert torch.allclose(emb[0, mask], d.projector(feats), atol=1e-6)
    assert torch.equal(emb[0, ~mask], plain[0, ~mask])
    # the features matter: other features, other logits
    out_a = d(ids, image_embeds=feats).logits
    out_b = d(ids, image_embeds=feats + 1.0).logits
    assert not torch.allclose(out_a[0, -1], out_b[0, -1])
    with pytest.raises(ValueError, match="3 image-token positions in input_ids but 2 image embeddings"):
        merge_image_embeds(plain, ids, tok, torch.randn(2, plain.shape[-1]))


def test_padded_vocab_logits_are_masked_and_never_sampled(tiny_set):
    d = MassvDrafter.from_pretrained(tiny_set.drafter)
    ids = torch.tensor([[30, 31, 32, 33]])
    out = d(ids, labels=ids)
    n = d.massv.base_vocab_size
    assert torch.isinf(out.logits[..., n:]).all() and (out.logits[..., n:] < 0).all()
    assert torch.isfinite(out.logits[..., :n]).all()
    assert torch.isfinite(out.loss) and out.num_loss_tokens == 3
    labels = torch.tensor([[-100, -100, 32, 33]])
    assert d(ids, labels=labels).num_loss_tokens == 2


def test_save_and_reload_gives_identical_outputs(tiny_set, tmp_path):
    d = MassvDrafter.from_pretrained(tiny_set.drafter).eval()
    with torch.no_grad():
        for p in d.projector.parameters():
            p.add_(0.1)  # a "trained" state, distinct from the file
    d.save_pretrained(tmp_path / "d", tokenizer_from=tiny_set.drafter)
    e = MassvDrafter.from_pretrained(tmp_path / "d").eval()
    tok = d.massv.target.image_token_id
    ids = torch.tensor([[30, tok, tok, 31]])
    feats = torch.randn(2, d.massv.projector.input_dim)
    assert torch.equal(d(ids, image_embeds=feats).logits, e(ids, image_embeds=feats).logits)


def test_builder_refuses_mismatched_families(tiny_qwen, tiny_gemma, tmp_path):
    with pytest.raises(MassvConfigError) as e:
        build_drafter(tiny_gemma.small_lm, tiny_qwen.target, tmp_path / "x")
    msg = str(e.value)
    assert "small LM model_type 'gemma3_text' is not of the target's family" in msg
    assert "tokenizer differs from the target's" in msg
    with pytest.raises(MassvConfigError, match="not a supported VLM"):
        build_drafter(tiny_qwen.small_lm, tiny_qwen.small_lm, tmp_path / "y")


def test_builder_cli(tiny_qwen, tmp_path):
    from massv_vllm.build import main

    main(
        [
            "--small-lm",
            str(tiny_qwen.small_lm),
            "--target",
            str(tiny_qwen.target),
            "--out",
            str(tmp_path / "c"),
            "--projector-hidden-dim",
            "96",
            "--projector-depth",
            "3",
            "--activation",
            "silu",
        ]
    )
    m = MassvDrafter.from_pretrained(tmp_path / "c").massv
    assert (m.projector.hidden_dim, m.projector.depth, m.projector.activation) == (96, 3, "silu")
