"""generate.py: self-distilled data through one real vLLM engine (tiny target), resumable shards."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from massv_vllm.testing.synthetic import write_llava_set
from massv_vllm.training.data.records import ReadStats, read_llava
from massv_vllm.training.generation import (
    DEFAULT_SCHEDULE,
    GenerationError,
    ShardStore,
    build_parser,
    generate,
    parse_schedule,
)


@pytest.fixture(scope="module")
def llm(tiny_qwen):
    from massv_vllm.engine import make_llm

    engine = make_llm(str(tiny_qwen.target), max_model_len=512)
    yield engine
    del engine


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_llava_set(tmp_path_factory.mktemp("prompts"), 5, kind="instruction")


def _args(tiny, data, out, *extra):
    return build_parser().parse_args(
        ["--target", str(tiny.target), "--data", str(data), "--out", str(out), "--max-tokens", "8",
         "--shard-size", "4", "--no-progress", *extra]
    )  # fmt: skip


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generated.jsonl").read_text().splitlines()]


@pytest.mark.engine
def test_generate_resumes_without_duplicates(llm, tiny_qwen, prompts, tmp_path):
    from massv_vllm.training.data.samples import RESPONSE_TOKEN_IDS, SampleBuilder
    from massv_vllm.training.target_features import TargetEncoder

    out = tmp_path / "gen"
    first = generate(_args(tiny_qwen, prompts, out, "--responses-per-prompt", "2", "--limit", "3"), llm)
    assert first.written == first.total == 6
    shards_before = {p.name: p.read_text() for p in out.glob("shard-*.jsonl")}
    # "the run was killed after 3 prompts": the same command over all prompts continues
    second = generate(_args(tiny_qwen, prompts, out, "--responses-per-prompt", "2"), llm)
    assert second.written == 4 and second.total == 10
    assert {
        p.name: p.read_text() for p in out.glob("shard-*.jsonl") if p.name in shards_before
    } == shards_before
    rows = _rows(out)
    keys = Counter((r["source_id"], r["sample_index"]) for r in rows)
    assert len(keys) == 10 and max(keys.values()) == 1
    assert generate(_args(tiny_qwen, prompts, out, "--responses-per-prompt", "2"), llm).written == 0

    enc = TargetEncoder(tiny_qwen.target, load_vision=False)
    by_prompt: dict[str, dict[int, tuple[float, float]]] = {}
    for r in rows:
        sp = r["sampling"]
        assert set(sp) == {"temperature", "top_p", "seed", "max_tokens"} and sp["max_tokens"] == 8
        assert isinstance(sp["seed"], int) and 0 <= sp["seed"] < 2**31
        by_prompt.setdefault(r["source_id"], {})[r["sample_index"]] = (sp["temperature"], sp["top_p"])
        assert 0 < len(r["response_token_ids"]) <= 8
        assert r["finish_reason"] in ("stop", "length", "placeholder")
        assert r["images"] and not Path(r["images"][0]).is_absolute()
        assert enc.image_token_id in r["prompt_token_ids"]
    # The documented schedule (DEFAULT_SCHEDULE, the recipes' "generate.schedule"), written out:
    # response s of a prompt takes entry (h(prompt id) + s) mod 4, so a prompt's two responses
    # take two consecutive entries of this cycle.
    cycle = [(0.0, 1.0), (0.3, 0.9), (0.7, 0.95), (1.0, 1.0)]
    assert DEFAULT_SCHEDULE == "0.0:1.0,0.3:0.9,0.7:0.95,1.0:1.0"
    for pair in by_prompt.values():
        first = cycle.index(pair[0])
        assert pair[1] == cycle[(first + 1) % 4], by_prompt
    assert len({r["sampling"]["seed"] for r in rows}) == 10  # a seed per request
    assert len({tp for pair in by_prompt.values() for tp in pair.values()}) > 2  # the schedule is really used

    # read_llava reads it back (image root from generation.json) and SDViT rebuilds the exact prompts
    meta = json.loads((out / "generation.json").read_text())
    stats = ReadStats()
    records = list(read_llava(out / "generated.jsonl", (out / meta["image_root"]).resolve(), stats))
    assert stats.kept == 10 and all(rec.images[0].is_file() for rec in records)
    builder = SampleBuilder(enc, max_len=1024, response=RESPONSE_TOKEN_IDS)
    built = [builder.build(i, rec) for i, rec in enumerate(records)]
    assert all(b is not None for b in built), builder.stats.summary()  # our prompt == vLLM's prompt
    for (sample, _), r in zip(built, rows):
        assert sample.input_ids.tolist() == r["prompt_token_ids"] + r["response_token_ids"]


@pytest.mark.engine
def test_text_only_mode(llm, tiny_qwen, prompts, tmp_path):
    res = generate(_args(tiny_qwen, prompts, tmp_path / "txt", "--text-only", "--schedule", "0.5:0.9"), llm)
    assert res.total == 5
    enc_image_token = json.loads((tiny_qwen.target / "config.json").read_text())["image_token_id"]
    for r in _rows(tmp_path / "txt"):
        assert "images" not in r and "<image>" not in r["conversations"][0]["value"]
        assert enc_image_token not in r["prompt_token_ids"]
        assert (r["sampling"]["temperature"], r["sampling"]["top_p"]) == (0.5, 0.9)


@pytest.mark.engine
def test_hf_dataset_images_are_saved_beside_the_data(llm, tiny_qwen, tmp_path):
    import datasets

    from massv_vllm.testing.tiny import synthetic_image
    from massv_vllm.training.data.feature_cache import image_key
    from massv_vllm.training.data.records import load_image

    imgs = [synthetic_image(i, (56, 56)) for i in range(2)]
    ds = datasets.Dataset.from_dict(
        {"image": imgs, "prompt": ["Describe the image.", "Where is the circle?"]},
        features=datasets.Features({"image": datasets.Image(), "prompt": datasets.Value("string")}),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "gen"
    assert generate(_args(tiny_qwen, tmp_path / "ds", out), llm).total == 2
    # in-memory images have no path: they are written under out/images, the data's image root
    records = list(read_llava(out / "generated.jsonl"))
    assert [image_key(load_image(r.images[0])) for r in records] == [image_key(i) for i in imgs]
    assert all(out / "images" in r.images[0].parents for r in records)


def test_shard_store_recovers_from_a_kill(tmp_path):
    """A kill between a shard's rename and the index update, or during a shard write."""
    store = ShardStore(tmp_path)
    store.write([{"source_id": "a", "sample_index": 0, "x": 1}])
    store.write([{"source_id": "b", "sample_index": 0}, {"source_id": "b", "sample_index": 1}])
    (tmp_path / "index.json").write_text(json.dumps({"shard-000000.jsonl": [["a", 0]]}))  # stale index
    (tmp_path / "shard-000002.jsonl.tmp").write_text('{"source_id": "c", "sampl')  # torn write
    again = ShardStore(tmp_path)
    assert again.done == {("a", 0), ("b", 0), ("b", 1)}
    assert not list(tmp_path.glob("*.tmp"))
    assert again.merge() == 3


