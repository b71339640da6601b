"""scripts/gpu_jobs.py: every job the next GPU session runs is a command its program accepts, and a
job's log and results come back as the device tool returns them (one log + one archive)."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from benchmarks.cost_ext import SLOW_HOST_US, slow_host
from benchmarks.report import machine_id

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
gpu_jobs = importlib.import_module("gpu_jobs")


def _module_main(module: str):
    if module == "benchmarks.world":
        from benchmarks.world.__main__ import main
    else:
        main = importlib.import_module(module).main
    return main


def _python_commands(argv: list[str]) -> list[list[str]]:
    """The ``python3 -m MODULE ...`` command lines of a job (``bash -c "A && B"`` holds several)."""
    if argv[0] != "bash":
        return [argv]
    cmds = [shlex.split(part) for part in argv[2].split("&&")]
    return [c[next(i for i, t in enumerate(c) if t == "python3") :] for c in cmds]  # drop VAR=value


@pytest.mark.parametrize("name", [n for n, j in gpu_jobs.JOBS.items() if "pytest" not in j.argv])
def test_each_benchmark_job_parses(name, tmp_path):
    for argv in _python_commands(gpu_jobs.command(name, tmp_path)):
        assert argv[:2] == ["python3", "-m"]
        # argparse reads every option before it meets --help: a wrong preset, job or flag exits 2.
        with pytest.raises(SystemExit) as e:
            _module_main(argv[2])([*argv[3:], "--help"])
        assert e.value.code == 0, argv


TEST_JOBS = [n for n, j in gpu_jobs.JOBS.items() if "pytest" in j.argv]
# One interpreter collects for every test job: a pytest process per job paid torch's and vLLM's
# imports each time (~25 s a job on CI's machine).
COLLECT = """
import json, sys, pytest

class Count:
    def pytest_collection_finish(self, session):
        self.n = len(session.items)

out = {}
for name, args in json.loads(sys.argv[1]).items():
    count = Count()
    count.n = 0
    rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[count])
    out[name] = [int(rc), count.n]
