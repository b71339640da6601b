"""Report writers (JSON, schema check, tables, PNG plots) and eval-set loading of the benchmarks."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks.acceptance import parse_modes
from benchmarks.evalset import UNLABELLED, load_eval_set
from benchmarks.report import (
    META_SCHEMA,
    NUM,
    ListOf,
    MapOf,
    Opt,
    bar_panels,
    check_schema,
    format_table,
    gpu_names,
    histograms,
    line_panels,
    run_metadata,
    write_json,
)
from massv_vllm.engine import parse_engine_args
from massv_vllm.testing.tiny import synthetic_image
from massv_vllm.training.data.records import DataError, ReadStats

REPO = Path(__file__).resolve().parent.parent


def _assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()  # raises on a truncated or corrupt file
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_schema_checker_reports_every_problem():
    schema = {"a": int, "b": Opt(str), "c": ListOf({"x": NUM}), "d": MapOf(bool)}
    assert check_schema({"a": 1, "b": None, "c": [{"x": 1.5}, {"x": 2}], "d": {"k": True}}, schema) == []
    problems = check_schema({"a": True, "b": 3, "c": [{"y": 1}], "d": {"k": 1}}, schema)
    assert problems == [
        "$.a: expected int, got bool",  # bools are not ints in a schema
        "$.b: expected str, got int",
        "$.c[0]: missing key 'x'",
        "$.d.k: expected bool, got int",
    ]
    assert check_schema([], schema) == ["$: expected an object, got list"]


def test_write_json_is_atomic_and_strict(tmp_path):
    p = write_json(tmp_path / "sub" / "r.json", {"x": float("nan"), "p": tmp_path, "t": (1, 2)})
    assert json.loads(p.read_text()) == {"x": None, "p": str(tmp_path), "t": [1, 2]}
    assert not list(tmp_path.glob("sub/*.tmp"))


def test_run_metadata_matches_its_schema():
    meta = run_metadata({"gamma": 5, "path": tmp_path_like()}, argv=["-m", "benchmarks.x", "--a", "b c"])
    assert check_schema(meta, META_SCHEMA) == []
    assert meta["command"].endswith("-m benchmarks.x --a 'b c'")
    assert meta["settings"] == {"gamma": 5, "path": "/x/y"}
    # The host and versions, found out independently here (on CPU: no GPU may be invented).
    want_gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    assert meta["host"]["gpu"] == (want_gpus if torch.cuda.is_available() else [])
    assert meta["host"]["cpu_count"] == os.cpu_count() and meta["host"]["python"] == platform.python_version()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        assert meta["host"]["cpu"] == (names[0] if names else platform.processor() or platform.machine())
    assert meta["versions"]["torch"] == metadata.version("torch")
    assert all(v == metadata.version(name) for name, v in meta["versions"].items())
    when = _dt.datetime.fromisoformat(meta["date"])
    assert abs((_dt.datetime.now(_dt.timezone.utc) - when).total_seconds()) < 600
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # a checkout: the commit, "+dirty" when tracked files changed
        assert meta["git_commit"] in (head.stdout.strip(), head.stdout.strip() + "+dirty")


def _fake_nvidia_smi(tmp_path, monkeypatch, body: str) -> Path:
    """An ``nvidia-smi`` first on PATH that logs its arguments to ``args.txt`` and runs ``body``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/args.txt"\n{body}\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return tmp_path / "args.txt"