def test_bad_schedule_is_refused():
    assert parse_schedule("0:1, 0.7:0.95") == [(0.0, 1.0), (0.7, 0.95)]
    assert parse_schedule([[1, 1]]) == [(1.0, 1.0)]
    for bad in ("0.5", "x:1", "0.5:0", "-1:1", ""):
        with pytest.raises(GenerationError):
            parse_schedule(bad)


def test_schedule_entries_cycle_over_a_prompts_responses():
    """The documented rule, with literal values: response s of a prompt takes the entry after
    response s-1's, cyclically; each (prompt, response) has its own seed."""
    from massv_vllm.training.generation import sampling_for

    cycle = [(0.0, 1.0), (0.3, 0.9), (0.7, 0.95), (1.0, 1.0)]
    seeds = set()
    for rid in ("a", "b", "instruction-00003"):
        got = [sampling_for(rid, s, cycle, 0) for s in range(8)]
        k = cycle.index(got[0][:2])
        assert [g[:2] for g in got] == [cycle[(k + s) % 4] for s in range(8)]
        seeds |= {g[2] for g in got}
        assert got == [sampling_for(rid, s, cycle, 0) for s in range(8)]  # reproducible
    assert len(seeds) == 24 and all(0 <= x < 2**31 for x in seeds)
    assert sampling_for("a", 0, cycle, 1)[2] != sampling_for("a", 0, cycle, 0)[2]  # --seed matters
    assert {sampling_for(r, 0, [(0.5, 0.9)], 0)[:2] for r in "abcdef"} == {(0.5, 0.9)}


