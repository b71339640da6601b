"""Feature cache: hits across uses, invalidation by target fingerprint, corrupt shards rebuilt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from massv_vllm.testing.synthetic import write_llava_set
from massv_vllm.training.data.feature_cache import FeatureCache, image_key
from massv_vllm.training.data.records import load_image, read_records
from massv_vllm.training.data.samples import SampleBuilder
from massv_vllm.training.distributed import Dist
from massv_vllm.training.prepare import FeatureSource, prepare_samples
from massv_vllm.training.target_features import TargetEncoder

CPU = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def enc(tiny_qwen):
    return TargetEncoder(tiny_qwen.target)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_set(tmp_path_factory.mktemp("fc-data"), 5)


def _prepare(enc, data, cache_dir):
    cache = FeatureCache(cache_dir, enc.fingerprint())
    source = FeatureSource(cache, enc.target_dir, CPU.device, torch.float32, 2, CPU)
    samples = prepare_samples(read_records(data), SampleBuilder(enc, max_len=1024), source)
    return samples, source


def test_features_are_computed_once_and_hit_afterwards(enc, data, tmp_path):
    samples, source = _prepare(enc, data, tmp_path / "fc")
    assert source.cache.stats.computed == 5 and source._encoder is None  # encoder freed after preparation
    shards = sorted((tmp_path / "fc" / enc.fingerprint()).glob("shard-*.safetensors"))
    assert shards and all(s.with_suffix(".json").is_file() for s in shards)
    # a new run (new process state) finds everything on disk and never loads the vision tower
    samples2, source2 = _prepare(enc, data, tmp_path / "fc")
    assert source2.cache.stats.computed == 0 and source2._encoder is None
    rows = json.loads(data.read_text())
    for s, row in zip(samples2, rows):
        want = enc.image_features([load_image(data.parent / row["image"])])[0]
        got = source2.get(s.image_keys[0])
        assert torch.equal(got, want)
    assert source2.cache.stats.hits == 5


def test_same_image_in_two_datasets_shares_one_entry(enc, data, tmp_path):
    rows = json.loads(data.read_text())
    other = tmp_path / "copy"
    other.mkdir()
    shutil.copy(data.parent / rows[0]["image"], other / "renamed.png")
    (other / "d.json").write_text(json.dumps([{**rows[0], "id": "x", "image": "renamed.png"}]))
    _prepare(enc, data, tmp_path / "fc")
    _, source = _prepare(enc, other / "d.json", tmp_path / "fc")
    assert source.cache.stats.computed == 0


def test_a_changed_target_invalidates_the_cache(enc, data, tmp_path, tiny_qwen):
    _prepare(enc, data, tmp_path / "fc")
    changed = tmp_path / "target2"
    shutil.copytree(tiny_qwen.target, changed)
    cfg = json.loads((changed / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "gelu"  # other features, same shapes
    (changed / "config.json").write_text(json.dumps(cfg))
    enc2 = TargetEncoder(changed)
    assert enc2.fingerprint() != enc.fingerprint()
    _, source = _prepare(enc2, data, tmp_path / "fc")
    assert source.cache.stats.computed == 5  # nothing of the old target's features was reused
    assert len(list((tmp_path / "fc").iterdir())) == 2  # each target keeps its own entries


def _shards(cache_dir: Path, enc) -> list[Path]:
    return sorted((cache_dir / enc.fingerprint()).glob("shard-*.safetensors"))


def test_truncated_shard_is_detected_at_open_and_rebuilt(enc, data, tmp_path):
    _prepare(enc, data, tmp_path / "fc")
    shard = _shards(tmp_path / "fc", enc)[0]
    shard.write_bytes(shard.read_bytes()[:100])
    samples, source = _prepare(enc, data, tmp_path / "fc")
    assert source.cache.stats.corrupt_shards == 1
    assert source.cache.stats.computed == 5  # rebuilt
    assert all(source.get(k) is not None for s in samples for k in s.image_keys)


def test_flipped_bytes_are_detected_on_read_and_rebuilt(enc, data, tmp_path):
    samples, _ = _prepare(enc, data, tmp_path / "fc")
    shard = _shards(tmp_path / "fc", enc)[0]
    raw = bytearray(shard.read_bytes())
    raw[-64:] = bytes(64)  # same size, header intact: only the tensor hashes can tell
    shard.write_bytes(bytes(raw))
    _, source = _prepare(enc, data, tmp_path / "fc")
    assert source.cache.stats.corrupt_shards == 0  # looks fine at open
    rows = json.loads(data.read_text())
    for s, row in zip(samples, rows):  # every read verifies; the bad entry is recomputed from its file
        want = enc.image_features([load_image(data.parent / row["image"])])[0]
        assert torch.equal(source.get(s.image_keys[0]), want)
    assert source.cache.stats.corrupt_shards == 1
    assert source.cache.stats.computed == 1  # the entries that still verified were kept
    fresh = FeatureCache(tmp_path / "fc", enc.fingerprint())
    assert all(fresh.get(s.image_keys[0]) is not None for s in samples) and fresh.stats.corrupt_shards == 0


def test_unindexed_and_foreign_files_are_ignored(tmp_path):
    c = FeatureCache(tmp_path, "fp")
    c.put("a" * 64, torch.ones(2, 3))
    c.flush()
    shard = next((tmp_path / "fp").glob("shard-*.safetensors"))
    # a writer killed between its shard and its index leaves an unindexed shard
    shutil.copy(shard, shard.with_name("shard-x-orphan.safetensors"))
    (tmp_path / "fp" / "shard-y.json").write_text("{not json")
    c2 = FeatureCache(tmp_path, "fp")
    assert len(c2) == 1 and torch.equal(c2.get("a" * 64), torch.ones(2, 3))
    assert FeatureCache(tmp_path, "other").get("a" * 64) is None
    before = sorted(tmp_path.rglob("*"))
    mem = FeatureCache(None, "fp")  # --no-feature-cache: memory only
    mem.put("b" * 64, torch.zeros(1))
    mem.flush()
    assert torch.equal(mem.get("b" * 64), torch.zeros(1)) and sorted(tmp_path.rglob("*")) == before


def test_image_key_is_content_based():
    from massv_vllm.testing.tiny import synthetic_image

    a = synthetic_image(0, (56, 56))
    assert image_key(a) == image_key(a.convert("RGBA").convert("RGB"))
    assert image_key(a) != image_key(synthetic_image(1, (56, 56)))
    assert image_key(a) != image_key(a.resize((56, 57)))
