"""Acceptance and speed of speculative decoding in vLLM: no speculation vs text-only vs MASSV drafters.

    python -m benchmarks.acceptance --target Qwen2.5-VL-7B-Instruct --eval eval.json \\
        --modes none text=drafters/text massv=drafters/massv --gamma 5 --batch-size 1 --out runs/acc

For every mode (``none``: no speculation; ``NAME=PATH``: a MASSV or text-only drafter folder, both
served with ``"method": "massv"``), one vLLM engine is started and reused for every temperature
(γ is fixed per engine). Each task of the eval set runs as its own series of ``LLM.chat`` calls
(``--batch-size`` requests submitted at a time), with vLLM's spec-decode counters snapshotted
around it, giving per task and overall:

* MAL = 1 + Δaccepted / Δdrafts and acceptance per draft position (``massv_vllm.metrics``),
* output tokens/s and per-request latency (mean, p50, p90),
* speed-up of each mode over ``none`` and of each MASSV drafter over each text-only one,
* at T=0, whether every mode produced the same token ids for every request (exactness).

Writes ``results.json`` (schema: ``SCHEMA`` below and benchmarks/README.md), ``mal.png``,
``acceptance_per_position.png``, ``speedup.png``, and per mode ``modes/<name>.json`` (raw
per-request data); a rerun with the same settings reuses finished modes instead of repeating them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import cli
from benchmarks.evalset import EvalItem, add_eval_args, load_eval_set
from benchmarks.report import (
    META_SCHEMA,
    NUM,
    ListOf,
    MapOf,
    Opt,
    bar_panels,
    check_schema,
    fmt,
    format_table,
    line_panels,
    run_metadata,
    write_json,
)
from massv_vllm.engine import parse_engine_args
from massv_vllm.metrics import SpecCounters, latency_summary, speedup, sum_counters
from massv_vllm.training.data.records import ReadStats

NONE = "none"
ALL = "all"  # the pseudo-task aggregating every task
RESULTS_VERSION = 1


# ---- modes ---------------------------------------------------------------------------------------


PARALLEL = "parallel:"  # NAME=parallel:FOLDER serves the drafter with "parallel_drafting": true


def drafter_folder(path: str) -> tuple[str, bool]:
    """(folder, parallel drafting?) of a ``FOLDER`` or ``parallel:FOLDER`` drafter argument."""
    return (path[len(PARALLEL) :], True) if path.startswith(PARALLEL) else (path, False)


@dataclass(frozen=True)
class Mode:
    name: str
    drafter: str | None  # None: no speculation
    kind: str  # "none" | "text-only" | "massv" | "massv-parallel"

    @property
    def spec_extra(self) -> dict[str, Any]:
        return {"parallel_drafting": True} if self.kind == "massv-parallel" else {}


def parse_modes(specs: list[str]) -> list[Mode]:
    """``["none", "text=PATH", "massv=PATH", "par=parallel:PATH", ...]`` -> modes; the drafter kind
    is read from the folder (``parallel:``: the drafter drafts all γ tokens in one forward)."""
    from massv_vllm.serving.config import MassvConfigError, load_massv_config

    modes: list[Mode] = []
    for spec in specs:
        if spec == NONE:
            modes.append(Mode(NONE, None, NONE))
            continue
        name, sep, path = spec.partition("=")
        path, parallel = drafter_folder(path)
        if not sep or not name or not path:
            raise ValueError(
                f"mode {spec!r}: expected 'none' or NAME=DRAFTER_FOLDER (e.g. massv=drafters/massv, "
                "text=drafters/text-only)"
            )
        if name == NONE:
            raise ValueError("mode name 'none' is reserved for no speculation")
        try:
            massv = load_massv_config(path)
        except MassvConfigError as e:
            raise ValueError(f"mode {name!r}: {e}") from e
        kind = "text-only" if massv.text_only else "massv-parallel" if parallel else "massv"
        modes.append(Mode(name, str(Path(path)), kind))
    names = [m.name for m in modes]
    dup = sorted(n for n, c in Counter(names).items() if c > 1)
    if dup:
        raise ValueError(f"mode names must be unique, repeated: {dup}")
    if not modes:
        raise ValueError("no modes given")
    return modes


# ---- running one mode ---------------------------------------------------------------------------


def _request_latency(out: Any, fallback: float) -> float:
    """Arrival to last token of one request, from vLLM's per-request stats (log stats on).

    ``first_token_latency`` is measured from the wall-clock arrival time; the decode span
    ``last_token_ts - first_token_ts`` uses the engine core's monotonic clock.
    """
    m = getattr(out, "metrics", None)
    if m is None or not getattr(m, "last_token_ts", 0.0):
        return fallback
    return float(m.first_token_latency + (m.last_token_ts - m.first_token_ts))


def _request_seed(seed: int, item: EvalItem) -> int:
    """A per-request sampling seed from the run seed and the record id (stable under --limit/--tasks)."""
    return int(hashlib.sha256(f"{seed}:{item.record.id}".encode()).hexdigest()[:8], 16)


def _sampling(temperature: float, max_tokens: int, seed: int, ignore_eos: bool):
    from vllm import SamplingParams

    # A per-request seed makes T>0 runs repeatable; at T=0 sampling is greedy anyway.
    return SamplingParams(
        temperature=temperature,
        max_tokens=max_tokens,
        seed=seed if temperature > 0 else None,
        ignore_eos=ignore_eos,
    )


def run_mode(
    target: str,
    mode: Mode,
    tasks: dict[str, list[EvalItem]],
    *,
    gamma: int,
    temperatures: list[float],
    batch_size: int,
    max_tokens: int,
    seed: int = 0,
    ignore_eos: bool = False,
    engine_kw: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Start one engine for ``mode`` and run every (temperature, task); raw results per request."""
    from tqdm import tqdm

    from massv_vllm.engine import make_llm, massv_spec, shutdown
    from massv_vllm.training.data.records import openai_messages

    spec = None if mode.drafter is None else massv_spec(mode.drafter, gamma, **mode.spec_extra)
    kw = {"max_num_seqs": max(batch_size, 1)} | dict(engine_kw or {})
    t0 = time.perf_counter()
    llm = make_llm(target, spec, **kw)
    startup_s = time.perf_counter() - t0
    try:
        messages = {
            it.record.id: openai_messages(it.record, it.images) for items in tasks.values() for it in items
        }
        # Warm-up (not measured): first batch shapes, first image processing, lazy allocations.
        first = next(iter(tasks.values()))[:batch_size]
        llm.chat(
            [messages[it.record.id] for it in first],
            _sampling(0.0, min(8, max_tokens), seed, ignore_eos),
            use_tqdm=False,
        )
        runs = []
        total = len(temperatures) * sum(len(v) for v in tasks.values())
        bar = tqdm(total=total, desc=f"mode {mode.name}", disable=not progress, unit="req")
        for temp in temperatures:
            for task, items in tasks.items():
                before = SpecCounters.from_llm(llm)
                requests, wall = [], 0.0
                for start in range(0, len(items), batch_size):
                    chunk = items[start : start + batch_size]
                    params = [
                        _sampling(temp, max_tokens, _request_seed(seed, it), ignore_eos) for it in chunk
                    ]
                    c0 = time.perf_counter()
                    outs = llm.chat([messages[it.record.id] for it in chunk], params, use_tqdm=False)
                    dt = time.perf_counter() - c0
                    wall += dt
                    for it, out in zip(chunk, outs):
                        ids = list(out.outputs[0].token_ids)
                        requests.append(
                            {
                                "id": it.record.id,
                                "num_tokens": len(ids),
                                "latency_s": _request_latency(out, dt),
                                "token_ids": ids if temp == 0 else None,
                            }
                        )
                    bar.update(len(chunk))
                delta = SpecCounters.from_llm(llm) - before
                runs.append(
                    {
                        "temperature": temp,
                        "task": task,
                        "wall_s": wall,
                        "counters": _counters_dict(delta),
                        "requests": requests,
                    }
                )
        bar.close()
    finally:
        shutdown(llm)
    return {"mode": mode.name, "startup_s": startup_s, "runs": runs}


