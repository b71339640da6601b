"""benchmarks.cost: real-shape folders, placeholder weights, forced acceptance and the summary maths.

Only the last test starts an engine (tiny shapes on CPU, one MASSV engine); it is marked slow.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from benchmarks.cost import (
    SCHEMA,
    format_report,
    summarise,
    write_placeholder_safetensors,
    write_shape_set,
)
from benchmarks.cost_ext import zero_final_norms
from benchmarks.report import check_schema
from massv_vllm.serving.checks import check_pair, target_config_from_dir


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return tmp_path_factory.mktemp("shapes")


def _params(folder) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize(
    "preset, text, small, params_b",
    [
        # hidden, layers, heads, kv heads, intermediate, vocab
        ("qwen2.5-vl-7b/qwen2.5-1.5b", (3584, 28, 28, 4, 18944, 152064), (1536, 28, 12, 2, 8960), 1.55),
        ("qwen2.5-vl-7b/qwen2.5-0.5b", (3584, 28, 28, 4, 18944, 152064), (896, 24, 14, 2, 4864), 0.50),
        ("gemma3-12b/gemma3-1b", (3840, 48, 16, 8, 15360, 262208), (1152, 26, 4, 1, 6912), 1.01),
    ],
)
def test_real_shape_folders(shapes_root, preset, text, small, params_b):
    s = write_shape_set(shapes_root, preset)
    tcfg = target_config_from_dir(s.target)
    t = tcfg.get_text_config()
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == text[:4]
    assert (t.intermediate_size, t.vocab_size) == text[4:]
    assert tcfg.dtype == torch.bfloat16 or str(getattr(tcfg, "dtype", "")) in ("bfloat16", "torch.bfloat16")
    assert not list(s.target.glob("*.safetensors"))  # no weights: vLLM's dummy loader makes them
    info = check_pair(s.drafter, tcfg, s.target)  # what the "massv" path validates at engine start
    b = info.base_config
    assert (b.hidden_size, b.num_hidden_layers, b.num_attention_heads, b.num_key_value_heads) == small[:4]
    assert b.intermediate_size == small[4] and b.vocab_size == t.vocab_size  # padded to the target's
    proj = info.massv.projector
    assert proj.input_dim == (3584 if "qwen" in preset else 3840) and proj.hidden_dim == small[0]
    shapes = _params(s.drafter)
    n = sum(int(torch.tensor(v).prod()) for v in shapes.values())
    assert n / 1e9 == pytest.approx(params_b, rel=0.03)
    assert s.drafter.joinpath("model.safetensors").stat().st_size == _data_end(
        s.drafter / "model.safetensors"
    )
    small_cfg = json.loads((s.small_lm / "config.json").read_text())
    assert small_cfg["architectures"][0] in ("Qwen2ForCausalLM", "Gemma3ForCausalLM")
    assert small_cfg["vocab_size"] == t.vocab_size and "massv" not in small_cfg
    assert write_shape_set(shapes_root, preset) == s  # reused, not rebuilt


def _data_end(path) -> int:
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return 8 + n + max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")


def test_vllm_accepts_the_real_shape_engine_configs(shapes_root):
    """The configs the GPU run uses pass vLLM's own validation (speculative config, drafter checks)."""
    from vllm.engine.arg_utils import EngineArgs

    from massv_vllm.engine import engine_kwargs, massv_spec

    for preset in ("qwen2.5-vl-7b/qwen2.5-1.5b", "gemma3-12b/gemma3-1b"):
        s = write_shape_set(shapes_root, preset)
        extra = {"disable_hybrid_kv_cache_manager": True} if s.family == "gemma3" else {}
        for spec, asynchronous in itertools.product(
            (
                massv_spec(str(s.drafter), 5),
                {"method": "draft_model", "model": str(s.small_lm), "num_speculative_tokens": 5},
            ),
            (False, True),  # `massv-async`, `stock-async` (vLLM's CPU platform then turns it off)
        ):
            kw = engine_kwargs(
                str(s.target), spec, load_format="dummy", max_model_len=1024, max_images=1, **extra,
                **({"async_scheduling": True} if asynchronous else {}),
            )  # fmt: skip
            cfg = EngineArgs(**kw).create_engine_config()
            assert cfg.speculative_config.method == "draft_model"  # "massv" resolved to vLLM's method
            assert cfg.model_config.dtype == torch.bfloat16
            assert cfg.speculative_config.draft_model_config.hf_config.vocab_size == (
                cfg.model_config.hf_config.get_text_config().vocab_size
            )