print("COLLECTED " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """Per test job: pytest's exit status and the number of tests it selects (collect only)."""
    work = tmp_path_factory.mktemp("jobs")
    jobs = {n: [a for a in gpu_jobs.command(n, work)[3:] if a not in ("-q", "-s", "-rs")] for n in TEST_JOBS}
    proc = subprocess.run(
        [sys.executable, "-c", COLLECT, json.dumps(jobs)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    m = re.search(r"^COLLECTED (.*)$", proc.stdout, re.M)
    assert proc.returncode == 0 and m, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(m.group(1)), proc.stdout


@pytest.mark.parametrize("name", TEST_JOBS)
def test_each_test_job_selects_tests(name, collected):
    result, log = collected
    rc, n = result[name]
    assert rc == 0 and n > 0, f"{name}: pytest exit {rc}, {n} tests selected\n{log[-3000:]}"


@pytest.fixture
def device_out(tmp_path, monkeypatch):
    """$OUT (logs, archives) and the jobs' result folder, as on the device machine."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("GPU_JOBS_WORK", str(tmp_path / "work"))


def test_extra_cost_arguments_from_the_environment_reach_timing_jobs_only(tmp_path, monkeypatch):
    monkeypatch.setenv("GPU_JOBS_COST_ARGS", "--cpus 0-3 --engine-arg 'distributed_executor_backend=\"mp\"'")
    extra = ["--cpus", "0-3", "--engine-arg", 'distributed_executor_backend="mp"']
    assert gpu_jobs.command("cost05", tmp_path)[-4:] == extra
    assert "--cpus" not in gpu_jobs.command("load", tmp_path)  # a GPU test, not a timing
    # a job that already has --cpus still parses with a second one (argparse keeps the last)
    pinned = gpu_jobs.command("noise-pinned", tmp_path)
    with pytest.raises(SystemExit) as e:
        _module_main("benchmarks.cost")([*pinned[3:], "--help"])
    assert e.value.code == 0 and pinned[-4:] == extra
    monkeypatch.delenv("GPU_JOBS_COST_ARGS")
    assert "--cpus" not in gpu_jobs.command("cost05", tmp_path)


def test_the_parts_of_cost_both_are_one_run_in_one_folder_most_needed_first(tmp_path):
    """Each part reuses the parts before it only if everything but --jobs (not in the run's key)
    agrees; each part's jobs include the earlier parts' (so its table is the whole run so far)."""

    def without_jobs(argv):
        i = argv.index("--jobs")
        j = next(k for k in range(i + 1, len(argv)) if argv[k].startswith("--"))
        return argv[:i] + argv[j:], argv[i + 1 : j]

    parts = [without_jobs(gpu_jobs.command(f"cost-both{i}", tmp_path)) for i in (1, 2, 3, 4)]
    one = parts[0][0]
    assert all(argv == one for argv, _ in parts)
    assert one[one.index("--out") + 1] == str(tmp_path / "cost-both")
    assert one[one.index("--preset") + 1 : one.index("--preset") + 3] == [gpu_jobs.QWEN15, gpu_jobs.QWEN05]
    jobs = [set(j) for _, j in parts]
    assert jobs[0] == {"target", "drafter", "stock"}  # the reference every ratio needs
    assert jobs[0] < jobs[1] < jobs[2] < jobs[3]
    assert jobs[1] - jobs[0] == {"massv", "massv-async"}
    assert jobs[2] - jobs[1] == {"stock-async"}  # massv-async's reference at the same settings
    # last: vLLM's own loop, the "before" column (the issue lets its starting table serve as it)
    assert jobs[3] - jobs[2] == {"massv-stockloop"}
    assert jobs[3] == set(gpu_jobs.BEFORE_AFTER.split()) | {"stock-async"}


def test_jobs_fit_a_device_call():
    for name, job in gpu_jobs.JOBS.items():
        assert job.seconds <= 560, name  # one call ends at 600 s


def test_the_host_check_times_the_engines_python_loop_and_refuses_a_slow_host(capsys):
    us, threshold, machine = gpu_jobs.host_speed(samples=3)
    assert len(us) == 3 and all(0 < x < 1e6 for x in us)  # a real loop of 20k additions: µs, not s
    assert threshold == SLOW_HOST_US
    assert machine == (machine_id() or "?")
    assert gpu_jobs.main(["host", "--samples", "3", "--slow-us", "1e9"]) == 0
    assert "slow in 0), fast enough (median <= 1000000000 us and at most 40% of samples above it)" in (
        capsys.readouterr().out
    )
    assert gpu_jobs.main(["host", "--samples", "3", "--slow-us", "1"]) == 3
    out = capsys.readouterr().out
    assert "SLOW" in out and re.search(r"Python loop \d+ us \(median of 3; \d+-\d+; slow in 3\)", out)


def test_the_host_check_refuses_a_host_with_a_fast_median_but_many_slow_samples():
    # The sixth session's machine of 2026-12-01: 22 of 50 samples slow, median under the threshold.
    mixed = [600.0] * 28 + [1200.0] * 22
    assert slow_host(mixed, 650, 0.4) == (600.0, 22, True)
    assert slow_host([600.0] * 30 + [1200.0] * 20, 650, 0.4) == (600.0, 20, False)
    assert slow_host([600.0] * 29 + [1200.0] * 21, 650, 0.4)[2]
    assert slow_host([700.0] * 50, 650, 1.0) == (700.0, 50, True)  # the median alone
    assert slow_host([600.0, 700.0], 650, 1.0) == (650.0, 1, False)  # mean of the middle two
    assert slow_host(mixed) == slow_host(mixed, SLOW_HOST_US, 0.4)  # the defaults: 650 µs, 40 %


def test_a_job_leaves_its_log_and_results_archive_and_failures_are_counted(
    tmp_path, monkeypatch, device_out, capsys
):
    write = "import pathlib,sys; p=pathlib.Path(sys.argv[1]); p.mkdir(parents=True, exist_ok=True); (p/'r.json').write_text('{}'); print('hello')"
    monkeypatch.setitem(gpu_jobs.JOBS, "ok", gpu_jobs.Job((sys.executable, "-c", write, "{out}"), 1, "test"))
    monkeypatch.setitem(
        gpu_jobs.JOBS, "bad", gpu_jobs.Job((sys.executable, "-c", "raise SystemExit(3)"), 1, "test", None)
    )
    assert gpu_jobs.main(["run", "ok", "bad", "ok"]) == 1
    # only logs and archives land in $OUT (the device tool returns at most 8 files from it)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad.log", "ok.log", "ok.tgz", "work"]
    assert capsys.readouterr().out.count("hello") == 2  # teed to the call's output too
    log = (tmp_path / "ok.log").read_text()
    assert "hello" in log and "ok: exit 0" in log
    assert "bad: exit 3" in (tmp_path / "bad.log").read_text() and not (tmp_path / "bad.tgz").exists()
    with tarfile.open(tmp_path / "ok.tgz") as tar:
        assert tar.getnames() == ["ok", "ok/r.json"]


def test_a_job_past_the_time_limit_is_killed_and_its_partial_results_archived(
    tmp_path, monkeypatch, device_out
):
    # writes one result, then hangs (a child process too: the whole group must go)
    hang = (
        "import pathlib,subprocess,sys,time; p=pathlib.Path(sys.argv[1]); p.mkdir(parents=True);"
        " (p/'first.json').write_text('{}'); print('wrote', flush=True);"
        " subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); time.sleep(60)"
    )
    monkeypatch.setitem(gpu_jobs.JOBS, "hang", gpu_jobs.Job((sys.executable, "-c", hang, "{out}"), 1, "test"))
    t0 = time.monotonic()
    ok = "import pathlib,sys; pathlib.Path(sys.argv[1]).mkdir(parents=True)"
    monkeypatch.setitem(gpu_jobs.JOBS, "next", gpu_jobs.Job((sys.executable, "-c", ok, "{out}"), 1, "test"))
    assert gpu_jobs.main(["run", "hang", "next", "--time-limit", "3"]) == 2
    assert time.monotonic() - t0 < 30  # the hanging child did not keep the pipe open
    assert "hang: exit -9" in (tmp_path / "hang.log").read_text()
    # the job after it found no time left: not started (the next call of the lease runs it)
    assert "next: not started, the time limit was reached" in (tmp_path / "next.log").read_text()
    assert not (tmp_path / "work" / "next").exists() and not (tmp_path / "next.tgz").exists()
    with tarfile.open(tmp_path / "hang.tgz") as tar:
        assert tar.getnames() == ["hang", "hang/first.json"]


def test_lanes_run_side_by_side_each_on_its_own_gpu(tmp_path, monkeypatch, device_out):
    # each job records the GPU it was given and sleeps 2 s; two lanes of one job each overlap
    rec = (
        "import os,pathlib,sys,time; p=pathlib.Path(sys.argv[1]); p.mkdir(parents=True);"
        " (p/'gpu').write_text(os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(2)"
    )
    for name in ("a", "b", "c"):
        monkeypatch.setitem(
            gpu_jobs.JOBS, name, gpu_jobs.Job((sys.executable, "-c", rec, "{out}"), 1, "test")
        )
    t0 = time.monotonic()
    assert gpu_jobs.main(["lanes", "a c", "b"]) == 0
    took = time.monotonic() - t0
    assert 4 <= took < 6  # lane 0 runs a then c (4 s), lane 1 b alongside it
    gpus = {n: (tmp_path / "work" / n / "gpu").read_text() for n in ("a", "b", "c")}
    assert gpus == {"a": "0", "c": "0", "b": "1"}
    with pytest.raises(SystemExit):
        gpu_jobs.main(["lanes", "a", "nope"])


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU masks are Linux-only")
def test_each_lane_runs_on_its_share_of_the_cpus(tmp_path, monkeypatch, device_out, capsys):
    """Jobs and what they start run under their lane's CPU mask; without a split, on all CPUs."""
    import benchmarks.cpus

    rec = (
        "import os,pathlib,subprocess,sys; p=pathlib.Path(sys.argv[1]); p.mkdir(parents=True);"
        " child=subprocess.run([sys.executable,'-c','import os;print(sorted(os.sched_getaffinity(0)))'],"
        " capture_output=True,text=True).stdout.strip();"
        " (p/'cpus').write_text(str(sorted(os.sched_getaffinity(0)))+' '+child)"
    )
    for name in ("a", "b"):
        monkeypatch.setitem(
            gpu_jobs.JOBS, name, gpu_jobs.Job((sys.executable, "-c", rec, "{out}"), 1, "test")
        )
    allowed = sorted(os.sched_getaffinity(0))
    shares = [[allowed[0]], allowed[1:] or [allowed[0]]]
    monkeypatch.setattr(benchmarks.cpus, "split_cores", lambda n: shares)
    assert gpu_jobs.main(["lanes", "a", "b"]) == 0
    for name, share in zip("ab", shares):
        assert (tmp_path / "work" / name / "cpus").read_text() == f"{share} {share}"  # the job, its child
        assert f"on CPUs {benchmarks.cpus.format_cpu_list(share)}" in (tmp_path / f"{name}.log").read_text()
    assert f"lane 0: GPU 0, CPUs {allowed[0]}: a" in capsys.readouterr().out
    # fewer cores than lanes: every lane on all the CPUs this process may use, and it says why
    monkeypatch.setattr(benchmarks.cpus, "split_cores", lambda n: None)
    for name in ("a", "b"):
        (tmp_path / "work" / name / "cpus").unlink()
        (tmp_path / "work" / name).rmdir()
    assert gpu_jobs.main(["lanes", "a", "b"]) == 0
    for name in ("a", "b"):
        assert (tmp_path / "work" / name / "cpus").read_text() == f"{allowed} {allowed}"
    assert "all CPUs (fewer physical cores than lanes)" in capsys.readouterr().out


def test_timing_jobs_are_refused_in_lanes(device_out, capsys):
    assert gpu_jobs.JOBS["cost15"].timed and gpu_jobs.JOBS["profile"].timed
    assert not gpu_jobs.JOBS["async-qwen"].timed and not gpu_jobs.JOBS["world1"].timed
    with pytest.raises(SystemExit):
        gpu_jobs.main(["lanes", "async-qwen", "cost15"])
    assert "['cost15'] must have the machine to themselves" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_jobs.main(["lanes", "parallel", "gemma"])  # two timing jobs disturb each other too


def test_the_output_tail_drops_vllm_log_lines_the_log_keeps_them(tmp_path, monkeypatch, device_out, capsys):
    lines = "INFO 11-30 01:11:08 [x.py:1] engine up\\n(EngineCore pid=7) WARNING 11-30 01:12:55 [y.py:2] w\\n  36 prompts, 0 divergences"
    monkeypatch.setitem(
        gpu_jobs.JOBS, "v", gpu_jobs.Job((sys.executable, "-c", f"print('{lines}')"), 1, "t", None)
    )
    assert gpu_jobs.main(["run", "v"]) == 0
    out = capsys.readouterr().out
    assert "[v]   36 prompts, 0 divergences" in out and "engine up" not in out and "[y.py:2]" not in out
    log = (tmp_path / "v.log").read_text()
    assert "engine up" in log and "[y.py:2] w" in log


def test_the_gate_times_the_stock_engines_that_cost_both_then_reuses(tmp_path, monkeypatch):
    """cost-gate's results land where cost-both keeps its 1.5B preset, under the same run key: the
    whole run does not time those engines again."""
    from benchmarks import cost

    ran, until = [], []

    def run_job(model, spec, prompts, batch_sizes, *a, until_tpot=None, until_s=0.0, **k):
        ran.append((model.parent.name, spec and spec["method"], spec and spec["num_speculative_tokens"]))
        until.append((until_tpot, until_s))
        rows = [{"batch_size": b, "prefill_s": 0.01, "tpot_ms": 5.0, "mal": spec and 6.0, "all_tokens_zero": True}
                for b in batch_sizes]  # fmt: skip
        return {"startup_s": 1.0, "zeroed": {"target": ["x"]}, "rows": rows}

    monkeypatch.setattr(cost, "run_job", run_job)
    for name in ("cost-gate", "cost-both1"):
        (argv,) = _python_commands(gpu_jobs.command(name, tmp_path))
        cost.main(argv[3:])
    p15, p05 = (p.replace("/", "__") for p in (gpu_jobs.QWEN15, gpu_jobs.QWEN05))
    assert ran[:1] == [(p15, "draft_model", 5)]  # the gate times the starting table's cell alone
    # in its engine again while over the starting table's 7.77 / 8.58 ms, 30 s per batch size
    assert until[0] == ({1: 7.77, 8: 8.58}, 30.0) and until[1] == (None, 0.0)
    assert (tmp_path / gpu_jobs.GATE_JOB).is_file()
    # the whole run reuses it and times the rest of the stock engines
    assert [r for r in ran[1:] if r[1] == "draft_model"] == [
        (p15, "draft_model", 3),
        (p05, "draft_model", 3),
        (p05, "draft_model", 5),
    ]


def test_the_stock_gate_compares_stock_with_the_starting_table(tmp_path, capsys):
    job = tmp_path / "stock-g5.json"

    def write(b1, b8):
        rows = [
            {"batch_size": b, "tpot_ms": t, "tpot_ms_repeats": [t, t + 4.0]} for b, t in ((1, b1), (8, b8))
        ]
        job.write_text(json.dumps({"rows": rows}))

    write(7.70, 8.50)
    assert gpu_jobs.main(["stock-gate", "--job", str(job)]) == 0
    assert "B=1: stock 7.70 ms (fastest 7.70), starting table 7.77" in capsys.readouterr().out
    write(7.80, 8.50)  # B=1 over 7.77 ms
    assert gpu_jobs.main(["stock-gate", "--job", str(job)]) == 3
    assert "SLOW at B=[1]" in capsys.readouterr().out
    write(7.70, 8.60)
    assert gpu_jobs.stock_gate(job) == 3
    rows = json.loads(job.read_text())["rows"]
    rows[0]["earlier_timings"] = [{"tpot_ms": 12.3}, {"tpot_ms": 9.1}]  # timed again in its engine
    job.write_text(json.dumps({"rows": rows}))
    capsys.readouterr()
    assert gpu_jobs.stock_gate(job) == 3
    assert (
        "B=1: stock 7.70 ms (fastest 7.70), starting table 7.77; timing 3 in its engine, before it 12.30, 9.10"
        in (capsys.readouterr().out)
    )
    job.write_text(json.dumps({"rows": [{"batch_size": 1, "tpot_ms": 7.0}]}))
    with pytest.raises(SystemExit, match=r"no batch size \[8\]"):
        gpu_jobs.stock_gate(job)


def _gate_timings(monkeypatch, tmp_path, tpots):
    """A fake ``cost-gate`` run per entry of ``tpots`` ((B=1, B=8) ms, or None: cut off before it
    saved); returns the runs made and the words each run added to cost-gate's command."""
    runs, extras = [], []

    def run_job(name, out, work, deadline=None, extra=(), **k):
        assert name == "cost-gate" and work == tmp_path
        b1_b8 = tpots[len(runs)]
        runs.append(b1_b8)
        extras.append(list(extra))
        if b1_b8 is None:
            return 137
        rows = [{"batch_size": b, "tpot_ms": t} for b, t in zip((1, 8), b1_b8)]
        job = tmp_path / gpu_jobs.GATE_JOB
        job.parent.mkdir(parents=True, exist_ok=True)
        job.write_text(json.dumps({"rows": rows}))
        return 0

    monkeypatch.setattr(gpu_jobs, "run_job", run_job)
    monkeypatch.setenv("GPU_JOBS_WORK", str(tmp_path))
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    return runs, extras


def _tpot_b1(path):
    return json.loads(path.read_text())["rows"][0]["tpot_ms"]


def test_stock_retime_times_the_cell_again_until_it_runs_at_the_starting_speed(tmp_path, monkeypatch):
    runs, extras = _gate_timings(monkeypatch, tmp_path, [(14.1, 14.0), (7.4, 8.9), (7.5, 8.5), (1.0, 1.0)])
    assert gpu_jobs.main(["stock-retime"]) == 0
    assert len(runs) == 3  # stops at the first timing under 7.77 / 8.58 ms
    assert extras[0] == ["--until-seconds", "30"]  # no time limit: the gate's own 30 s per batch size
    assert _tpot_b1(tmp_path / gpu_jobs.GATE_JOB) == 7.5  # the table's cell
    kept = sorted((tmp_path / gpu_jobs.RETIMES).iterdir())
    assert [p.name for p in kept] == ["stock-g5-1.json", "stock-g5-2.json"]
    assert [_tpot_b1(p) for p in kept] == [14.1, 7.4]  # every earlier timing is kept
    assert not list((tmp_path / gpu_jobs.COST_BOTH15 / "jobs").glob("stock-g5-*"))  # not read as jobs
    assert gpu_jobs.main(["stock-retime"]) == 0 and len(runs) == 3  # passed already: no timing


def test_stock_retime_keeps_the_last_timing_when_one_is_cut_off_or_time_is_short(tmp_path, monkeypatch):
    runs, extras = _gate_timings(monkeypatch, tmp_path, [(14.1, 14.0), None])
    assert gpu_jobs.main(["stock-retime", "--time-limit", "400"]) == 137
    assert runs == [(14.1, 14.0), None]
    # ~400 s left: the engine's start and first timings (180 s), then half the rest per batch size
    assert extras[1] in (["--until-seconds", "110"], ["--until-seconds", "109"])
    assert _tpot_b1(tmp_path / gpu_jobs.GATE_JOB) == 14.1  # put back: the table still has the cell
    assert not list((tmp_path / gpu_jobs.RETIMES).iterdir())
    assert gpu_jobs.main(["stock-retime", "--time-limit", "179"]) == 3
    assert len(runs) == 2  # no engine started that could not time the cell once