class FakeLLM:
    """``LLM.chat`` stand-in: answers every prompt with ``answer`` (token ids), so a test can make
    the target sample what it rarely does (a placeholder token) without an engine."""

    def __init__(self, target: Path, answer: list[int]):
        from types import SimpleNamespace

        from transformers import AutoConfig, AutoTokenizer

        self.model_config = SimpleNamespace(hf_config=AutoConfig.from_pretrained(target))
        self.tokenizer = AutoTokenizer.from_pretrained(target)
        self.answer = answer
        self.prompts = 0

    def get_tokenizer(self):
        return self.tokenizer

    def chat(self, msgs, params, use_tqdm=False):
        from types import SimpleNamespace

        self.prompts += len(msgs)
        text = self.tokenizer.decode(self.answer, skip_special_tokens=True)
        out = SimpleNamespace(token_ids=list(self.answer), text=text, finish_reason="stop")
        return [SimpleNamespace(prompt_token_ids=[1, 2, 3], outputs=[out]) for _ in msgs]


def test_placeholder_tokens_are_cut_from_responses_and_bombs_skipped(tiny_qwen, tmp_path):
    from massv_vllm.testing.synthetic import png_header_only

    data = write_llava_set(tmp_path / "data", 4, kind="instruction")
    rows = json.loads(data.read_text())
    (data.parent / rows[2]["image"]).write_bytes(png_header_only(20_000, 20_000))
    cfg = json.loads((tiny_qwen.target / "config.json").read_text())
    end = 2  # <|im_end|> of the tiny tokenizer
    llm = FakeLLM(tiny_qwen.target, [40, 41, cfg["image_token_id"], 42, end])
    out = tmp_path / "gen"
    res = generate(_args(tiny_qwen, data, out), llm)
    assert res.total == 3 and llm.prompts == 3  # the bomb's prompt never reached the target
    got = _rows(out)
    assert [r["source_id"] for r in got] == [rows[i]["id"] for i in (0, 1, 3)]
    for r in got:
        assert r["response_token_ids"] == [40, 41] and r["finish_reason"] == "placeholder"
        assert r["cut"] == {"at": 2, "token_id": cfg["image_token_id"], "vllm_finish_reason": "stop"}
        assert r["conversations"][-1]["value"] == llm.tokenizer.decode([40, 41])
    stats = json.loads((out / "generation.json").read_text())["stats"]
    assert stats["skipped"] == {"image too large": 1}
    assert stats["cut"] == {"response cut at an image/video placeholder token": 3}
    # a rerun meets the same image again: counted again, nothing written twice
    again = generate(_args(tiny_qwen, data, out), llm)
    assert again.written == 0 and again.total == 3 and again.stats.skipped == {"image too large": 1}

    # every placeholder kind counts (vision start/end, video), and a response that starts with one
    # is skipped (and retried by a rerun: it is not marked done)
    for tid in (cfg["vision_start_token_id"], cfg["vision_end_token_id"], cfg["video_token_id"]):
        llm = FakeLLM(tiny_qwen.target, [tid, 40, end])
        res = generate(_args(tiny_qwen, data, tmp_path / f"only-{tid}"), llm)
        assert res.total == 0 and res.stats.skipped == {
            "image too large": 1,
            "response starts with an image/video placeholder token": 3,
        }