def test_placeholder_safetensors_roundtrip(tmp_path):
    shapes = {"b": (3,), "a.weight": (2, 5), "c": (1, 1, 7)}
    p = write_placeholder_safetensors(tmp_path / "w.safetensors", shapes)
    with safe_open(str(p), "pt") as f:
        assert {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()} == shapes  # noqa: SIM118
        for k in shapes:
            t = f.get_tensor(k)
            assert t.dtype == torch.bfloat16 and t.shape == shapes[k] and not t.any()


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_zeroed_final_norms_force_token_zero(family, tiny_qwen, tiny_gemma):
    """All logits become 0 (greedy picks id 0) in target and drafter alike; vision is untouched."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    tiny = tiny_qwen if family == "qwen2_5_vl" else tiny_gemma
    lm = AutoModelForCausalLM.from_pretrained(str(tiny.small_lm)).eval()
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    with torch.no_grad():
        assert lm(ids).logits.abs().max() > 0
        names = zero_final_norms(lm)
        logits = lm(ids).logits
    assert names == [f"model.norm ({type(lm.model.norm).__name__})"]
    assert logits.abs().max() == 0 and (logits.argmax(-1) == 0).all()
    vlm = AutoModelForImageTextToText.from_pretrained(str(tiny.target)).eval()
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    names = zero_final_norms(vlm)
    assert len(names) == 1 and "language_model" in names[0]
    changed = [k for k, v in vlm.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == 1 and changed[0].endswith("language_model.norm.weight")


def _job(rows, startup=1.0):
    return {"startup_s": startup, "zeroed": {"target": ["x"]}, "rows": rows}


def _row(b, tpot, mal=None):
    return {"batch_size": b, "prefill_s": 0.01, "tpot_ms": tpot, "mal": mal, "all_tokens_zero": True}


def test_summary_maths():
    results = {
        "target": _job([_row(1, 10.0), _row(8, 12.0)]),
        "drafter": _job([_row(1, 1.0), _row(8, 3.0)]),
        "stock-g5": _job([_row(1, 2.0, 6.0), _row(8, 3.0, 6.0)]),
        "massv-g5": _job([_row(1, 2.2, 6.0), _row(8, 3.0, 6.0)]),
    }
    s = summarise(results, [1, 8], [5], [2.46, 3.2, 7.0])
    assert s["cost_ratio"] == pytest.approx({"1": 0.1, "8": 0.25})
    ceil = {(r["batch_size"], r["mal"]): r["speedup"] for r in s["ceiling"]}
    assert ceil[(1, 2.46)] == pytest.approx(2.46 / 1.5) and ceil[(8, 3.2)] == pytest.approx(3.2 / 2.25)
    assert ceil[(1, 6.0)] == pytest.approx(6.0 / 1.5)  # 100% acceptance always listed
    assert (1, 7.0) not in ceil  # a MAL above γ+1 is impossible at γ=5
    e2e = {(r["mode"], r["batch_size"]): r for r in s["e2e"]}
    assert e2e[("stock", 1)]["speedup_vs_none"] == pytest.approx(5.0)
    assert e2e[("stock", 1)]["predicted_full_acceptance"] == pytest.approx(4.0)
    assert e2e[("none", 8)]["speedup_vs_none"] == pytest.approx(1.0) and e2e[("none", 8)]["gamma"] is None
    ov = {(r["gamma"], r["batch_size"]): r["massv_over_stock_tpot"] for r in s["massv_overhead"]}
    assert ov == pytest.approx({(5, 1): 1.1, (5, 8): 1.0})
    doc = {"preset": "p", **s}
    text = format_report(doc)
    assert "c = drafter/target" in text and "massv γ=5" in text


def test_report_shows_the_fastest_repeat_and_the_host_interference():
    massv = _row(1, 2.0, 6.0)
    massv["tpot_ms_repeats"] = [2.0, 2.5, 1.6]
    massv["cpu_repeats"] = [
        {"steal": 0.0, "busy": 0.1, "throttled_ms": 0.0, "python_us": 400.0},
        {"steal": 0.05, "busy": 0.2, "throttled_ms": 12.5, "python_us": 720.0},
        {"steal": None, "busy": None, "throttled_ms": None, "python_us": 410.0},
    ]
    results = {"target": _job([_row(1, 10.0)]), "drafter": _job([_row(1, 1.0)]), "massv-g5": _job([massv])}
    summary = summarise(results, [1], [5], [])
    # saved before the frontend's loop was timed: the counter is there, as null
    row = next(r for r in summary["e2e"] if r["mode"] == "massv")
    assert [c["frontend_python_us"] for c in row["cpu_repeats"]] == [None] * 3
    assert [c["python_us"] for c in row["cpu_repeats"]] == [400.0, 720.0, 410.0]
    text = format_report({"preset": "p", **summary})
    header = next(line for line in text.splitlines() if line.startswith("engine") and "fastest" in line)
    row = next(line for line in text.splitlines() if line.startswith("massv γ=5"))
    cells = dict(zip(re.split(r"\s{2,}", header.strip()), re.split(r"\s{2,}", row.strip())))
    # ceiling (γ+1)·T/(T+γ·T_d) = 6·10/(10+5) = 4.0; median 2.0 ms -> 5.0x -> 1.25 of it;
    # fastest 1.6 ms -> 6.25x -> 1.5625 of it
    assert cells["TPOT ms"] == "2.000" and cells["fastest"] == "1.600" and cells["spread"] == "45%"
    assert (
        cells["ceiling"] == "4.00" and cells["of ceiling"] == "1.25" and cells["fastest of ceiling"] == "1.56"
    )
    assert cells["max steal"] == "5.0%" and cells["max throttled ms"] == "12.5"
    assert cells["Python slowest/fastest"] == "1.80x"  # 720 / 400 µs


def test_decode_tpot_from_the_engines_request_timestamps():
    from benchmarks.cost import decode_tpot_ms

    def out(first, last, n):
        return SimpleNamespace(
            metrics=SimpleNamespace(first_token_ts=first, last_token_ts=last, num_generation_tokens=n)
        )

    # per request: 10 ms over 4 tokens after the first = 2.5 ms, 30 ms over 4 = 7.5, 9 ms over 3 = 3.0; median 3.0
    assert decode_tpot_ms([out(1.0, 1.010, 5), out(2.0, 2.030, 5), out(3.0, 3.009, 4)]) == pytest.approx(3.0)
    assert decode_tpot_ms([SimpleNamespace(metrics=None)]) is None  # an engine without stats
    assert decode_tpot_ms([out(1.0, 1.0, 1)]) is None  # one token: no decode time


def _sched(tokens, spec=None, new=()):
    return SimpleNamespace(
        num_scheduled_tokens=tokens,
        scheduled_spec_decode_tokens=spec or {},
        scheduled_new_reqs=[SimpleNamespace(req_id=r) for r in new],
    )


def test_decode_batch_counts_only_steps_that_purely_decode():
    from benchmarks.cost_ext import decode_batch

    drafts = {"a": [0, 0], "b": [0, 0]}
    assert decode_batch(_sched({"a": 3, "b": 3}, drafts)) == 2  # 1 sampled + 2 drafts each
    assert decode_batch(_sched({"a": 1, "b": 1})) == 2  # no speculation
    assert decode_batch(_sched({"a": 3, "b": 90}, {"a": [0, 0]})) == 0  # b is prefilling
    assert decode_batch(_sched({"a": 3, "b": 3}, drafts, new=["c"])) == 0  # a new request
    assert decode_batch(_sched({"a": 3}, {"a": [0, 0, 0]})) == 0  # a prefill chunk of 3 is not 1 + 3
    assert decode_batch(_sched({})) == 0  # the empty step after the last request


def test_decoding_requests_counts_the_requests_that_decode_beside_prefills():
    from benchmarks.cost_ext import decoding_requests

    drafts = {"a": [0, 0], "b": [0, 0]}
    assert decoding_requests(_sched({"a": 3, "b": 3}, drafts)) == 2
    assert decoding_requests(_sched({"a": 3, "b": 90}, {"a": [0, 0]})) == 1  # b is prefilling
    assert decoding_requests(_sched({"a": 3, "c": 1}, {"a": [0, 0]}, new=["c"])) == 1  # c: a 1-token prompt
    assert decoding_requests(_sched({"a": 3}, {"a": [0, 0, 0]})) == 0  # a prefill chunk of 3 is not 1 + 3
    assert decoding_requests(_sched({"a": 1, "b": 1})) == 2  # no speculation


def test_steady_step_ms_keeps_only_full_batch_decode_steps():
    from benchmarks.cost import steady_step_ms

    # (start s, decode batch): prefill, mixed, 3 full-batch steps, the smaller tail, empty
    log = [(0.0, 0), (0.050, 0), (0.060, 4), (0.072, 4), (0.083, 4), (0.090, 3), (0.095, 0)]
    assert steady_step_ms(log, 4) == pytest.approx([12.0, 11.0])  # the step at 0.083 has no end here
    assert steady_step_ms(log, 3) == []
    assert steady_step_ms([(0.0, 1), (0.004, 1)], 1) == pytest.approx([4.0])
    assert steady_step_ms([(0.0, 2, 2), (0.005, 2, 2)], 2) == pytest.approx([5.0])  # with decoding counts


def test_python_speed_times_the_loop_it_is_given():
    from benchmarks.cost_ext import python_speed_us

    small, large = python_speed_us(2_000, 3), python_speed_us(40_000, 3)
    assert small > 0 and large > 5 * small  # 20x the work


def test_host_sample_reads_steal_idle_and_cgroup_throttling(tmp_path):
    from benchmarks.cost import host_sample, host_shares

    def sample(user, idle, iowait, steal, throttled_us, v2=True):
        stat = tmp_path / "stat"
        # user nice system idle iowait irq softirq steal guest guest_nice
        stat.write_text(f"cpu  {user} 0 100 {idle} {iowait} 0 0 {steal} 50 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
        v2_file, v1_file = tmp_path / "v2.stat", tmp_path / "v1.stat"
        if v2:
            v2_file.write_text(f"usage_usec 5\nnr_throttled 2\nthrottled_usec {throttled_us}\n")
        else:
            v1_file.write_text(f"nr_periods 3\nnr_throttled 2\nthrottled_time {throttled_us * 1000}\n")
        files = ((str(v2_file), "throttled_usec", 1e-3), (str(v1_file), "throttled_time", 1e-6))
        return host_sample(str(stat), files)

    a = sample(1000, 5000, 0, 0, 0)
    assert a == {"steal": 0, "idle": 5000, "total": 6100, "throttled_ms": 0.0}
    # 1000 jiffies pass: 300 user, 500 idle, 100 iowait, 100 stolen; 25 ms throttled
    b = sample(1300, 5500, 100, 100, 25_000)
    assert host_shares(a, b) == pytest.approx({"steal": 0.1, "busy": 0.4, "throttled_ms": 25.0})
    (tmp_path / "v2.stat").unlink()
    assert sample(1000, 5000, 0, 0, 7_000, v2=False)["throttled_ms"] == pytest.approx(7.0)  # cgroup v1
    # no such files (not Linux): no counters, and the shares say so instead of failing
    none = host_sample(str(tmp_path / "missing"), ())
    assert none == {} and host_shares(none, none) == {"steal": None, "busy": None, "throttled_ms": None}


def test_cpus_flag_errors_before_any_engine(tmp_path, monkeypatch, capsys):
    from benchmarks import cost

    monkeypatch.setattr(cost, "run_cost", lambda *a, **k: pytest.fail("ran with a bad --cpus"))
    with pytest.raises(SystemExit) as e:
        cost.main(["--tiny", "--cpus", "0-100000", "--out", str(tmp_path)])
    assert e.value.code == 2 and "--cpus '0-100000'" in capsys.readouterr().err


@pytest.mark.engine
@pytest.mark.slow
def test_tiny_massv_engine_reaches_full_acceptance(tmp_path, monkeypatch):
    """On vLLM (CPU): zeroed norms make every draft token accepted, MAL = γ + 1 exactly."""
    from benchmarks import cost
    from massv_vllm.patches.envs import SWITCHES

    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASSV_FAST_DRAFT_FIRST_PASS", "1")  # its default: same engine, recorded
    cpu = max(os.sched_getaffinity(0))
    argv = ["--tiny", "--jobs", "massv", "--profile", "2", "--cpus", str(cpu), "--out", str(tmp_path)]
    doc = cost.main(argv)
    assert check_schema(doc, SCHEMA) == []
    assert json.loads((tmp_path / "cost.json").read_text()) == doc
    eng = doc["engines"]["massv-g2"]
    assert eng["zeroed"]["target"] and eng["zeroed"]["drafter"]
    assert "vllm.v1.spec_decode.draft_model.DraftModelProposer.propose" in eng["patches"]
    # a switch set by the caller is written beside the engine's results and in the report
    assert eng["env"] == {"MASSV_FAST_DRAFT_FIRST_PASS": "1"}
    assert "set for every engine: MASSV_FAST_DRAFT_FIRST_PASS=1" in format_report(doc)
    # --cpus: the engine's own process ran on that CPU alone, and the run says so
    assert eng["cpus"] == [cpu] and doc["meta"]["settings"]["cpus"] == [cpu]
    assert f"pinned to CPUs [{cpu}]" in format_report(doc)
    rows = [r for r in doc["e2e"] if r["mode"] == "massv"]
    assert [r["batch_size"] for r in rows] == [1, 2]
    for r in rows:
        assert r["gamma"] == 2 and r["mal"] == pytest.approx(3.0) and r["all_tokens_zero"]
        assert r["tpot_ms"] >= 0 and r["speedup_vs_none"] is None  # no target job in this run
        # the engine's own decode timings, one per repeat (--tiny: 2), their median is the TPOT
        assert len(r["tpot_ms_repeats"]) == 2 and all(x > 0 for x in r["tpot_ms_repeats"])
        assert r["tpot_ms"] == pytest.approx(
            sorted(r["tpot_ms_repeats"])[0] / 2 + sorted(r["tpot_ms_repeats"])[1] / 2
        )
        assert r["engine_tpot_ms"] > 0  # the request timestamps' estimate, beside it
    # --tiny asks for 12 decode tokens, γ + 1 = 3 per forced-accepted step: 4 whole steps
    job = json.loads((tmp_path / "jobs" / "massv-g2.json").read_text())
    assert {row["decode_tokens"] for row in job["rows"]} == {12}
    # 4 steps per request after its prefill; at B=1 all decode the whole batch, 3 have an end (the
    # next engine step is empty once the request is done)
    b1 = next(row for row in job["rows"] if row["batch_size"] == 1)
    assert b1["steady_steps"] == [3, 3]
    # each repeat records the host's CPU interference (this Linux machine has /proc/stat)
    assert len(b1["cpu_repeats"]) == 2 and all(0 <= c["steal"] <= 1 for c in b1["cpu_repeats"])
    assert all(c["python_us"] > 0 for c in b1["cpu_repeats"])  # timed in the engine's process
    assert all(c["frontend_python_us"] > 0 for c in b1["cpu_repeats"])  # and in this one
    # --profile: the phases of a spec step, and how vLLM ran each forward. At B=1 every verify
    # forward carries γ + 1 = 3 tokens (CPU: no CUDA graphs, mode NONE); MASSV's loop drafted.
    prof = doc["profile"]["massv-g2"]["1"]
    assert prof["steps"] >= 1 and prof["phases"]["target: forward (verify)"]["calls"] == pytest.approx(1.0)
    assert prof["phases"]["draft: decode step (full graph)"]["calls"] > 0
    assert prof["graph_modes"]["target"] == {"NONE tokens=3 reqs=None": pytest.approx(1.0)}
    # rerun: the finished job is reused, no engine
    monkeypatch.setattr(cost, "run_job", lambda *a, **k: pytest.fail("finished job rerun"))
    again = cost.main(argv)
    assert again["e2e"] == doc["e2e"]
    # ... but not under another switch setting: that engine would differ

    class Rerun(Exception):
        pass

    def rerun(*a, **k):
        raise Rerun

    monkeypatch.setattr(cost, "run_job", rerun)
    monkeypatch.setenv("MASSV_FAST_DRAFT_FIRST_PASS", "0")
    with pytest.raises(Rerun):
        cost.main(argv)


@pytest.mark.engine
@pytest.mark.slow
def test_tiny_stock_vanilla_engine_has_no_massv_code_beside_a_stock_engine_in_turns(tmp_path):
    """On vLLM (CPU): the spawned stock-vanilla engine applied no massv-vllm patch (this process
    has the plugin loaded, and so has the stock engine running beside it); zeroed norms force full
    acceptance in both, counted from the workers' step logs since the two engines share one set of
    vLLM metrics in this process."""
    from benchmarks import cost
    from massv_vllm.patches import applied

    argv = ["--tiny", "--jobs", "stock", "stock-vanilla", "--interleave", "--batch-sizes", "1"]
    doc = cost.main([*argv, "--out", str(tmp_path)])
    assert applied()  # this process runs with massv-vllm's patches
    eng = doc["engines"]
    assert eng["stock-vanilla-g2"]["patches"] == [] and eng["stock-vanilla-g2"]["env"]["VLLM_PLUGINS"] == ""
    assert "vllm.v1.spec_decode.draft_model.DraftModelProposer.propose" in eng["stock-g2"]["patches"]
    for mode in ("stock", "stock-vanilla"):
        (row,) = [r for r in doc["e2e"] if r["mode"] == mode]
        assert row["mal"] == pytest.approx(3.0) and row["all_tokens_zero"], mode
    (effect,) = doc["plugin_effect"]
    assert effect["paired_stock_over_vanilla"] > 0


@pytest.mark.parametrize("gammas", [[5], [3, 5], [3, 5, 7]])
def test_capture_sizes_cover_every_measured_forward_after_vllms_rounding(gammas):
    """Each forward of a measured step gets a CUDA graph padded by less than one step's tokens:
    the verify (B·(γ+1)) and the drafter's first pass (B·(γ+2), or B·(2γ+1) with parallel drafting),
    checked against vLLM's own rounding of the sizes for a speculative engine."""
    from vllm.config import CompilationConfig

    from benchmarks.cost import capture_sizes

    batch_sizes = [1, 8]
    sizes = capture_sizes(batch_sizes, gammas)
    for g in gammas:
        cc = CompilationConfig(cudagraph_capture_sizes=sizes, max_cudagraph_capture_size=max(sizes))
        cc.adjust_cudagraph_sizes_for_spec_decode(g + 1, 1)
        captured = cc.cudagraph_capture_sizes
        for b in batch_sizes:
            for n in (b * (g + 1), b * (g + 2), b * (2 * g + 1)):
                padded = min((s for s in captured if s >= n), default=None)
                assert padded is not None and padded - n < g + 1, (g, b, n, captured)


