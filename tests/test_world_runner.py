"""The synthetic-world stage runner: caching, resume, --until/--stages/--force, clear errors."""

from __future__ import annotations

import json

import pytest

from benchmarks.world import pipeline as pl
from benchmarks.world.__main__ import main as cli_main


@pytest.fixture
def fake_stages(monkeypatch):
    """Every stage replaced by one that records its call and writes a file in its output folder."""
    calls: list[str] = []

    def make(name):
        def fn(run):
            calls.append(name)
            for o in pl.STAGE_OUTPUTS[name]:
                run.p(o).mkdir(parents=True, exist_ok=True)
                (run.p(o) / "made").write_text(name)
            return {"name": name}

        return fn

    monkeypatch.setattr(pl, "STAGE_FNS", {n: make(n) for n in pl.STAGES})
    monkeypatch.setattr(pl, "build_summary", lambda run, why, ran: {"ran": sorted(ran)})
    monkeypatch.setattr(pl, "format_summary", lambda s: "summary")
    return calls


def test_stages_run_in_order_once_and_are_skipped_when_done(tmp_path, fake_stages):
    pl.run_pipeline(tmp_path, small=True, until="drafters")
    assert fake_stages == ["world", "target", "small_lm", "drafters"]
    marker = json.loads((tmp_path / "stages" / "target.json").read_text())
    assert marker["result"] == {"name": "target"} and marker["seconds"] >= 0 and marker["preset"] == "small"
    fake_stages.clear()
    pl.run_pipeline(tmp_path, small=True)  # the rest; finished stages are not repeated
    assert fake_stages == ["phase1", "generate", "sdvit", "ablation", "tvd"]
    fake_stages.clear()
    pl.run_pipeline(tmp_path, small=True)
    assert fake_stages == []


def test_a_failed_stage_leaves_no_marker_and_the_rerun_resumes_there(tmp_path, fake_stages, monkeypatch):
    def boom(run):
        raise pl.StageError("stage generate failed (exit 1)")

    good = pl.STAGE_FNS["generate"]
    monkeypatch.setitem(pl.STAGE_FNS, "generate", boom)
    with pytest.raises(pl.StageError):
        pl.run_pipeline(tmp_path, small=True)
    assert not (tmp_path / "stages" / "generate.json").exists()
    assert fake_stages == ["world", "target", "small_lm", "drafters", "phase1"]
    fake_stages.clear()
    monkeypatch.setitem(pl.STAGE_FNS, "generate", good)
    pl.run_pipeline(tmp_path, small=True)
    assert fake_stages == ["generate", "sdvit", "ablation", "tvd"]


def test_stages_need_their_prerequisites(tmp_path, fake_stages):
    with pytest.raises(pl.StageError, match="stage sdvit needs stage.*phase1, generate"):
        pl.run_pipeline(tmp_path, small=True, stages=["sdvit"])
    with pytest.raises(pl.StageError, match="unknown stage 'nope'"):
        pl.run_pipeline(tmp_path, small=True, stages=["nope"])
    assert fake_stages == []


def test_force_reruns_a_stage_and_clears_everything_built_on_it(tmp_path, fake_stages):
    pl.run_pipeline(tmp_path, small=True)
    fake_stages.clear()
    pl.run_pipeline(tmp_path, small=True, until="drafters", force=["small_lm"])
    assert fake_stages == ["small_lm", "drafters"]
    # Downstream of the small LM: cleared, so they rerun (and their old outputs are gone).
    assert not (tmp_path / "stages" / "phase1.json").exists() and not (tmp_path / "phase1").exists()
    assert not (tmp_path / "stages" / "tvd.json").exists()
    # Not downstream: kept.
    assert (tmp_path / "stages" / "generate.json").exists() and (tmp_path / "generate" / "made").exists()
    assert pl.downstream(["target"]) == [s for s in pl.STAGES if s not in ("world", "small_lm")]


def test_a_run_folder_is_tied_to_its_preset_and_seed(tmp_path, fake_stages):
    pl.run_pipeline(tmp_path, small=True, until="world")
    with pytest.raises(pl.StageError, match="preset=small seed=0.*seed=1"):
        pl.run_pipeline(tmp_path, small=True, until="world", seed=1)


def test_preset_choice_says_plainly_what_runs():
    assert pl.choose_preset(False, True)[0].name == "full"
    sizes, why = pl.choose_preset(False, False)
    assert sizes.name == "small" and why.startswith("no GPU found: running --small")
    assert pl.choose_preset(True, True)[0].name == "small"


def test_a_missing_script_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(pl, "REPO", tmp_path)
    with pytest.raises(pl.StageError, match=r"stage sdvit needs train/sdvit.py, not found"):
        pl.require_script("sdvit", "train/sdvit.py")


def test_cli_reports_errors_in_one_line(tmp_path, fake_stages, capsys):
    assert cli_main(["run", "--out", str(tmp_path), "--small", "--stages", "ablation"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: stage ablation needs stage(s) drafters, phase1, sdvit first")
    assert cli_main(["summary", "--out", str(tmp_path / "none")]) == 2
