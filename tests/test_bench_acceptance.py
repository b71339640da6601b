"""benchmarks.acceptance: summary logic (no engine) and one end-to-end run on the tiny Qwen set.

The end-to-end run starts two engines (``none`` and ``massv``; γ is fixed per engine) once for the
whole module and every engine test reads its results. The ``massv`` drafter is a mirror drafter
(the target's own text stack, identity projector), so at T=0 its drafts are accepted: the run must
report MAL >= γ + 0.5 on the text-only task and > 2 on the image tasks, with outputs identical to
``none``.
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from benchmarks import acceptance
from benchmarks.acceptance import ALL, SCHEMA, Mode, exactness, format_report, run_acceptance, summarise
from benchmarks.report import check_schema
from massv_vllm.testing.tiny import make_mirror_drafter, synthetic_image

GAMMA = 3
MAX_TOKENS = 16


def _run(task, temp, ids, counters=(0, 0, 0, ()), wall=1.0, tokens=None, lat=0.5):
    n, d, a, pos = counters
    return {
        "temperature": temp,
        "task": task,
        "wall_s": wall,
        "counters": {
            "num_drafts": n,
            "num_draft_tokens": d,
            "num_accepted_tokens": a,
            "accepted_per_pos": list(pos),
        },
        "requests": [
            {
                "id": i,
                "num_tokens": 4,
                "latency_s": lat,
                "token_ids": (tokens or {}).get(i, [1, 2, 3, 4]) if temp == 0 else None,
            }
            for i in ids
        ],
    }


def test_summary_speedups_and_exactness_without_an_engine():
    modes = [Mode("none", None, "none"), Mode("text", "t", "text-only"), Mode("massv", "m", "massv")]
    raw = {
        "none": {"runs": [_run("vqa", 0.0, ["a", "b"], wall=2.0), _run("cap", 0.0, ["c"], wall=1.0)]},
        "text": {
            "runs": [
                _run("vqa", 0.0, ["a", "b"], (4, 12, 4, (3, 1, 0)), wall=1.6),
                _run("cap", 0.0, ["c"], (2, 6, 2, (2, 0, 0)), wall=0.8, tokens={"c": [9]}),
            ]
        },
        "massv": {
            "runs": [
                _run("vqa", 0.0, ["a", "b"], (3, 9, 6, (3, 2, 1)), wall=1.0, lat=0.25),
                _run("cap", 0.0, ["c"], (2, 6, 4, (2, 1, 1)), wall=0.5, lat=0.25),
            ]
        },
    }
    s = summarise(modes, raw, [0.0])
    rows = {(r["mode"], r["task"]): r for r in s["runs"]}
    assert rows[("massv", "vqa")]["mal"] == pytest.approx(3.0)  # 1 + 6/3
    assert rows[("massv", ALL)]["mal"] == pytest.approx(1 + 10 / 5)  # pooled counters, not mean of MALs
    assert rows[("massv", ALL)]["acceptance_per_position"] == pytest.approx([1.0, 0.6, 0.4])
    assert rows[("massv", ALL)]["num_requests"] == 3 and rows[("massv", ALL)]["output_tokens"] == 12
    assert rows[("none", ALL)]["mal"] is None
    assert rows[("none", ALL)]["tokens_per_s"] == pytest.approx(12 / 3.0)
    sp = {(x["mode"], x["baseline"], x["task"]): x for x in s["speedups"]}
    assert sp[("massv", "none", ALL)]["tokens_per_s_ratio"] == pytest.approx(3.0 / 1.5)
    assert sp[("massv", "none", ALL)]["latency_ratio"] == pytest.approx(0.5 / 0.25)
    assert sp[("massv", "text", "vqa")]["tokens_per_s_ratio"] == pytest.approx(1.6 / 1.0)
    assert ("text", "massv", "vqa") not in sp  # only MASSV over text-only, not the reverse
    ex = s["exactness"]
    assert ex["checked"] and ex["reference"] == "none" and ex["num_compared"] == 3
    assert not ex["identical"] and ex["mismatches"] == [{"id": "c", "task": "cap", "modes": ["text"]}]
    assert "1 MISMATCHES" in format_report_for(modes, s)
    # one mode alone cannot be checked
    assert exactness(modes[:1], raw)["checked"] is False


def format_report_for(modes, s):
    doc = {
        "eval": {"tasks": {"cap": 1, "vqa": 2}},
        "temperatures": [0.0],
        "gamma": 3,
        "batch_size": 1,
        "modes": {m.name: {} for m in modes},
        **s,
    }
    return format_report(doc)


@pytest.fixture(scope="module")
def acc_run(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("acc")
    recs = []
    for i, (task, q) in enumerate(
        [("captioning", "Describe the image."), ("vqa", "What colour is it?"), ("vqa", "How many?")]
    ):
        synthetic_image(i, (112, 84)).save(root / f"img{i}.png")
        recs.append(
            {
                "id": f"q{i}",
                "image": f"img{i}.png",
                "task": task,
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}],
            }
        )
    recs.append(  # text only
        {
            "id": "t0",
            "task": "text",
            "conversations": [{"from": "human", "value": "Hello! Please answer briefly."}],
        }
    )
    ev = root / "eval.json"
    ev.write_text(json.dumps(recs))
    kwargs = dict(
        gamma=GAMMA,
        temperatures=(0.0, 1.0),
        batch_size=2,
        max_tokens=MAX_TOKENS,
        ignore_eos=True,
        progress=False,
        argv=["test"],
    )
    mirror = make_mirror_drafter(tiny_qwen.target, tiny_qwen.tokenizer, root / "mirror")
    modes = ["none", f"massv={mirror}"]
    doc = run_acceptance(tiny_qwen.target, ev, modes, root / "out", **kwargs)
    return doc, root / "out", (tiny_qwen.target, ev, modes, kwargs)


@pytest.mark.engine
def test_results_file_and_plots(acc_run):
    doc, out, _ = acc_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == doc and check_schema(on_disk, SCHEMA) == []
    assert sorted(doc["plots"]) == ["acceptance_per_position.png", "mal.png", "speedup.png"]
    for p in doc["plots"]:
        with Image.open(out / p) as im:
            im.verify()
    assert doc["modes"]["massv"]["kind"] == "massv" and doc["modes"]["none"]["drafter"] is None
    assert doc["eval"]["tasks"] == {"captioning": 1, "text": 1, "vqa": 2}


@pytest.mark.engine
def test_acceptance_counters_and_throughput(acc_run):
    doc, _, _ = acc_run
    rows = {(r["mode"], r["temperature"], r["task"]): r for r in doc["runs"]}
    for temp in (0.0, 1.0):
        for task, n in (("captioning", 1), ("text", 1), ("vqa", 2), (ALL, 4)):
            m = rows[("massv", temp, task)]
            c = m["counters"]
            assert m["num_requests"] == n and m["output_tokens"] == n * MAX_TOKENS  # ignore_eos
            assert c["num_drafts"] > 0 and 0 < c["num_draft_tokens"] <= GAMMA * c["num_drafts"]
            assert 1.0 <= m["mal"] <= GAMMA + 1
            assert m["mal"] == pytest.approx(1 + c["num_accepted_tokens"] / c["num_drafts"])
            assert len(m["acceptance_per_position"]) == GAMMA
            assert sum(c["accepted_per_pos"]) == c["num_accepted_tokens"]
            assert m["tokens_per_s"] > 0 and 0 < m["latency_s"]["p50"] <= m["latency_s"]["p90"]
            base = rows[("none", temp, task)]
            assert base["mal"] is None and base["counters"]["num_drafts"] == 0
        # per-task counter deltas add up to the overall one: snapshots bracket each task exactly
        parts = [rows[("massv", temp, t)]["counters"]["num_drafts"] for t in ("captioning", "text", "vqa")]
        assert sum(parts) == rows[("massv", temp, ALL)]["counters"]["num_drafts"]
    pairs = {(s["mode"], s["baseline"], s["temperature"], s["task"]) for s in doc["speedups"]}
    assert ("massv", "none", 0.0, ALL) in pairs and ("massv", "none", 1.0, "vqa") in pairs


@pytest.mark.engine
def test_mirror_drafts_are_accepted_at_t0(acc_run):
    """The reported MAL shows accepted drafts: the mirror drafter is the target on text."""
    doc, _, _ = acc_run
    mal = {r["task"]: r["mal"] for r in doc["runs"] if r["mode"] == "massv" and r["temperature"] == 0.0}
    print(f"\nmirror drafter MAL at T=0: {mal}")
    assert mal["text"] >= GAMMA + 0.5, mal
    assert mal["captioning"] > 2.0 and mal["vqa"] > 2.0, mal


@pytest.mark.engine
def test_greedy_outputs_identical_across_modes(acc_run):
    doc, _, _ = acc_run
    ex = doc["exactness"]
    assert ex["checked"] and ex["reference"] == "none" and ex["num_compared"] == 4
    assert ex["identical"] is True and ex["mismatches"] == []
    assert "T=0 exactness: IDENTICAL" in format_report(doc)


@pytest.mark.engine
def test_rerun_reuses_finished_modes(acc_run, monkeypatch):
    doc, out, (target, ev, modes, kwargs) = acc_run

    def no_engine(*a, **k):
        raise AssertionError("a finished mode was run again")

    monkeypatch.setattr(acceptance, "run_mode", no_engine)
    again = run_acceptance(target, ev, modes, out, **kwargs)
    assert again["runs"] == doc["runs"] and again["exactness"] == doc["exactness"]
    # other settings -> the mode is not reused
    with pytest.raises(AssertionError, match="run again"):
        run_acceptance(target, ev, modes, out, **(kwargs | {"max_tokens": MAX_TOKENS + 1}))


def test_parallel_drafting_modes(tiny_qwen):
    """``NAME=parallel:FOLDER`` serves that drafter with "parallel_drafting": true (TVD reads the folder)."""
    from benchmarks.acceptance import parse_modes
    from benchmarks.tvd import parse_named_paths

    modes = {
        m.name: m
        for m in parse_modes(["none", f"seq={tiny_qwen.drafter}", f"par=parallel:{tiny_qwen.drafter}"])
    }
    assert (modes["seq"].kind, modes["seq"].spec_extra) == ("massv", {})
    assert (modes["par"].kind, modes["par"].spec_extra) == ("massv-parallel", {"parallel_drafting": True})
    assert modes["par"].drafter == str(tiny_qwen.drafter)
    assert parse_named_paths([f"par=parallel:{tiny_qwen.drafter}"]) == {
        "par": f"parallel:{tiny_qwen.drafter}"
    }
