"""Bad drafters and bad pairings: one clear error naming the problem, before any engine starts."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from massv_vllm.serving.checks import check_drafter, check_pair, target_config_from_dir
from massv_vllm.serving.config import MassvConfigError


@pytest.fixture
def drafter_copy(tiny_qwen, tmp_path):
    dst = tmp_path / "drafter"
    shutil.copytree(tiny_qwen.drafter, dst)
    return dst


def _edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_weights(folder, fn):
    sd = load_file(str(folder / "model.safetensors"))
    fn(sd)
    save_file(sd, str(folder / "model.safetensors"))


def _pair_error(drafter, tiny_qwen) -> str:
    with pytest.raises(MassvConfigError) as e:
        check_pair(drafter, target_config_from_dir(tiny_qwen.target), tiny_qwen.target)
    return str(e.value)


def test_good_pair_passes(tiny_set):
    info = check_pair(tiny_set.drafter, target_config_from_dir(tiny_set.target), tiny_set.target)
    assert info.massv.target.family == tiny_set.family


def test_projector_width_differs_from_target_embedding(drafter_copy, tiny_qwen):
    def widen(cfg):
        cfg["massv"]["projector"]["input_dim"] += 16
        cfg["massv"]["target"]["image_embed_dim"] += 16

    _edit_config(drafter_copy, widen)
    _edit_weights(drafter_copy, lambda sd: sd.update({"projector.linears.0.weight": torch.zeros(64, 144)}))
    assert "projector input width 144 != target image-embedding width 128" in _pair_error(
        drafter_copy, tiny_qwen
    )


def test_projector_output_differs_from_small_lm_hidden(drafter_copy):
    _edit_weights(drafter_copy, lambda sd: sd.update({"projector.linears.1.weight": torch.zeros(48, 64)}))
    with pytest.raises(
        MassvConfigError, match=r"projector.linears.1.weight has shape \[48, 64\], config implies \[64, 64\]"
    ):
        check_drafter(drafter_copy)


def test_vocab_of_another_size(drafter_copy, tiny_qwen):
    def shrink(cfg):
        cfg["vocab_size"] = cfg["massv"]["target"]["vocab_size"] = 480

    _edit_config(drafter_copy, shrink)
    _edit_weights(
        drafter_copy,
        lambda sd: sd.update({"model.embed_tokens.weight": sd["model.embed_tokens.weight"][:480]}),
    )
    assert "vocab size 480 != target text vocab size 512" in _pair_error(drafter_copy, tiny_qwen)


def test_tokenizer_of_another_family(drafter_copy, tiny_qwen, tiny_gemma):
    shutil.copyfile(tiny_gemma.drafter / "tokenizer.json", drafter_copy / "tokenizer.json")
    msg = _pair_error(drafter_copy, tiny_qwen)
    assert "tokenizer differs from the target's" in msg and "not the same model family/vocab" in msg


def test_drafter_for_another_family(tiny_gemma, tiny_qwen):
    assert "family mismatch: drafter is for gemma3, target is qwen2_5_vl" in _pair_error(
        tiny_gemma.drafter, tiny_qwen
    )


def test_image_token_mismatch(drafter_copy, tiny_qwen):
    _edit_config(drafter_copy, lambda c: c["massv"]["target"].update(image_token_id=7))
    assert "image token id 7 != target's image_token_id 5" in _pair_error(drafter_copy, tiny_qwen)


def test_missing_weights(drafter_copy):
    (drafter_copy / "model.safetensors").unlink()
    with pytest.raises(MassvConfigError, match=r"no weight files \(\*\.safetensors\)"):
        check_drafter(drafter_copy)


def test_missing_tensor(drafter_copy):
    _edit_weights(drafter_copy, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MassvConfigError, match="missing tensors: model.layers.1.mlp.up_proj.weight"):
        check_drafter(drafter_copy)


def test_corrupt_and_truncated_safetensors(drafter_copy):
    f = drafter_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(MassvConfigError, match="corrupt or truncated safetensors file model.safetensors"):
        check_drafter(drafter_copy)
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(MassvConfigError, match="corrupt or truncated"):
        check_drafter(drafter_copy)


def test_pickle_weights_refused_unless_allowed(drafter_copy, monkeypatch):
    sd = load_file(str(drafter_copy / "model.safetensors"))
    (drafter_copy / "model.safetensors").unlink()
    torch.save(sd, drafter_copy / "pytorch_model.bin")
    with pytest.raises(MassvConfigError, match="pickle files .*pytorch_model.bin.* can run code"):
        check_drafter(drafter_copy)
    assert check_drafter(drafter_copy, allow_pickle=True).weight_files[0].name == "pytorch_model.bin"
    monkeypatch.setenv("MASSV_ALLOW_PICKLE", "1")
    assert check_drafter(drafter_copy).weight_files


def test_non_vlm_target(tiny_qwen):
    with pytest.raises(MassvConfigError) as e:
        check_pair(tiny_qwen.drafter, target_config_from_dir(tiny_qwen.small_lm), None)
    assert "is not a vision-language model MASSV supports" in str(e.value)
    assert "Qwen2_5_VLForConditionalGeneration" in str(e.value)


def test_unknown_base_architecture(drafter_copy):
    _edit_config(drafter_copy, lambda c: c["massv"].update(base_architecture="LlamaForCausalLM"))
    with pytest.raises(MassvConfigError, match="unknown base_architecture 'LlamaForCausalLM'"):
        check_drafter(drafter_copy)


def test_drafter_of_another_schema_version(drafter_copy):
    _edit_config(drafter_copy, lambda c: c["massv"].update(schema_version=99, massv_vllm_version="9.0"))
    with pytest.raises(MassvConfigError, match=r"schema_version 99 \(written by massv-vllm 9.0\)"):
        check_drafter(drafter_copy)


def test_not_a_drafter_folder(tiny_qwen, tmp_path):
    with pytest.raises(MassvConfigError, match="is not a directory"):
        check_drafter(tmp_path / "nope")
    with pytest.raises(MassvConfigError, match="not a MASSV drafter"):
        check_drafter(tiny_qwen.small_lm)


@pytest.mark.engine
def test_llm_rejects_bad_drafter_before_the_engine_starts(drafter_copy, tiny_qwen):
    """`LLM(speculative_config={"method": "massv", ...})` fails in the calling process, fast."""
    from massv_vllm.engine import make_llm, massv_spec

    _edit_config(drafter_copy, lambda c: c["massv"]["target"].update(image_token_id=7))
    t0 = time.monotonic()
    with pytest.raises(MassvConfigError, match="image token id 7 != target's image_token_id 5"):
        make_llm(str(tiny_qwen.target), massv_spec(str(drafter_copy), 3), max_model_len=512)
    assert time.monotonic() - t0 < 30  # no engine process was started (a start costs ~30-45 s)
    with pytest.raises(MassvConfigError, match="is not a vision-language model MASSV supports"):
        make_llm(str(tiny_qwen.small_lm), massv_spec(str(tiny_qwen.drafter), 3), max_model_len=512)