def test_gemma3_engines_are_spawned_v1_without_a_drafter_and_stock_gets_the_kv_window_fix():
    from benchmarks.cost import job_env

    spec = {"method": "massv", "model": "d", "num_speculative_tokens": 5}
    stock = {"method": "draft_model", "model": "d", "num_speculative_tokens": 5}
    spawn = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    assert job_env("gemma3", "target", None) == {**spawn, "VLLM_USE_V2_MODEL_RUNNER": "0"}
    assert job_env("gemma3", "drafter", None) == {**spawn, "VLLM_USE_V2_MODEL_RUNNER": "0"}
    assert job_env("gemma3", "massv", spec) == spawn  # draft_model runs on V1 by itself
    assert job_env("gemma3", "stock", stock) == {**spawn, "MASSV_PATCH_KV_WINDOWS": "always"}
    assert job_env("gemma3", "stock-async", stock) == {**spawn, "MASSV_PATCH_KV_WINDOWS": "always"}
    assert job_env("qwen2_5_vl", "target", None) is None
    assert job_env("qwen2_5_vl", "stock", stock) is None
    assert job_env("qwen2_5_vl", "massv-stockloop", spec) == {"MASSV_FAST_DRAFT": "0"}
    # no massv-vllm plugin in its engine: spawned (a forked one inherits this process's patches)
    assert job_env("qwen2_5_vl", "stock-vanilla", stock) == {"VLLM_PLUGINS": "", **spawn}