def test_gpu_names_come_from_nvml_without_initializing_cuda(tmp_path, monkeypatch):
    # torch.cuda.get_device_name would initialize CUDA here, and vLLM would then spawn every later
    # engine of the benchmark (~20 s each) instead of forking it.
    def no_cuda(*_a):
        raise AssertionError("gpu_names touched torch.cuda")

    for name in ("is_available", "device_count", "get_device_name", "init"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    args = _fake_nvidia_smi(tmp_path, monkeypatch, "printf 'NVIDIA H200\\nNVIDIA H200\\n'")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_names() == ["NVIDIA H200", "NVIDIA H200"]
    assert run_metadata({}, argv=[])["host"]["gpu"] == ["NVIDIA H200", "NVIDIA H200"]
    assert args.read_text().splitlines()[0] == "--query-gpu=name --format=csv,noheader"

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # a lane sees one GPU: ask for that one only
    gpu_names()
    assert args.read_text().splitlines()[-1].endswith("-i 1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_names() == []


def test_gpu_names_survive_a_broken_driver_or_none(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _fake_nvidia_smi(tmp_path, monkeypatch, "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    assert gpu_names() == []
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi at all (a CPU machine)
    assert gpu_names() == []


def test_on_gpu_asks_nvml_so_later_engine_forks_survive(monkeypatch):
    # torch's default check poisons fork: engines forked afterwards died with "Cannot
    # re-initialize CUDA in forked subprocess" (H200, 2026-12-01).
    from massv_vllm.engine import on_gpu

    seen = []
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK", raising=False)
    monkeypatch.setattr(
        torch.cuda,
        "is_available",
        lambda: seen.append(os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")) or True,
    )
    assert on_gpu() is True
    assert seen == ["1"]


def tmp_path_like():
    from pathlib import Path

    return Path("/x/y")


def test_format_table_aligns_columns():
    t = format_table(["mode", "MAL", "tok/s"], [["none", None, 10.0], ["massv", 2.456, 123.4]], "title")
    lines = t.splitlines()
    assert lines[0] == "title"
    assert lines[1].split() == ["mode", "MAL", "tok/s"]
    assert lines[3].split() == ["none", "-", "10.00"]
    assert lines[4].split() == ["massv", "2.46", "123.40"]
    assert len({len(x) for x in lines[1:]}) == 1  # fixed width


def test_plots_are_valid_pngs(tmp_path):
    _assert_png(
        bar_panels(
            tmp_path / "bars.png",
            {
                "T=0": (["vqa", "all"], {"text": [1.5, None], "massv": [2.0, 2.1]}),
                "T=1": (["vqa", "all"], {}),
            },
            "MAL",
            hline=1.0,
        )
    )
    _assert_png(
        line_panels(tmp_path / "lines.png", {"T=0": {"massv": ([1, 2, 3], [0.8, 0.5, 0.2])}}, "pos", "p")
    )
    _assert_png(
        histograms(tmp_path / "hist.png", {"a": [0.1, 0.2, 0.2], "b": [0.7, 0.9], "empty": []}, bins=10)
    )


def _write_eval(tmp_path, n_per_task=3):
    recs = []
    for i in range(2 * n_per_task):
        synthetic_image(i, (64, 48)).save(tmp_path / f"img{i}.png")
        task = "vqa" if i % 2 else "captioning"
        recs.append(
            {
                "id": f"r{i}",
                "image": f"img{i}.png",
                "task": task,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat is shown?"},
                    {"from": "gpt", "value": "Shapes."},
                ],
            }
        )
    recs.append({"id": "nt", "conversations": [{"from": "human", "value": "Hello"}]})  # text only, no task
    recs.append(
        {
            "id": "broken",
            "image": "missing.png",
            "task": "vqa",
            "conversations": [{"from": "human", "value": "x"}],
        }
    )
    recs.append({"id": "r0", "task": "vqa", "conversations": [{"from": "human", "value": "dup"}]})
    recs.append({"id": "bad", "conversations": "nope"})
    path = tmp_path / "eval.json"
    path.write_text(json.dumps(recs))
    return path


def test_eval_set_groups_by_task_limits_and_skips(tmp_path):
    path = _write_eval(tmp_path)
    stats = ReadStats()
    tasks = load_eval_set(path, stats=stats)
    assert list(tasks) == ["captioning", UNLABELLED, "vqa"]
    assert [it.record.id for it in tasks["captioning"]] == ["r0", "r2", "r4"]
    assert [it.record.id for it in tasks["vqa"]] == ["r1", "r3", "r5"]
    assert tasks[UNLABELLED][0].images == []
    assert tasks["vqa"][0].images[0].size == (64, 48)
    assert stats.skipped == {"unreadable image": 1, "duplicate id": 1, "malformed": 1}
    assert stats.kept == 7 and stats.seen == 10
    limited = load_eval_set(path, limit=2, tasks=["vqa"])
    assert list(limited) == ["vqa"] and [it.record.id for it in limited["vqa"]] == ["r1", "r3"]
    with pytest.raises(DataError, match="no usable eval records with tasks"):
        load_eval_set(path, tasks=["ocr"])


def test_mode_and_engine_arg_parsing(tiny_qwen, tmp_path):
    modes = parse_modes(["none", f"text={tiny_qwen.text_drafter}", f"massv={tiny_qwen.drafter}"])
    assert [(m.name, m.kind) for m in modes] == [("none", "none"), ("text", "text-only"), ("massv", "massv")]
    with pytest.raises(ValueError, match="NAME=DRAFTER_FOLDER"):
        parse_modes(["massv"])
    with pytest.raises(ValueError, match="unique"):
        parse_modes([f"a={tiny_qwen.drafter}", f"a={tiny_qwen.drafter}"])
    with pytest.raises(ValueError, match="(?s)mode 'lm'.*no 'massv' section"):
        parse_modes([f"lm={tiny_qwen.small_lm}"])
    assert parse_engine_args(["max_model_len=1024", "dtype=bfloat16", 'compilation_config={"a": [1]}']) == {
        "max_model_len": 1024,
        "dtype": "bfloat16",
        "compilation_config": {"a": [1]},
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_engine_args(["oops"])
    assert parse_engine_args(["max-num-seqs=8"]) == {"max_num_seqs": 8}  # flag spelling works too


def test_eval_set_from_a_datasets_folder(tmp_path):
    import datasets

    imgs = [synthetic_image(i, (40, 30)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {
            "image": imgs,
            "question": ["What?", "Which?", "How many?"],
            "answer": ["A.", "B.", "C."],
            "kind": ["vqa", "vqa", "counting"],
            "qid": ["a", "b", "c"],
        },
        features=datasets.Features(
            {k: datasets.Value("string") for k in ("question", "answer", "kind", "qid")}
            | {"image": datasets.Image()}
        ),
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    tasks = load_eval_set(
        tmp_path / "ds",
        prompt_column="question",
        response_column="answer",
        task_column="kind",
        id_column="qid",
    )
    assert {k: [it.record.id for it in v] for k, v in tasks.items()} == {"counting": ["c"], "vqa": ["a", "b"]}
    it = tasks["vqa"][1]
    assert (
        it.record.prompt == "<image>\nWhich?" and it.record.response == "B." and it.images[0].size == (40, 30)
    )
