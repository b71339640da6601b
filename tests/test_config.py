"""The drafter config schema: round trip, and one clear error for every kind of bad section."""

from __future__ import annotations

import copy
import json
import os

import pytest

from massv_vllm.serving.config import (
    SCHEMA_VERSION,
    MassvConfig,
    MassvConfigError,
    ProjectorConfig,
    TargetInfo,
    load_massv_config,
)

GOOD = {
    "schema_version": SCHEMA_VERSION,
    "massv_vllm_version": "0.1.0",
    "base_architecture": "Qwen2ForCausalLM",
    "base_vocab_size": 151936,
    "target": {
        "family": "qwen2_5_vl",
        "architecture": "Qwen2_5_VLForConditionalGeneration",
        "image_token_id": 151655,
        "image_embed_dim": 3584,
        "vocab_size": 152064,
    },
    "projector": {"input_dim": 3584, "hidden_dim": 1536, "depth": 2, "activation": "gelu"},
}


def test_round_trip_through_config_json(tmp_path):
    cfg = MassvConfig.from_dict(copy.deepcopy(GOOD))
    assert cfg.projector == ProjectorConfig(3584, 1536, 2, "gelu")
    assert cfg.target == TargetInfo("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", 151655, 3584, 152064)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "massv": cfg.to_dict()}))
    assert load_massv_config(tmp_path) == cfg
    assert not cfg.text_only


def test_text_only_drafter_has_no_projector():
    d = copy.deepcopy(GOOD) | {"projector": None}
    cfg = MassvConfig.from_dict(d)
    assert cfg.text_only and cfg.projector is None
    assert MassvConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.update(schema_version=2), "schema_version 2"),
        (lambda d: d.pop("schema_version"), "schema_version None"),
        (lambda d: d["projector"].update(input_dim="3584"), "'projector.input_dim' must be int"),
        (lambda d: d["projector"].update(activation="swish"), "projector.activation 'swish'"),
        (lambda d: d["projector"].update(depth=0), "projector.depth must be >= 1"),
        (lambda d: d["target"].pop("image_token_id"), "missing key 'target.image_token_id'"),
        (lambda d: d["target"].update(family="llava"), "target.family 'llava'"),
        (lambda d: d.update(projection_dim=5), "unknown key 'projection_dim'"),
        (lambda d: d["target"].update(extra=1), "unknown key 'target.extra'"),
        (lambda d: d.update(base_vocab_size=None), "'base_vocab_size' must be a int"),
        (lambda d: d["projector"].update(depth=10**8), "projector.depth 100000000 exceeds the limit of 16"),
        (lambda d: d["projector"].update(hidden_dim=10**9), "projector.hidden_dim 1000000000 exceeds"),
        (lambda d: d["target"].update(vocab_size=10**12), "'target.vocab_size' is 1000000000000, outside"),
        (lambda d: d["target"].update(image_token_id=-1), "'target.image_token_id' is -1, outside"),
        (lambda d: d.update(base_vocab_size=-5), "'base_vocab_size' is -5, outside"),
    ],
)
def test_bad_sections_name_the_problem(mutate, needle):
    d = copy.deepcopy(GOOD)
    mutate(d)
    with pytest.raises(MassvConfigError) as e:
        MassvConfig.from_dict(d)
    assert needle in str(e.value)


def test_missing_or_foreign_config(tmp_path):
    with pytest.raises(MassvConfigError, match="no config.json"):
        load_massv_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MassvConfigError, match="not valid JSON"):
        load_massv_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(MassvConfigError, match="not a MASSV drafter"):
        load_massv_config(tmp_path)
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # json: RecursionError
    with pytest.raises(MassvConfigError, match="nested too deeply"):
        load_massv_config(tmp_path)
    (tmp_path / "config.json").write_text(" " * (16 * 2**20 + 1))
    with pytest.raises(MassvConfigError, match="over the limit"):
        load_massv_config(tmp_path)
    (tmp_path / "config.json").unlink()
    os.mkfifo(tmp_path / "config.json")  # never opened: it would block until a writer appears
    with pytest.raises(MassvConfigError, match="config.json is not a regular file"):
        load_massv_config(tmp_path)


def test_check_base_against_small_lm_config():
    from transformers import Qwen2Config

    cfg = MassvConfig.from_dict(copy.deepcopy(GOOD))
    base = Qwen2Config(vocab_size=152064, hidden_size=1536)
    base.architectures = ["MassvQwen2DrafterForCausalLM"]
    assert cfg.check_base(base) == []
    base.vocab_size = 151936
    base.architectures = ["Qwen2ForCausalLM"]
    problems = cfg.check_base(base)
    assert any("vocab_size 151936 != target vocab size 152064" in p for p in problems)
    assert any("must be ['MassvQwen2DrafterForCausalLM']" in p for p in problems)