def test_only_gemma3_speculative_engines_turn_the_hybrid_kv_manager_off():
    from benchmarks.cost import job_engine_kw

    base = {"max_num_seqs": 8}
    spec = {"method": "massv", "model": "d", "num_speculative_tokens": 5}
    assert job_engine_kw("gemma3", base, "massv", spec) == {
        "max_num_seqs": 8,
        "disable_hybrid_kv_cache_manager": True,
    }
    assert job_engine_kw("gemma3", base, "target", None) == {"max_num_seqs": 8}  # vLLM's default
    assert job_engine_kw("qwen2_5_vl", base, "massv", spec) == {"max_num_seqs": 8}
    assert job_engine_kw("qwen2_5_vl", base, "massv-async", spec) == {
        "max_num_seqs": 8,
        "async_scheduling": True,
    }
    assert base == {"max_num_seqs": 8}  # the shared arguments are not changed


def test_the_watchdog_is_armed_in_the_engine_process_while_it_starts():
    """An engine that stalls before any RPC reaches it still prints its stacks: the worker imports
    benchmarks.cost_ext at start-up, which arms the dump from $MASSV_COST_WATCHDOG_S."""
    import os

    code = "import time\nimport benchmarks.cost_ext\ndef stalled_at_start():\n    time.sleep(1.0)\nstalled_at_start()\n"
    for seconds, expect in (("0.3", True), ("", False)):
        env = {**os.environ, "MASSV_COST_WATCHDOG_S": seconds}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0 and ("stalled_at_start" in r.stderr) is expect, r.stderr


def test_parallel_jobs_combine_their_settings():
    """Each parallel mode asks for parallel drafting; -vllmpass leaves its one draft pass to vLLM
    (the first-pass switch off), -async adds async scheduling; their ceiling counts one drafter
    forward."""
    from benchmarks.cost import DRAFT_FORWARDS, JOB_SPEC, job_engine_kw, job_env

    spec = {"method": "massv", "model": "d", "num_speculative_tokens": 5}
    mode = "massv-parallel-vllmpass-async"
    assert JOB_SPEC[mode] == {"parallel_drafting": True} and DRAFT_FORWARDS[mode](5) == 1
    assert job_env("qwen2_5_vl", mode, spec) == {"MASSV_FAST_DRAFT_FIRST_PASS": "0"}
    assert job_engine_kw("qwen2_5_vl", {}, mode, spec) == {"async_scheduling": True}
    assert job_env("qwen2_5_vl", "massv-parallel-vllmpass", spec) == {"MASSV_FAST_DRAFT_FIRST_PASS": "0"}
    assert job_engine_kw("qwen2_5_vl", {}, "massv-parallel-vllmpass", spec) == {}
    assert job_env("qwen2_5_vl", "massv-parallel", spec) is None and "massv" not in JOB_SPEC


def test_sequential_switch_jobs_combine_their_settings():
    """-stepgraphs turns the full-graph first pass off, -onegraph turns the one-graph draft steps
    on; -async adds async scheduling; all of them draft sequentially (γ forwards a step)."""
    from benchmarks.cost import DRAFT_FORWARDS, JOB_SPEC, job_engine_kw, job_env

    spec = {"method": "massv", "model": "d", "num_speculative_tokens": 5}
    one, off = {"MASSV_FAST_DRAFT_ONE_GRAPH": "1"}, {"MASSV_FAST_DRAFT_FIRST_PASS": "0"}
    assert job_env("qwen2_5_vl", "massv-onegraph", spec) == one
    assert job_engine_kw("qwen2_5_vl", {}, "massv-onegraph", spec) == {}
    assert job_env("qwen2_5_vl", "massv-onegraph-async", spec) == one
    assert job_env("qwen2_5_vl", "massv-stepgraphs", spec) == off
    assert job_env("qwen2_5_vl", "massv-stepgraphs-async", spec) == off
    assert job_engine_kw("qwen2_5_vl", {}, "massv-stepgraphs-async", spec) == {"async_scheduling": True}
    assert job_env("qwen2_5_vl", "massv", spec) is None
    modes = {"massv-onegraph", "massv-onegraph-async", "massv-stepgraphs", "massv-stepgraphs-async"}
    assert not modes & (set(JOB_SPEC) | set(DRAFT_FORWARDS))


def _fake_engines(calls):
    """``run_job`` without engines: the target decodes in 10 / 12 ms (B=1 / 2), a small LM of n
    layers in n ms, a speculative engine at MAL 3 in 4 ms (2 layers) or 5 ms (3 layers)."""

    def run_job(model, spec, prompts, batch_sizes, *a, **k):
        calls.append((model.parent.name, model.name, spec and spec["method"]))
        layers = json.loads((model.parent / "small-lm" / "config.json").read_text())["num_hidden_layers"]
        if model.name == "target" and spec is None:
            tpot = {1: 10.0, 2: 12.0}
        elif spec is None:
            tpot = {b: float(layers) for b in batch_sizes}
        else:
            tpot = {b: 2.0 + layers for b in batch_sizes}
        mal = None if spec is None else 3.0
        return {
            "startup_s": 1.0,
            "zeroed": {"target": ["x"]},
            "rows": [_row(b, tpot[b], mal) for b in batch_sizes],
        }

    return run_job


