"""The synthetic-world stage runner: caching, resume, --until/--stages/--force, clear errors."""

from __future__ import annotations

import dataclasses
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
    pl.run_pipeline(tmp_path, preset="small", until="drafters")
    assert fake_stages == ["world", "target", "small_lm", "drafters"]
    marker = json.loads((tmp_path / "stages" / "target.json").read_text())
    assert marker["result"] == {"name": "target"} and marker["seconds"] >= 0 and marker["preset"] == "small"
    fake_stages.clear()
    pl.run_pipeline(tmp_path, preset="small")  # the rest; finished stages are not repeated
    assert fake_stages == ["phase1", "generate", "sdvit", "parallel", "ablation", "tvd"]
    fake_stages.clear()
    pl.run_pipeline(tmp_path, preset="small")
    assert fake_stages == []


def test_a_failed_stage_leaves_no_marker_and_the_rerun_resumes_there(tmp_path, fake_stages, monkeypatch):
    def boom(run):
        raise pl.StageError("stage generate failed (exit 1)")

    good = pl.STAGE_FNS["generate"]
    monkeypatch.setitem(pl.STAGE_FNS, "generate", boom)
    with pytest.raises(pl.StageError):
        pl.run_pipeline(tmp_path, preset="small")
    assert not (tmp_path / "stages" / "generate.json").exists()
    assert fake_stages == ["world", "target", "small_lm", "drafters", "phase1"]
    fake_stages.clear()
    monkeypatch.setitem(pl.STAGE_FNS, "generate", good)
    pl.run_pipeline(tmp_path, preset="small")
    assert fake_stages == ["generate", "sdvit", "parallel", "ablation", "tvd"]


def test_stages_need_their_prerequisites(tmp_path, fake_stages):
    with pytest.raises(pl.StageError, match="stage sdvit needs stage.*phase1, generate"):
        pl.run_pipeline(tmp_path, preset="small", stages=["sdvit"])
    with pytest.raises(pl.StageError, match="unknown stage 'nope'"):
        pl.run_pipeline(tmp_path, preset="small", stages=["nope"])
    assert fake_stages == []


def test_force_reruns_a_stage_and_clears_everything_built_on_it(tmp_path, fake_stages):
    pl.run_pipeline(tmp_path, preset="small")
    fake_stages.clear()
    pl.run_pipeline(tmp_path, preset="small", until="drafters", force=["small_lm"])
    assert fake_stages == ["small_lm", "drafters"]
    # Downstream of the small LM: cleared, so they rerun (and their old outputs are gone).
    assert not (tmp_path / "stages" / "phase1.json").exists() and not (tmp_path / "phase1").exists()
    assert not (tmp_path / "stages" / "tvd.json").exists()
    # Not downstream: kept.
    assert (tmp_path / "stages" / "generate.json").exists() and (tmp_path / "generate" / "made").exists()
    assert pl.downstream(["target"]) == [s for s in pl.STAGES if s not in ("world", "small_lm")]


def test_a_run_folder_is_tied_to_its_preset_and_seed(tmp_path, fake_stages):
    pl.run_pipeline(tmp_path, preset="small", until="world")
    with pytest.raises(pl.StageError, match="preset=small seed=0.*seed=1"):
        pl.run_pipeline(tmp_path, preset="small", until="world", seed=1)


def test_preset_choice_says_plainly_what_runs():
    assert pl.choose_preset(None, True) == (pl.PRESETS["full"], "GPU found: running the full-size pipeline")
    sizes, why = pl.choose_preset(None, False)
    assert sizes.name == "demo" and why.startswith("no GPU found: running the CPU demo")
    assert pl.choose_preset("demo", True)[0].name == "demo"
    sizes, why = pl.choose_preset("small", True)
    assert sizes.name == "small" and "the numbers mean nothing" in why
    with pytest.raises(pl.StageError, match="unknown preset 'huge'"):
        pl.choose_preset("huge", False)