def _counters_dict(c: SpecCounters) -> dict[str, Any]:
    return {
        "num_drafts": c.num_drafts,
        "num_draft_tokens": c.num_draft_tokens,
        "num_accepted_tokens": c.num_accepted_tokens,
        "accepted_per_pos": list(c.accepted_per_pos),
    }


def _counters(d: dict[str, Any]) -> SpecCounters:
    return SpecCounters(
        num_drafts=d["num_drafts"],
        num_draft_tokens=d["num_draft_tokens"],
        num_accepted_tokens=d["num_accepted_tokens"],
        accepted_per_pos=tuple(d["accepted_per_pos"]),
    )


# ---- summarising ----------------------------------------------------------------------------------


def summarise_run(mode: str, temperature: float, task: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results row from one or more raw runs (several for the ``all`` pseudo-task)."""
    reqs = [r for p in parts for r in p["requests"]]
    wall = sum(p["wall_s"] for p in parts)
    tokens = sum(r["num_tokens"] for r in reqs)
    c = sum_counters([_counters(p["counters"]) for p in parts])
    return {
        "mode": mode,
        "temperature": temperature,
        "task": task,
        "num_requests": len(reqs),
        "output_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else None,
        "latency_s": latency_summary([r["latency_s"] for r in reqs]),
        "mal": c.mean_accepted_length,
        "acceptance_per_position": c.acceptance_per_position,
        "draft_acceptance_rate": c.draft_acceptance_rate,
        "counters": _counters_dict(c),
    }


def summarise(modes: list[Mode], raw: dict[str, dict[str, Any]], temperatures: list[float]) -> dict[str, Any]:
    """Rows per (mode, temperature, task + all), speed-ups and the T=0 exactness check."""
    rows = []
    for m in modes:
        for temp in temperatures:
            runs = [r for r in raw[m.name]["runs"] if r["temperature"] == temp]
            rows += [summarise_run(m.name, temp, r["task"], [r]) for r in runs]
            rows.append(summarise_run(m.name, temp, ALL, runs))
    return {"runs": rows, "speedups": speedups(modes, rows), "exactness": exactness(modes, raw)}


def speedups(modes: list[Mode], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each speculative mode over ``none``, and each MASSV drafter over each text-only drafter.

    ``tokens_per_s_ratio`` (throughput; fair at T>0, where modes emit different lengths) and
    ``latency_ratio`` (baseline mean latency / mode mean latency).
    """
    index = {(r["mode"], r["temperature"], r["task"]): r for r in rows}
    pairs = [(m.name, NONE) for m in modes if m.kind != NONE and any(b.kind == NONE for b in modes)]
    pairs += [
        (m.name, t.name) for m in modes if m.kind.startswith("massv") for t in modes if t.kind == "text-only"
    ]
    out = []
    for mode, base in pairs:
        for (name, temp, task), row in index.items():
            if name != mode or (base, temp, task) not in index:
                continue
            b = index[(base, temp, task)]
            lat_b = (b["latency_s"] or {}).get("mean")
            lat_m = (row["latency_s"] or {}).get("mean")
            tps = None
            if row["tokens_per_s"] and b["tokens_per_s"]:
                tps = row["tokens_per_s"] / b["tokens_per_s"]
            out.append(
                {
                    "mode": mode,
                    "baseline": base,
                    "temperature": temp,
                    "task": task,
                    "tokens_per_s_ratio": tps,
                    "latency_ratio": speedup(lat_b, lat_m),
                }
            )
    return out


def exactness(modes: list[Mode], raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """At T=0 every mode must emit the target's greedy tokens: compare token ids per request id."""
    per_mode: dict[str, dict[str, list[int]]] = {}
    tasks: dict[str, str] = {}
    for m in modes:
        for run in raw[m.name]["runs"]:
            if run["temperature"] != 0:
                continue
            for r in run["requests"]:
                per_mode.setdefault(m.name, {})[r["id"]] = r["token_ids"]
                tasks[r["id"]] = run["task"]
    names = list(per_mode)
    if len(names) < 2:
        return {
            "checked": False,
            "reference": None,
            "identical": None,
            "num_compared": 0,
            "num_mismatches": 0,
            "mismatches": [],
        }
    ref = NONE if NONE in per_mode else names[0]
    mismatches = []
    for rid, ids in per_mode[ref].items():
        differ = [n for n in names if n != ref and per_mode[n].get(rid) != ids]
        if differ:
            mismatches.append({"id": rid, "task": tasks[rid], "modes": differ})
    return {
        "checked": True,
        "reference": ref,
        "identical": not mismatches,
        "num_compared": len(per_mode[ref]),
        "num_mismatches": len(mismatches),
        "mismatches": mismatches,
    }


# ---- schema, plots, table -----------------------------------------------------------------------

RUN_SCHEMA = {
    "mode": str,
    "temperature": NUM,
    "task": str,
    "num_requests": int,
    "output_tokens": int,
    "wall_s": NUM,
    "tokens_per_s": Opt(NUM),
    "latency_s": Opt({"mean": NUM, "p50": NUM, "p90": NUM}),
    "mal": Opt(NUM),
    "acceptance_per_position": ListOf(NUM),
    "draft_acceptance_rate": Opt(NUM),
    "counters": {
        "num_drafts": int,
        "num_draft_tokens": int,
        "num_accepted_tokens": int,
        "accepted_per_pos": ListOf(int),
    },
}
SCHEMA = {
    "version": int,
    "meta": META_SCHEMA,
    "target": str,
    "eval": {"path": str, "tasks": MapOf(int), "read_stats": dict},
    "gamma": int,
    "temperatures": ListOf(NUM),
    "batch_size": int,
    "max_tokens": int,
    "modes": MapOf({"drafter": Opt(str), "kind": str, "startup_s": NUM}),
    "runs": ListOf(RUN_SCHEMA),
    "speedups": ListOf(
        {
            "mode": str,
            "baseline": str,
            "temperature": NUM,
            "task": str,
            "tokens_per_s_ratio": Opt(NUM),
            "latency_ratio": Opt(NUM),
        }
    ),
    "exactness": {
        "checked": bool,
        "reference": Opt(str),
        "identical": Opt(bool),
        "num_compared": int,
        "num_mismatches": int,
        "mismatches": ListOf({"id": str, "task": str, "modes": ListOf(str)}),
    },
    "plots": ListOf(str),
}


def _t(temp: float) -> str:
    return f"T={temp:g}"


def write_plots(doc: dict[str, Any], out_dir: Path) -> list[str]:
    spec_modes = [n for n, m in doc["modes"].items() if m["kind"] != NONE]
    if not spec_modes:
        return []
    tasks = list(doc["eval"]["tasks"]) + [ALL]
    idx = {(r["mode"], r["temperature"], r["task"]): r for r in doc["runs"]}
    temps = doc["temperatures"]
    mal = {_t(t): (tasks, {m: [idx[(m, t, k)]["mal"] for k in tasks] for m in spec_modes}) for t in temps}
    paths = [bar_panels(out_dir / "mal.png", mal, "mean accepted length", f"MAL (γ={doc['gamma']})")]
    pos = {
        _t(t): {
            m: (
                list(range(1, len(idx[(m, t, ALL)]["acceptance_per_position"]) + 1)),
                idx[(m, t, ALL)]["acceptance_per_position"],
            )
            for m in spec_modes
        }
        for t in temps
    }
    paths.append(
        line_panels(
            out_dir / "acceptance_per_position.png",
            pos,
            "draft position",
            "P(accepted at position)",
            "acceptance per draft position (all tasks)",
            ylim=(0.0, 1.0),
        )
    )
    sp = {
        (s["mode"], s["baseline"], s["temperature"], s["task"]): s["tokens_per_s_ratio"]
        for s in doc["speedups"]
    }
    pairs = sorted({(s["mode"], s["baseline"]) for s in doc["speedups"]}, key=lambda p: (p[1] != NONE, p))
    if pairs:
        panels = {
            _t(t): (tasks, {f"{m} / {b}": [sp.get((m, b, t, k)) for k in tasks] for m, b in pairs})
            for t in temps
        }
        paths.append(
            bar_panels(out_dir / "speedup.png", panels, "speed-up (tokens/s ratio)", "speed-up", hline=1.0)
        )
    return [p.name for p in paths]


def format_report(doc: dict[str, Any]) -> str:
    """Per temperature: MAL / speed-up over ``none`` per task, throughput and latency; exactness."""
    tasks = list(doc["eval"]["tasks"]) + [ALL]
    idx = {(r["mode"], r["temperature"], r["task"]): r for r in doc["runs"]}
    sp = {
        (s["mode"], s["baseline"], s["temperature"], s["task"]): s["tokens_per_s_ratio"]
        for s in doc["speedups"]
    }
    out = []
    for t in doc["temperatures"]:
        rows = []
        for m in doc["modes"]:
            cells = [m]
            for k in tasks:
                r = idx.get((m, t, k))
                s = sp.get((m, NONE, t, k))
                cells.append(f"{fmt(r and r['mal'])} / {fmt(s)}x" if s is not None else fmt(r and r["mal"]))
            all_row = idx.get((m, t, ALL)) or {}
            lat = all_row.get("latency_s") or {}
            cells += [fmt(all_row.get("tokens_per_s"), 1), fmt(lat.get("p50"), 3), fmt(lat.get("p90"), 3)]
            rows.append(cells)
        headers = ["mode", *tasks, "tok/s", "p50 s", "p90 s"]
        out.append(
            format_table(
                headers,
                rows,
                f"{_t(t)}, γ={doc['gamma']}, batch {doc['batch_size']}: MAL / speed-up over none (tokens/s)",
            )
        )
        for s in doc["speedups"]:
            if s["baseline"] != NONE and s["temperature"] == t and s["task"] == ALL:
                out.append(f"  {s['mode']} over {s['baseline']}: {fmt(s['tokens_per_s_ratio'])}x (tokens/s)")
    ex = doc["exactness"]
    if ex["checked"]:
        verdict = "IDENTICAL" if ex["identical"] else f"{ex['num_mismatches']} MISMATCHES"
        out.append(
            f"T=0 exactness: {verdict} across modes over {ex['num_compared']} requests (reference: {ex['reference']})"
        )
        for mm in ex["mismatches"][:20]:
            out.append(f"  request {mm['id']} ({mm['task']}): differs in {', '.join(mm['modes'])}")
    return "\n\n".join(out)


# ---- the whole run ------------------------------------------------------------------------------


def _mode_key(target: str, mode: Mode, tasks: dict[str, list[EvalItem]], settings: dict[str, Any]) -> str:
    ident = {
        "target": str(Path(target).resolve()),
        "mode": [mode.name, mode.drafter and str(Path(mode.drafter).resolve()), mode.kind],
        "ids": {k: [it.record.id for it in v] for k, v in tasks.items()},
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_acceptance(
    target: str | Path,
    eval_path: str | Path,
    modes: list[Mode] | list[str],
    out_dir: str | Path,
    *,
    gamma: int = 5,
    temperatures: tuple[float, ...] | list[float] = (0.0, 1.0),
    batch_size: int = 1,
    max_tokens: int = 256,
    image_root: str | Path | None = None,
    limit: int | None = None,
    tasks: list[str] | None = None,
    seed: int = 0,
    ignore_eos: bool = False,
    engine_kw: dict[str, Any] | None = None,
    fresh: bool = False,
    hf_columns: dict[str, Any] | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every mode, write results.json + plots into ``out_dir`` and return the results."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    if batch_size < 1 or max_tokens < 1:
        raise ValueError("batch_size and max_tokens must be >= 1")
    temps = [float(t) for t in temperatures]
    if not temps or any(t < 0 for t in temps):
        raise ValueError(f"temperatures must be >= 0, got {temps}")
    if all(isinstance(m, Mode) for m in modes):
        mode_list = list(modes)
    elif all(isinstance(m, str) for m in modes):
        mode_list = parse_modes(list(modes))
    else:
        raise TypeError("modes must be all Mode objects or all 'none' / NAME=PATH strings")
    target = str(target)
    out = Path(out_dir)
    (out / "modes").mkdir(parents=True, exist_ok=True)
    stats = ReadStats()
    task_items = load_eval_set(eval_path, image_root, limit, tasks, stats, **(hf_columns or {}))
    settings = {
        "gamma": gamma,
        "temperatures": temps,
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "seed": seed,
        "ignore_eos": ignore_eos,
        "engine_kw": engine_kw or {},
    }
    raw: dict[str, dict[str, Any]] = {}
    for m in mode_list:
        path = out / "modes" / f"{m.name}.json"
        key = _mode_key(target, m, task_items, settings)
        if not fresh and path.is_file():
            prev = json.loads(path.read_text())
            if prev.get("key") == key:
                print(f"[acceptance] mode {m.name}: reusing {path} (same settings)", file=sys.stderr)
                raw[m.name] = prev
                continue
            print(f"[acceptance] mode {m.name}: settings changed, rerunning", file=sys.stderr)
        res = run_mode(
            target,
            m,
            task_items,
            gamma=gamma,
            temperatures=temps,
            batch_size=batch_size,
            max_tokens=max_tokens,
            seed=seed,
            ignore_eos=ignore_eos,
            engine_kw=engine_kw,
            progress=progress,
        )
        res["key"] = key
        write_json(path, res)  # checkpoint: a crash in a later mode keeps this one
        raw[m.name] = res
    summary = summarise(mode_list, raw, temps)
    doc = {
        "version": RESULTS_VERSION,
        "meta": run_metadata(
            {**settings, "modes": [m.__dict__ for m in mode_list], "limit": limit, "tasks": tasks}, argv
        ),
        "target": target,
        "eval": {
            "path": str(eval_path),
            "tasks": {k: len(v) for k, v in task_items.items()},
            "read_stats": stats.to_dict(),
        },
        "gamma": gamma,
        "temperatures": temps,
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "modes": {
            m.name: {"drafter": m.drafter, "kind": m.kind, "startup_s": raw[m.name]["startup_s"]}
            for m in mode_list
        },
        **summary,
        "plots": [],
    }
    doc["plots"] = write_plots(doc, out)
    problems = check_schema(doc, SCHEMA)
    if problems:  # a bug here, not bad input: refuse to write a file that breaks the documented schema
        raise AssertionError("results.json does not match its schema:\n" + "\n".join(problems))
    write_json(out / "results.json", doc)
    return doc


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """How the engines decode (``run_acceptance`` keywords): γ, temperatures, batch size, max tokens."""
    p.add_argument("--gamma", type=int, default=5, help="draft tokens per step (num_speculative_tokens)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--batch-size", type=int, default=1, help="requests submitted at a time (1: latency)")
    p.add_argument("--max-tokens", type=int, default=256)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = cli.parser(__doc__)
    add_eval_args(p)
    p.add_argument("--modes", nargs="+", required=True, help="'none' and/or NAME=DRAFTER_FOLDER ...")
    add_decoding_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    cli.add_engine_arg(p, help="extra LLM(...) argument")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fresh", action="store_true", help="rerun modes even if finished results exist")
    a = p.parse_args(argv)
    return cli.run_eval_main(
        run_acceptance,
        a,
        a.modes,
        module="benchmarks.acceptance",
        argv=argv,
        report=format_report,
        results="results.json",
        engine_kw=parse_engine_args(a.engine_arg),
    )


if __name__ == "__main__":
    main()