@pytest.fixture
def two_tiny_presets(monkeypatch):
    """tiny-qwen and a test-only preset of the same target with a 3-layer small LM."""
    from dataclasses import replace

    from benchmarks import cost

    base = cost.PRESETS["tiny-qwen"]
    monkeypatch.setitem(
        cost.PRESETS, "tiny-qwen/3l", replace(base, small={**base.small, "num_hidden_layers": 3})
    )
    return ["tiny-qwen", "tiny-qwen/3l"]


def _argv(presets, out):
    return ["--preset", *presets, "--jobs", "target", "drafter", "stock", "massv", "--gammas", "2",
            "--batch-sizes", "1", "2", "--steps", "4", "--repeats", "1", "--prompt-len", "8",
            "--image-size", "112x112", "--compile-backend", "eager", "--out", str(out)]  # fmt: skip


def test_one_run_over_two_drafters_starts_the_target_once(tmp_path, monkeypatch, capsys, two_tiny_presets):
    from benchmarks import cost

    calls = []
    monkeypatch.setattr(cost, "run_job", _fake_engines(calls))
    doc = cost.main(_argv(two_tiny_presets, tmp_path))
    targets = [c for c in calls if c[1:] == ("target", None)]
    assert targets == [("tiny-qwen", "target", None)]  # the second preset's target never started
    assert sorted(c[0] for c in calls if c[1] == "small-lm") == ["tiny-qwen", "tiny-qwen__3l"]
    assert len(calls) == 1 + 2 * 3  # target; drafter, stock, massv per preset
    first, second = (doc["runs"][p] for p in two_tiny_presets)
    assert first["step_ms"]["target"] == second["step_ms"]["target"] == {"1": 10.0, "2": 12.0}
    assert second["cost_ratio"] == pytest.approx({"1": 0.3, "2": 0.25})  # its own 3-layer LM
    e2e = {(r["mode"], r["batch_size"]): r for r in second["e2e"]}
    assert e2e[("massv", 1)]["speedup_vs_none"] == pytest.approx(10.0 / 5.0)  # the shared target's step
    shared = json.loads((tmp_path / "tiny-qwen__3l" / "jobs" / "target.json").read_text())
    assert shared["shared_from"] == str(tmp_path / "tiny-qwen" / "jobs" / "target.json")
    assert check_schema(doc, cost.PRESETS_SCHEMA) == []
    assert json.loads((tmp_path / "cost.json").read_text()) == doc
    assert json.loads((tmp_path / "tiny-qwen" / "cost.json").read_text()) == first
    report = capsys.readouterr().out
    side = report[report.index("one run, every drafter") :]
    row = next(line for line in side.splitlines() if line.startswith("3l ") and " massv " in line)
    # MASSV 5 ms against stock's 5 ms, 2.00x over the target's 10 ms; ceiling 3·10/(10+2·3) = 1.875
    assert row.split()[4:8] == ["5.000", "1.000", "2.00", "1.07"]
    # the same command again: every engine of both presets is reused
    monkeypatch.setattr(cost, "run_job", lambda *a, **k: pytest.fail("finished job rerun"))
    again = cost.main(_argv(two_tiny_presets, tmp_path))
    assert [r["e2e"] for r in again["runs"].values()] == [r["e2e"] for r in doc["runs"].values()]


def test_a_target_run_on_other_prompts_is_not_shared(tmp_path, monkeypatch, two_tiny_presets):
    from benchmarks import cost

    calls = []
    monkeypatch.setattr(cost, "run_job", _fake_engines(calls))
    real = cost._prompts
    # each preset's folder gets prompts of its own (as two differently trained tokenizers would)
    monkeypatch.setattr(cost, "_prompts", lambda target, *a, **k: real(target, *a, seed=len(str(target))))
    cost.main(_argv(two_tiny_presets, tmp_path))
    assert [c[0] for c in calls if c[1:] == ("target", None)] == ["tiny-qwen", "tiny-qwen__3l"]
    assert "shared_from" not in json.loads((tmp_path / "tiny-qwen__3l" / "jobs" / "target.json").read_text())


def test_presets_of_different_targets_are_refused_before_any_engine(tmp_path, monkeypatch):
    from benchmarks import cost

    monkeypatch.setattr(cost, "run_job", lambda *a, **k: pytest.fail("an engine started"))
    with pytest.raises(ValueError, match="different targets"):
        cost.run_cost_presets(tmp_path, ["tiny-qwen", "qwen2.5-vl-7b/qwen2.5-1.5b"], jobs=["target"])
    with pytest.raises(ValueError, match="two or more different presets"):
        cost.run_cost_presets(tmp_path, ["tiny-qwen", "tiny-qwen"], jobs=["target"])
    assert not list(tmp_path.iterdir())


def test_a_run_resumed_on_another_machine_is_flagged(tmp_path, monkeypatch, capsys, two_tiny_presets):
    """Each engine records the machine it was timed on; a table mixing machines says so."""
    from benchmarks import cost

    monkeypatch.setattr(cost, "run_job", _fake_engines([]))
    monkeypatch.setattr(cost, "machine_id", lambda: "aaaaaaaa-1")
    doc = cost.main(_argv(two_tiny_presets, tmp_path))
    assert [d["machines"] for d in doc["runs"].values()] == [["aaaaaaaa-1"], ["aaaaaaaa-1"]]
    assert "WARNING" not in capsys.readouterr().out
    # the machine is lost after part of the run; the rest runs on a fresh one, reusing the rest
    (tmp_path / "tiny-qwen__3l" / "jobs" / "massv-g2.json").unlink()
    monkeypatch.setattr(cost, "machine_id", lambda: "bbbbbbbb-2")
    doc = cost.main(_argv(two_tiny_presets, tmp_path))
    first, second = (doc["runs"][p] for p in two_tiny_presets)
    assert first["machines"] == ["aaaaaaaa-1"] and second["machines"] == ["aaaaaaaa-1", "bbbbbbbb-2"]
    assert second["engines"]["massv-g2"]["machine"] == "bbbbbbbb-2"
    assert second["engines"]["stock-g2"]["machine"] == "aaaaaaaa-1"
    assert check_schema(doc, cost.PRESETS_SCHEMA) == []
    report = capsys.readouterr().out
    assert "engine time: 4 engines" in report  # every engine of a preset, reused or run now
    # once in the second preset's report, once for the side-by-side table of both
    assert report.count("WARNING: these engines ran on 2 machines (boot ids aaaaaaaa, bbbbbbbb)") == 2


@pytest.mark.parametrize("loop_us, slow", [(560.0, False), (1000.0, True)])
def test_the_report_names_a_slow_host(tmp_path, monkeypatch, capsys, two_tiny_presets, loop_us, slow):
    """A host whose engines run the fixed Python loop slowly times stock draft_model 1.3-2x slow
    (2026-12-01): the report says so, so such a table is not taken for the host-bound engines'."""
    from benchmarks import cost

    fake = _fake_engines([])

    def with_host(*a, **k):
        res = fake(*a, **k)
        cpu = {
            "python_us": loop_us,
            "frontend_python_us": loop_us,
            "steal": 0.0,
            "busy": 0.1,
            "throttled_ms": 0.0,
        }
        for row in res["rows"]:
            row["cpu_repeats"] = [cpu]
        return res

    monkeypatch.setattr(cost, "run_job", with_host)
    cost.main(_argv(two_tiny_presets, tmp_path))
    report = capsys.readouterr().out
    assert report.count(f"host: the engines' Python loop took {loop_us:.0f} µs") == 2  # per preset
    assert ("WARNING: a slow host (> 650 µs)" in report) is slow