def test_the_demo_is_a_reduced_world_and_the_full_world_is_unchanged():
    from benchmarks.world import generate_world as gw

    full, demo = pl.PRESETS["full"].spec, pl.PRESETS["demo"].spec
    assert (full.shapes, full.colours, full.grid, full.tasks) == (gw.SHAPES, gw.COLOURS, 3, gw.TASKS)
    assert (full.min_side, full.max_side, full.max_objects) == (gw.MIN_SIDE, gw.MAX_SIDE, gw.MAX_OBJECTS)
    assert gw.check_spec(demo) is demo and 1 / len(demo.colours) <= 0.34
    assert len(demo.colours) < len(full.colours) and demo.max_side < full.min_side


def test_the_summary_says_it_is_the_cpu_demo_and_names_the_full_command():
    s = {
        "preset": "demo",
        "why": "no GPU found: running the CPU demo",
        "spec": dataclasses.asdict(pl.PRESETS["demo"].spec),
        "stages": {"world": {"status": "ran", "seconds": 1.0}},
        "total_seconds": 1.0,
        "results": {"target": None},
        "mal_order": {"mal": {"text-only": 1.5, "massv-no-sdvit": 2.0, "massv": 2.5}, "ordered": True},
    }
    text = pl.format_summary(s)
    assert text.startswith("== synthetic world: CPU demo ==\nno GPU found: running the CPU demo")
    assert "This is the CPU demo" in text and f"`{pl.FULL_COMMAND}` on a machine with a GPU" in text
    assert "text-only 1.50 < MASSV without SDViT 2.00 <= MASSV 2.50: the paper's ordering" in text
    s["mal_order"] = {"mal": {"text-only": 2.0, "massv-no-sdvit": 1.5, "massv": 2.5}, "ordered": False}
    assert "NOT the paper's ordering" in pl.format_summary(s)


def test_mal_order_reads_the_t0_all_tasks_cells():
    def table(a, b, c):
        return {"table": {"T=0": {d: {"all": {"mal": v}} for d, v in zip(pl.ORDER, (a, b, c))}}}

    assert pl.mal_order(table(1.5, 2.0, 2.0))["ordered"] is True
    assert pl.mal_order(table(2.0, 2.0, 2.5))["ordered"] is False  # text-only must be strictly lower
    assert pl.mal_order(table(1.5, 2.5, 2.0))["ordered"] is False
    assert pl.mal_order(None) is None


def test_a_missing_script_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(pl, "REPO", tmp_path)
    with pytest.raises(pl.StageError, match=r"stage sdvit needs train/sdvit.py, not found"):
        pl.require_script("sdvit", "train/sdvit.py")


def test_cli_reports_errors_in_one_line(tmp_path, fake_stages, capsys):
    assert cli_main(["run", "--out", str(tmp_path), "--small", "--stages", "ablation"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: stage ablation needs stage(s) drafters, phase1, sdvit, parallel first")
    assert cli_main(["summary", "--out", str(tmp_path / "none")]) == 2


def test_progress_bars_go_to_the_stage_log_not_a_piped_console(tmp_path, monkeypatch, capsys):
    script = tmp_path / "job.py"
    script.write_text(
        "import sys\n"
        "from tqdm import tqdm\n"
        "for _ in tqdm(range(3), desc='train', file=sys.stdout, mininterval=0): pass\n"
        "for _ in tqdm(iter(range(2)), desc='data', unit='rec', file=sys.stdout, mininterval=0): pass\n"
        "print('[massv] done: 3 steps')\n"
    )
    monkeypatch.setattr(pl, "REPO", tmp_path)
    pl.run_cmd("job", [script], tmp_path / "job.log")
    shown = capsys.readouterr().out
    logged = (tmp_path / "job.log").read_text()
    assert "train: 100%|" in logged and "data: 2rec [" in logged and "[massv] done: 3 steps" in logged
    assert "[massv] done: 3 steps\n" in shown and "train:" not in shown and "data:" not in shown
