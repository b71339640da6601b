"""The synthetic-world pipeline end to end on CPU (``--small``): every stage runs, and the numbers it
reports are recomputed here from the raw artefacts (answers, counter deltas, training logs).

Starts 4 vLLM engines (generation + the ablation's no-speculation baseline and two drafters):
about 3-4 minutes on 2 idle cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.world import generate_world as gw
from benchmarks.world import train_target as tt

pytestmark = [pytest.mark.engine, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def _run(out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.world", "run", "--out", str(out), "--small"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("world-run")
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout, json.loads((out / "summary.json").read_text())


def _samples(out: Path, split: str) -> dict[str, dict]:
    return {r["id"]: r for r in gw.load_split(out / "world", split)}


def _accuracy(pairs) -> dict[str, dict]:
    per: dict[str, list[bool]] = {}
    for sample, answer in pairs:
        per.setdefault(sample["task"], []).append(gw.score_answer(sample["task"], answer, sample))
    return {t: {"n": len(v), "accuracy": sum(v) / len(v)} for t, v in sorted(per.items())}


def test_every_stage_ran_and_the_summary_says_what_ran(run):
    out, stdout, summary = run
    assert summary["preset"] == "small" and "--small" in summary["why"]
    assert {s["status"] for s in summary["stages"].values()} == {"ran"}
    assert all(s["seconds"] > 0 for s in summary["stages"].values())
    assert "== synthetic world: small" in stdout and "ablation T=0, gamma=5" in stdout and "TVD" in stdout
    for d in ("text-only", "massv"):
        assert (out / summary["results"]["ablation"]["drafters"][d] / "config.json").is_file()


def test_every_training_loss_falls(run):
    out, _, summary = run
    r = summary["results"]
    for name in ("target", "small_lm"):
        curve = r[name]["loss_curve"]
        assert len(curve) >= 3 and curve[-1][1] < 0.8 * curve[0][1], (name, curve)
    assert r["small_lm"]["held_out_loss_after"] < r["small_lm"]["held_out_loss_before"]
    for name in ("phase1", "sdvit"):  # recomputed from the training scripts' own step logs
        log = (out / name / "train_log.jsonl").read_text().splitlines()
        steps = [json.loads(x) for x in log if x.strip()]
        losses = [e["loss"] for e in steps if "loss" in e and "lr" in e]
        assert len(losses) == r[name]["steps"] >= 4
        assert sum(losses[-2:]) < sum(losses[:2]), (name, losses)


def test_target_accuracy_is_recomputed_from_its_own_answers(run):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    out, _, summary = run
    samples = _samples(out, "eval")
    rows = [json.loads(x) for x in (out / "target" / "eval_outputs.jsonl").read_text().splitlines()]
    assert len(rows) == len(samples) == 10
    recomputed = _accuracy([(samples[r["id"]], r["output"]) for r in rows])
    assert recomputed == summary["results"]["target"]["eval_accuracy"]
    # The logged answers are the saved checkpoint's own greedy answers.
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out / "target"), dtype=torch.float32)
    enc = tt.PromptEncoder(AutoProcessor.from_pretrained(str(out / "target")))
    recs = {r.id: r for r in tt.read_split(out / "world", "eval")}
    ids = [r["id"] for r in rows[:3]]
    again = tt.greedy_answers(model, enc, [recs[i] for i in ids], torch.device("cpu"), None)
    assert again == [r["output"] for r in rows[:3]]
    # ... and in vLLM: the ablation's no-speculation T=0 token ids, decoded and scored again.
    none = json.loads((out / "ablation" / "acceptance" / "modes" / "none.json").read_text())
    pairs = [
        (samples[q["id"]], enc.tokenizer.decode(q["token_ids"], skip_special_tokens=True).strip())
        for r in none["runs"]
        if r["temperature"] == 0
        for q in r["requests"]
    ]
    assert len(pairs) == 10
    assert _accuracy(pairs) == summary["results"]["ablation"]["target_vllm_greedy_accuracy"]


def test_mal_comes_from_the_counter_deltas_and_lies_in_range(run):
    out, _, summary = run
    ab = summary["results"]["ablation"]
    gamma = ab["gamma"]
    assert gamma == 5
    for drafter in ("text-only", "massv"):
        raw = json.loads((out / "ablation" / "acceptance" / "modes" / f"{drafter}.json").read_text())
        drafted = 0
        for r in raw["runs"]:
            c = r["counters"]
            if c["num_drafts"] == 0:
                continue
            drafted += c["num_drafts"]
            mal = 1 + c["num_accepted_tokens"] / c["num_drafts"]
            assert 1.0 <= mal <= gamma + 1
            assert c["num_draft_tokens"] == gamma * c["num_drafts"]
            assert sum(c["accepted_per_pos"]) == c["num_accepted_tokens"]
            cell = ab["table"][f"T={r['temperature']:g}"][drafter][r["task"]]
            assert cell["mal"] == pytest.approx(mal)
        assert drafted > 0
    assert ab["exactness"]["checked"] and ab["exactness"]["identical"]  # speculation is lossless at T=0


def test_tvd_is_a_distance_and_the_histogram_exists(run):
    out, _, summary = run
    tvd = summary["results"]["tvd"]
    assert set(tvd["summary"]) == {"text-only", "massv"}
    for v in tvd["summary"].values():
        assert 0.0 <= v["mean"] <= 1.0 and 0.0 <= v["top1_agreement"] <= 1.0 and v["num_tokens"] > 0
    assert Path(tvd["histogram"]).stat().st_size > 1000


def test_generation_answers_are_scored_against_the_scenes(run):
    out, _, summary = run
    gen = summary["results"]["generate"]
    rows = [json.loads(x) for x in (out / "generate" / "generated.jsonl").read_text().splitlines()]
    assert gen["responses"] == len(rows) == len(_samples(out, "instructions"))
    assert sum(v["n"] for v in gen["accuracy_all"].values()) == len(rows)


def test_a_rerun_skips_every_finished_stage(run):
    out, _, summary = run
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already done") == len(summary["stages"])
    again = json.loads((out / "summary.json").read_text())
    assert {s["status"] for s in again["stages"].values()} == {"cached"}
    assert again["results"] == summary["results"]