def test_massv_async_is_reported_over_stock_with_async_scheduling_too(tmp_path, monkeypatch, capsys):
    """``stock-async`` is stock ``draft_model`` with vLLM's async scheduling: the reference of
    ``massv-async`` at the same settings, as ``stock`` is ``massv``'s."""
    from benchmarks import cost

    kws = {}
    fake = _fake_engines([])

    def with_async(model, spec, prompts, batch_sizes, steps, repeats, engine_kw, **k):
        res = fake(model, spec, prompts, batch_sizes, steps, repeats, engine_kw, **k)
        if spec is not None:  # a spec engine takes 4 ms a token here; with async: stock 2, MASSV 3
            kws[spec["method"], bool(engine_kw.get("async_scheduling"))] = engine_kw
            scale = {("draft_model", True): 0.5, ("massv", True): 0.75}.get(
                (spec["method"], bool(engine_kw.get("async_scheduling"))), 1.0
            )
            res["rows"] = [_row(r["batch_size"], r["tpot_ms"] * scale, r["mal"]) for r in res["rows"]]
        return res

    monkeypatch.setattr(cost, "run_job", with_async)
    argv = _argv(["tiny-qwen"], tmp_path)
    i = argv.index("--jobs")
    argv[i + 1 : i + 5] = ["target", "drafter", "stock", "stock-async", "massv", "massv-async"]
    doc = cost.main(argv)
    assert sorted(kws) == [("draft_model", False), ("draft_model", True), ("massv", False), ("massv", True)]
    over = {(r["mode"], r["batch_size"]): r["massv_over_stock_tpot"] for r in doc["massv_overhead"]}
    assert over == pytest.approx(
        {("massv", 1): 1.0, ("massv", 2): 1.0, ("massv-async", 1): 1.5, ("massv-async", 2): 1.5}
    )
    assert check_schema(doc, SCHEMA) == []
    table = capsys.readouterr().out.split(
        "MASSV TPOT over the plain draft model's, each at the same scheduling"
    )[1]
    assert re.search(r"massv-async\s+γ=2\s+1\s+stock-async\s+1\.500", table)
    assert re.search(r"massv\s+γ=2\s+1\s+stock\s+1\.000", table)


def test_each_engine_records_its_wall_time(tmp_path, monkeypatch, capsys, two_tiny_presets):
    from benchmarks import cost

    fake = _fake_engines([])

    def slow(*a, **k):  # an engine whose start, measurement and shutdown take 0.2 s
        time.sleep(0.2)
        return fake(*a, **k)

    monkeypatch.setattr(cost, "run_job", slow)
    doc = cost.main(_argv(two_tiny_presets, tmp_path))
    walls = {n: e["wall_s"] for n, e in doc["runs"]["tiny-qwen"]["engines"].items()}
    assert sorted(walls) == ["drafter", "massv-g2", "stock-g2", "target"]
    assert all(0.2 <= w < 5 for w in walls.values())
    # the second preset shares the first one's target engine: no wall time of its own
    assert doc["runs"]["tiny-qwen/3l"]["engines"]["target"]["wall_s"] is None
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("engine time: 4 engines"))
    assert float(line.split(", ")[1].split()[0]) >= 0.8  # "0.8 s in all" or more


def test_machine_id_is_the_boot_id(tmp_path):
    from benchmarks.report import machine_id

    (tmp_path / "boot_id").write_text("6b013186-cf55\n")
    assert machine_id(str(tmp_path / "boot_id")) == "6b013186-cf55"
    assert machine_id(str(tmp_path / "absent")) is None


def _vanilla_engines(envs, patched_vanilla=False):
    """``_fake_engines`` that records each engine's environment and reports the patches its
    process applied: none under ``VLLM_PLUGINS=""`` (unless ``patched_vanilla``). A plugin-free
    speculative engine decodes in 0.8x the time of the one with the plugin."""
    fake = _fake_engines([])

    def run_job(model, spec, prompts, batch_sizes, steps, repeats, engine_kw, env=None, **k):
        res = fake(model, spec, prompts, batch_sizes, steps, repeats, engine_kw, **k)
        envs.append(env or {})
        vanilla = (env or {}).get("VLLM_PLUGINS") == ""
        res["patches"] = ["DraftModelProposer.propose"] if patched_vanilla or not vanilla else []
        if vanilla and spec is not None:
            res["rows"] = [_row(r["batch_size"], r["tpot_ms"] * 0.8, r["mal"]) for r in res["rows"]]
        return res

    return run_job


def _vanilla_argv(out):
    argv = _argv(["tiny-qwen"], out)
    i = argv.index("--jobs")
    argv[i + 1 : i + 5] = ["target", "stock", "stock-vanilla"]
    return argv


def test_stock_vanilla_runs_without_the_plugin_and_every_engine_of_its_run_is_spawned(
    tmp_path, monkeypatch, capsys
):
    from benchmarks import cost

    envs = []
    monkeypatch.setattr(cost, "run_job", _vanilla_engines(envs))
    doc = cost.main(_vanilla_argv(tmp_path))
    # target, stock, stock-vanilla: all spawned, so stock and stock-vanilla differ only in the plugin
    assert [e.get("VLLM_WORKER_MULTIPROC_METHOD") for e in envs] == ["spawn"] * 3
    assert [e.get("VLLM_PLUGINS") for e in envs] == [None, None, ""]
    assert doc["engines"]["stock-vanilla-g2"]["patches"] == []
    assert doc["engines"]["stock-g2"]["patches"] == ["DraftModelProposer.propose"]
    effect = {(r["gamma"], r["batch_size"]): r["stock_over_vanilla_tpot"] for r in doc["plugin_effect"]}
    assert effect == pytest.approx({(2, 1): 1.25, (2, 2): 1.25})
    assert check_schema(doc, SCHEMA) == []
    table = capsys.readouterr().out.split("with massv-vllm's plugin in its engine over without it")[1]
    assert re.search(r"γ=2\s+1\s+1\.250", table)
    # a forked run's results are not reused by a run that spawns its engines
    assert doc["meta"]["settings"]["start_method"] == "spawn"


def test_a_stock_vanilla_engine_that_reports_patches_fails_the_run(tmp_path, monkeypatch):
    from benchmarks import cost

    monkeypatch.setattr(cost, "run_job", _vanilla_engines([], patched_vanilla=True))
    with pytest.raises(RuntimeError, match=r"stock-vanilla-g2: .*patches applied.*DraftModelProposer"):
        cost.main(_vanilla_argv(tmp_path))
    assert not (tmp_path / "jobs" / "stock-vanilla-g2.json").exists()  # never reused as plugin-free


def test_stock_vanilla_is_refused_for_gemma3_before_any_engine(tmp_path, monkeypatch):
    from benchmarks import cost

    monkeypatch.setattr(cost, "run_job", lambda *a, **k: pytest.fail("an engine started"))
    with pytest.raises(ValueError, match="stock-vanilla: .*Gemma3"):
        cost.run_cost(tmp_path, preset="gemma3-12b/gemma3-1b", jobs=["stock", "stock-vanilla"])
    assert not (tmp_path / "models").exists()


# ---- engines timed in turns (--interleave) ----------------------------------------------------------


