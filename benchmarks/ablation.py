"""The paper's ablation table in one command: acceptance + speed-up (vLLM) and TVD per drafter.

    python -m benchmarks.ablation --target Qwen2.5-VL-7B-Instruct --eval eval.json \\
        --drafters text=drafters/text nosdvit=drafters/massv-phase1 massv=drafters/massv --out runs/ablation

Runs ``benchmarks.acceptance`` with the modes ``none`` + every drafter (into OUT/acceptance) and
``benchmarks.tvd`` with the same drafters (into OUT/tvd), then prints, per temperature, the table
rows = drafters, columns = tasks (+ all), cells = "MAL / speed-up over no speculation" (tokens/s),
with each drafter's mean TVD and top-1 agreement beside it, and writes ``ablation.json``.
``run_ablation`` is the same as a function (used by the synthetic-world pipeline).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from benchmarks import cli
from benchmarks.acceptance import ALL, NONE, add_decoding_args, run_acceptance
from benchmarks.acceptance import format_report as acceptance_report
from benchmarks.evalset import add_eval_args
from benchmarks.report import (
    META_SCHEMA,
    NUM,
    ListOf,
    MapOf,
    Opt,
    check_schema,
    fmt,
    format_table,
    run_metadata,
    write_json,
)
from benchmarks.tvd import RESPONSE_SOURCES, add_drafters_arg, parse_named_paths, run_tvd
from benchmarks.tvd import overall as tvd_overall
from massv_vllm.engine import parse_engine_args

RESULTS_VERSION = 1

CELL_SCHEMA = {"mal": Opt(NUM), "speedup": Opt(NUM), "tokens_per_s": Opt(NUM)}
SCHEMA = {
    "version": int,
    "meta": META_SCHEMA,
    "target": str,
    "eval": str,
    "drafters": MapOf(str),
    "gamma": int,
    "temperatures": ListOf(NUM),
    "batch_size": int,
    "max_tokens": int,
    "tasks": ListOf(str),
    # table[temperature as "T=<t>"][drafter][task] -> cell
    "table": MapOf(MapOf(MapOf(CELL_SCHEMA))),
    "tvd": Opt(MapOf({"mean": Opt(NUM), "median": Opt(NUM), "top1_agreement": Opt(NUM), "num_tokens": int})),
    "exactness": {"checked": bool, "identical": Opt(bool), "num_mismatches": int},
    "files": {"acceptance": str, "tvd": Opt(str)},
    "plots": ListOf(str),
}


def build_table(acc: dict[str, Any], drafters: list[str]) -> tuple[list[str], dict[str, Any]]:
    """``{"T=t": {drafter: {task: {mal, speedup, tokens_per_s}}}}`` from acceptance results."""
    tasks = [*acc["eval"]["tasks"], ALL]
    runs = {(r["mode"], r["temperature"], r["task"]): r for r in acc["runs"]}
    sp = {
        (s["mode"], s["temperature"], s["task"]): s["tokens_per_s_ratio"]
        for s in acc["speedups"]
        if s["baseline"] == NONE
    }
    table: dict[str, Any] = {}
    for t in acc["temperatures"]:
        table[f"T={t:g}"] = {
            d: {
                k: {
                    "mal": runs[(d, t, k)]["mal"],
                    "speedup": sp.get((d, t, k)),
                    "tokens_per_s": runs[(d, t, k)]["tokens_per_s"],
                }
                for k in tasks
            }
            for d in drafters
        }
    return tasks, table


def format_ablation(doc: dict[str, Any]) -> str:
    out = []
    tvd = doc["tvd"] or {}
    for temp, rows in doc["table"].items():
        body = []
        for d, cells in rows.items():
            line = [d] + [f"{fmt(cells[k]['mal'])} / {fmt(cells[k]['speedup'])}x" for k in doc["tasks"]]
            if doc["tvd"] is not None:
                line += [fmt(tvd[d]["mean"], 3), fmt(tvd[d]["top1_agreement"], 3)]
            body.append(line)
        headers = ["drafter", *doc["tasks"]] + (["TVD", "top-1"] if doc["tvd"] is not None else [])
        out.append(
            format_table(headers, body, f"{temp}, γ={doc['gamma']}: MAL / speed-up over no speculation")
        )
    ex = doc["exactness"]
    if ex["checked"]:
        out.append(
            "T=0 outputs identical across modes"
            if ex["identical"]
            else f"T=0 outputs differ between modes for {ex['num_mismatches']} requests (see acceptance/results.json)"
        )
    return "\n\n".join(out)


def run_ablation(
    target: str | Path,
    eval_path: str | Path,
    drafters: dict[str, str],
    out_dir: str | Path,
    gamma: int = 5,
    temperatures: tuple[float, ...] | list[float] = (0.0, 1.0),
    batch_size: int = 1,
    max_tokens: int = 256,
    image_root: str | Path | None = None,
    limit: int | None = None,
    *,
    tvd: bool = True,
    tvd_responses: str = "reference",
    tvd_limit: int | None = None,
    tasks: list[str] | None = None,
    engine_kw: dict[str, Any] | None = None,
    hf_columns: dict[str, Any] | None = None,
    fresh: bool = False,
    argv: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Acceptance (modes ``none`` + ``drafters``) and TVD into ``out_dir``; returns ablation.json's dict.

    ``drafters`` maps a row name to a drafter folder (MASSV or text-only), e.g.
    ``{"text": ..., "nosdvit": ..., "massv": ...}``; ``limit`` is per task; ``tvd_limit`` (default:
    ``limit``) bounds the TVD records per task.
    """
    if not drafters:
        raise ValueError("no drafters given")
    if NONE in drafters:
        raise ValueError("'none' is reserved for the no-speculation baseline")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = run_acceptance(
        target,
        eval_path,
        [NONE, *(f"{n}={p}" for n, p in drafters.items())],
        out / "acceptance",
        gamma=gamma,
        temperatures=temperatures,
        batch_size=batch_size,
        max_tokens=max_tokens,
        image_root=image_root,
        limit=limit,
        tasks=tasks,
        engine_kw=engine_kw,
        fresh=fresh,
        hf_columns=hf_columns,
        argv=argv,
        progress=progress,
    )
    print(acceptance_report(acc), file=sys.stderr)
    tvd_doc = None
    if tvd:
        tvd_doc = run_tvd(
            target,
            eval_path,
            drafters,
            out / "tvd",
            responses=tvd_responses,
            image_root=image_root,
            limit=tvd_limit if tvd_limit is not None else limit,
            tasks=tasks,
            fresh=fresh,
            hf_columns=hf_columns,
            argv=argv,
            progress=progress,
        )
    tasks, table = build_table(acc, list(drafters))
    tvd_summary = None if tvd_doc is None else tvd_overall(tvd_doc)
    ex = acc["exactness"]
    doc = {
        "version": RESULTS_VERSION,
        "meta": run_metadata(
            {
                "gamma": gamma,
                "temperatures": list(temperatures),
                "batch_size": batch_size,
                "max_tokens": max_tokens,
                "limit": limit,
                "tasks": tasks,
                "tvd": tvd,
                "tvd_responses": tvd_responses,
                "engine_kw": engine_kw or {},
            },
            argv,
        ),
        "target": str(target),
        "eval": str(eval_path),
        "drafters": {k: str(v) for k, v in drafters.items()},
        "gamma": gamma,
        "temperatures": acc["temperatures"],
        "batch_size": batch_size,
        "max_tokens": max_tokens,
        "tasks": tasks,
        "table": table,
        "tvd": tvd_summary,
        "exactness": {
            "checked": ex["checked"],
            "identical": ex["identical"],
            "num_mismatches": ex["num_mismatches"],
        },
        "files": {
            "acceptance": "acceptance/results.json",
            "tvd": "tvd/tvd.json" if tvd_doc is not None else None,
        },
        "plots": [f"acceptance/{p}" for p in acc["plots"]]
        + ([f"tvd/{p}" for p in tvd_doc["plots"]] if tvd_doc is not None else []),
    }
    problems = check_schema(doc, SCHEMA)
    if problems:
        raise AssertionError("ablation.json does not match its schema:\n" + "\n".join(problems))
    write_json(out / "ablation.json", doc)
    return doc


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = cli.parser(__doc__)
    add_eval_args(p)
    add_drafters_arg(p)
    add_decoding_args(p)
    p.add_argument("--no-tvd", action="store_true", help="skip the TVD diagnostic")
    p.add_argument("--tvd-responses", choices=RESPONSE_SOURCES, default="reference")
    p.add_argument("--tvd-limit", type=int, default=None, help="TVD records per task (default: --limit)")
    cli.add_engine_arg(p, help=None)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    return cli.run_eval_main(
        run_ablation,
        a,
        parse_named_paths(a.drafters),
        module="benchmarks.ablation",
        argv=argv,
        report=format_ablation,
        results="ablation.json",
        tvd=not a.no_tvd,
        engine_kw=parse_engine_args(a.engine_arg),
    )


if __name__ == "__main__":
    main()