def test_interleaved_engines_are_timed_in_turns_and_their_mal_comes_from_the_step_logs(monkeypatch):
    """Rounds alternate A B, B A, ...; each engine warms up at each batch size first; the MAL is
    the decoded tokens over the request-steps that decoded them."""
    from benchmarks import cost

    calls = []

    def timed(llm, batch, n):
        calls.append(("warm-up", llm, len(batch), n))
        return 0.0, []

    def repeat(llm, batch, n, tps, label=""):
        calls.append((llm, len(batch)))
        # A decodes 2 tokens per request-step, B and C 3: their drafts are all accepted, A's half of
        # them; C schedules asynchronously: each request gets one step more, which decodes nothing
        per_step, ahead = {"A": (2, 0), "B": (3, 0), "C": (3, 1)}[llm]
        return {"t1": 0.01, "tn": 0.1, "engine": None, "steady": 1.0, "count": 2, "cpu": {},
                "decoding": len(batch) * (n // per_step + ahead), "zero": True}  # fmt: skip

    monkeypatch.setattr(cost, "_timed", timed)
    monkeypatch.setattr(cost, "_repeat", repeat)
    engines = {"A": ("A", 3, False), "B": ("B", 3, False)}
    rows = cost.measure_interleaved(engines, ["p", "q"], [1, 2], steps=4, repeats=3)
    # 4 tokens round up to 6 (whole steps of 3), plus the prefill's token
    assert calls[:2] == [("warm-up", "A", 1, 7), ("warm-up", "B", 1, 7)]
    assert calls[2:8] == [("A", 1), ("B", 1), ("B", 1), ("A", 1), ("A", 1), ("B", 1)]
    assert calls[8:10] == [("warm-up", "A", 2, 7), ("warm-up", "B", 2, 7)]
    assert [r["mal"] for r in rows["A"]] == pytest.approx([2.0, 2.0])
    assert [r["mal"] for r in rows["B"]] == pytest.approx([3.0, 3.0])
    assert rows["A"][1]["interleaved"] == ["A", "B"] and rows["A"][1]["batch_size"] == 2
    rows = cost.measure_interleaved({"C": ("C", 3, True), "B": ("B", 3, False)}, ["p", "q"], [2], 4, 3)
    assert [r["mal"] for r in rows["C"]] == pytest.approx([3.0])  # not 6 / 3 = 2.0


def test_paired_ratio_follows_the_repeats_timed_side_by_side():
    from benchmarks.cost import paired_ratio

    pair = ["stock-g5", "stock-vanilla-g5"]
    # the host slowed both engines 2x in rounds 2 (both) and 3 (the second one only, a moment later)
    a = {"tpot_ms_repeats": [10.0, 20.0, 10.0], "interleaved": pair}
    b = {"tpot_ms_repeats": [8.0, 16.0, 16.0], "interleaved": pair}
    assert paired_ratio(a, b) == pytest.approx(1.25)  # medians alone: 10 / 16 = 0.625
    assert paired_ratio({**a, "interleaved": None}, {**b, "interleaved": None}) is None  # timed apart
    assert paired_ratio(a, {**b, "tpot_ms_repeats": [8.0, 16.0]}) is None
    assert paired_ratio({"tpot_ms_repeats": [1.0]}, {"tpot_ms_repeats": [1.0]}) is None


def _interleaved_engines(calls):
    """``run_jobs_interleaved`` without engines: the stock engine decodes in 10 / 20 / 10 ms per
    round, the plugin-free one in 8 / 16 / 16 (a host that slowed down in rounds 2 and 3)."""

    def run(jobs, prompts, batch_sizes, steps, repeats):
        calls.append({name: (spec and spec["method"], kw, env) for name, (_, spec, kw, env) in jobs.items()})
        times = {"stock-g2": [10.0, 20.0, 10.0], "stock-vanilla-g2": [8.0, 16.0, 16.0]}
        out = {}
        for name, (*_, env) in jobs.items():
            rows = [
                {**_row(b, statistics.median(times[name]), 3.0), "tpot_ms_repeats": times[name], "interleaved": list(jobs)}
                for b in batch_sizes
            ]  # fmt: skip
            patches = [] if (env or {}).get("VLLM_PLUGINS") == "" else ["DraftModelProposer.propose"]
            out[name] = {
                "startup_s": 1.0,
                "zeroed": {"target": ["x"]},
                "patches": patches,
                "rows": rows,
                "profile": {},
            }
        return out

    return run


def _interleave_argv(out):
    argv = _vanilla_argv(out)
    i = argv.index("--jobs")
    argv[i + 1 : i + 4] = ["stock", "stock-vanilla"]
    return [*argv, "--interleave", "--repeats", "3"]


def test_interleaved_stock_and_stock_vanilla_give_the_paired_ratio(tmp_path, monkeypatch, capsys):
    from benchmarks import cost

    calls = []
    monkeypatch.setattr(cost, "run_job", lambda *a, **k: pytest.fail("an engine ran alone"))
    monkeypatch.setattr(cost, "run_jobs_interleaved", _interleaved_engines(calls))
    doc = cost.main(_interleave_argv(tmp_path))
    (jobs,) = calls
    assert list(jobs) == ["stock-g2", "stock-vanilla-g2"]
    assert jobs["stock-vanilla-g2"][2] == {"VLLM_PLUGINS": "", "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    assert "gpu_memory_utilization" not in jobs["stock-g2"][1]  # on the CPU backend a share of RAM
    effect = {r["batch_size"]: r for r in doc["plugin_effect"]}
    assert effect[1]["stock_over_vanilla_tpot"] == pytest.approx(10.0 / 16.0)
    assert effect[1]["paired_stock_over_vanilla"] == pytest.approx(1.25)
    assert check_schema(doc, SCHEMA) == [] and doc["meta"]["settings"]["interleave"] is True
    assert re.search(r"γ=2\s+1\s+0\.625\s+1\.250", capsys.readouterr().out)
    # finished: reused; one engine's results gone: both run again, or the repeats are not pairs
    cost.main(_interleave_argv(tmp_path))
    assert len(calls) == 1
    (tmp_path / "jobs" / "stock-g2.json").unlink()
    cost.main(_interleave_argv(tmp_path))
    assert len(calls) == 2 and list(calls[1]) == ["stock-g2", "stock-vanilla-g2"]


def test_interleaved_engines_share_the_gpus_memory(tmp_path, monkeypatch):
    from benchmarks import cost
    from massv_vllm import engine

    calls = []
    monkeypatch.setattr(engine, "on_gpu", lambda: True)
    monkeypatch.setattr(cost, "run_jobs_interleaved", _interleaved_engines(calls))
    cost.main(_interleave_argv(tmp_path))
    assert [kw["gpu_memory_utilization"] for _, kw, _ in calls[0].values()] == [0.45, 0.45]


@pytest.mark.parametrize(
    "change, match",
    [
        (["--jobs", "stock", "--gammas", "2"], "two or more engines"),
        (["--jobs", "drafter", "stock"], "drafter alone"),
        (["--profile", "4"], "--profile"),
        (["--only", "stock-g2"], "not with --interleave"),
    ],
)
def test_interleave_refuses_what_it_cannot_time_in_turns(tmp_path, monkeypatch, change, match):
    from benchmarks import cost

    monkeypatch.setattr(cost, "run_jobs_interleaved", lambda *a, **k: pytest.fail("an engine started"))
    with pytest.raises(ValueError, match=match):
        cost.main([*_interleave_argv(tmp_path), *change])


def test_only_names_engines_of_the_run(tmp_path, monkeypatch):
    from benchmarks import cost

    monkeypatch.setattr(cost, "run_job", lambda *a, **k: pytest.fail("an engine started"))
    engines = r"\['target', 'stock-g2', 'stock-vanilla-g2'\]"
    with pytest.raises(ValueError, match=rf"--only \['stock-g5'\]: this run's engines are {engines}"):
        cost.main([*_vanilla_argv(tmp_path), "--only", "stock-g5", "target"])


def test_interleave_takes_one_preset(tmp_path, two_tiny_presets):
    from benchmarks import cost

    with pytest.raises(SystemExit):
        cost.main([*_argv(two_tiny_presets, tmp_path), "--interleave"])


def test_massv_over_stock_is_also_paired_when_timed_in_turns():
    pair = ["stock-g5", "massv-g5"]
    results = {
        "stock-g5": _job(
            [{**_row(1, 10.0, 6.0), "tpot_ms_repeats": [10.0, 20.0, 10.0], "interleaved": pair}]
        ),
        "massv-g5": _job([{**_row(1, 10.0, 6.0), "tpot_ms_repeats": [5.0, 10.0, 10.0], "interleaved": pair}]),
    }
    (over,) = summarise(results, [1], [5], [3.2])["massv_overhead"]
    assert over["massv_over_stock_tpot"] == pytest.approx(1.0)
    assert over["paired_massv_over_stock"] == pytest.approx(0.5)


def test_until_tpot_times_a_batch_size_again_in_its_engine_until_it_meets_the_limit(monkeypatch):
    """B=1 runs at 9, then 8, then 7 ms a timing: the third meets 7.5 ms and is kept, the two before
    it are on record. B=2 stays at 6 ms over its 5 ms limit: timed again while another timing (3 s
    of repeats on the fake clock) fits in 10 s, then the last one is kept."""
    from types import SimpleNamespace

    from benchmarks import cost

    clock = [0.0]
    tpots = {1: iter([9.0] * 3 + [8.0] * 3 + [7.0] * 3 + [1.0] * 3), 2: iter([6.0] * 30)}
    calls = []

    def repeat(llm, batch, n, tps, label=""):
        clock[0] += 1.0  # each repeat takes 1 s
        calls.append(len(batch))
        steady = next(tpots[len(batch)])
        return {"t1": 0.01, "tn": 0.1, "engine": None, "steady": steady, "count": 2,
                "cpu": {"python_us": 600.0}, "decoding": None, "zero": True}  # fmt: skip

    monkeypatch.setattr(cost, "_timed", lambda *a: (0.0, []))
    monkeypatch.setattr(cost, "_repeat", repeat)
    monkeypatch.setattr(cost, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    llm = SimpleNamespace(get_metrics=lambda: [])
    rows = cost.measure(llm, ["p", "q"], [1, 2], 4, 3, 1, until_tpot={1: 7.5, 2: 5.0}, until_s=10.0)
    assert calls == [1] * 9 + [2] * 9
    assert rows[0]["tpot_ms"] == 7.0 and rows[0]["until_tpot_ms"] == 7.5
    assert [t["tpot_ms"] for t in rows[0]["earlier_timings"]] == [9.0, 8.0]
    assert rows[0]["earlier_timings"][0]["tpot_ms_repeats"] == [9.0] * 3
    # B=2 timings ran over 0-3, 3-6 and 6-9 s: a fourth would end past 10 s
    assert rows[1]["tpot_ms"] == 6.0 and [t["tpot_ms"] for t in rows[1]["earlier_timings"]] == [6.0, 6.0]
    # without a limit, one timing and no record of timings again
    calls.clear()
    rows = cost.measure(llm, ["p"], [1], 4, 3, 1)
    assert calls == [1] * 3 and rows[0]["tpot_ms"] == 1.0 and "earlier_timings" not in rows[0]


def test_until_tpot_reaches_the_one_engine_named_and_the_report_lists_every_timing(
    tmp_path, monkeypatch, capsys
):
    """The limits reach run_job for the engine --only names; the report's table of timings again
    shows the earlier TPOTs and whether the last met the limit; the run's key is the same as
    without the limits, so the whole run later reuses that engine."""
    from benchmarks import cost

    got = {}
    fake = _fake_engines([])

    def run_job(model, spec, prompts, batch_sizes, *a, until_tpot=None, until_s=0.0, **k):
        got.update(until_tpot=until_tpot, until_s=until_s)
        res = fake(model, spec, prompts, batch_sizes, *a, **k)
        for r in res["rows"]:  # B=1 met 4.5 ms on its third timing; B=2 never met 4.0
            r.update(until_tpot_ms=until_tpot[r["batch_size"]], earlier_timings=[
                {"tpot_ms": t, "tpot_ms_repeats": [t], "cpu_repeats": []} for t in (9.0, 8.0)
            ])  # fmt: skip
        return res

    monkeypatch.setattr(cost, "run_job", run_job)
    argv = [*_argv(["tiny-qwen"], tmp_path), "--only", "stock-g2"]
    doc = cost.main([*argv, "--until-tpot", "1=4.5", "2=4.0", "--until-seconds", "30"])
    assert got == {"until_tpot": {1: 4.5, 2: 4.0}, "until_s": 30.0}
    assert check_schema(doc, SCHEMA) == []
    report = capsys.readouterr().out
    assert "timed again in one engine while over the limit" in report
    lines = [ln.split() for ln in report.splitlines() if ln.startswith("stock γ=2 ") and "8.00" in ln]
    # engine, γ, B, limit, timings, earlier, TPOT, met: the fake stock engine runs at 4 ms
    assert lines == [["stock", "γ=2", "1", "4.50", "3", "9.00,", "8.00", "4.000", "yes"],
                     ["stock", "γ=2", "2", "4.00", "3", "9.00,", "8.00", "4.000", "yes"]]  # fmt: skip
    monkeypatch.setattr(cost, "run_job", lambda *a, **k: pytest.fail("the engine timed again was rerun"))
    cost.main([*argv, "--until-tpot", "1=4.5"])  # limits are not part of the run's key


@pytest.mark.parametrize(
    "change, match",
    [
        (["--until-tpot", "1=4.5"], r"name it alone with --only \(got None\)"),
        (["--only", "target", "stock-g2", "--until-tpot", "1=4.5"], "name it alone with --only"),
        (["--only", "stock-g2", "--until-tpot", "8=4.5"], r"at batch sizes of the run \(\[1, 2\]\)"),
    ],
)
def test_until_tpot_is_refused_unless_it_names_one_engine_at_the_runs_batch_sizes(
    tmp_path, monkeypatch, change, match
):
    from benchmarks import cost

    monkeypatch.setattr(cost, "run_job", lambda *a, **k: pytest.fail("an engine started"))
    with pytest.raises(ValueError, match=match):
        cost.main([*_argv(["tiny-qwen"], tmp_path), *change])


@pytest.mark.parametrize("bad", ["1:7.5", "0=7.5", "1=-2", "one=7.5", "1="])
def test_until_tpot_takes_batch_size_equals_ms(tmp_path, monkeypatch, capsys, bad):
    from benchmarks import cost

    monkeypatch.setattr(cost, "run_job", lambda *a, **k: pytest.fail("an engine started"))
    with pytest.raises(SystemExit):
        cost.main([*_argv(["tiny-qwen"], tmp_path), "--only", "stock-g2", "--until-tpot", bad])
    assert f"'{bad}': expected B=MS" in capsys.readouterr().err


def test_until_seconds_alone_is_refused(tmp_path, monkeypatch, capsys):
    from benchmarks import cost

    monkeypatch.setattr(cost, "run_job", lambda *a, **k: pytest.fail("an engine started"))
    with pytest.raises(SystemExit):
        cost.main([*_argv(["tiny-qwen"], tmp_path), "--only", "stock-g2", "--until-seconds", "30"])
    assert "--until-seconds: only with --until-tpot" in capsys.readouterr().err
