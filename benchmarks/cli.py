"""What the benchmark command lines share: the parser, the ``--engine-arg`` option and ``run_main``,
the body of a ``main()`` that forwards the parsed options to the ``run_*`` function they configure,
records the command in the results' ``meta`` and prints the report (``run_eval_main``: the same for
the benchmarks over an eval set)."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.evalset import hf_columns_from


def parser(doc: str | None, **kw: Any) -> argparse.ArgumentParser:
    """A parser whose ``--help`` shows the module docstring as written (usage examples included)."""
    return argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kw
    )


def add_engine_arg(p: Any, help: str = "extra LLM(...) argument (JSON value), e.g. max_num_seqs=256") -> None:
    """``--engine-arg KEY=VALUE`` (repeatable); ``massv_vllm.engine.parse_engine_args`` reads it."""
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE", help=help)


def command(module: str, argv: Sequence[str] | None) -> list[str]:
    """The command recorded in a results file's ``meta``: ``-m MODULE ARGS``."""
    return ["-m", module, *(sys.argv[1:] if argv is None else argv)]


def forward(run: Callable[..., Any], a: argparse.Namespace, *args: Any, **kwargs: Any) -> Any:
    """``run(*args, **kwargs)``, plus every further parameter of ``run`` that has an option of the
    same name in ``a`` set to that option's value."""
    names = list(inspect.signature(run).parameters)[len(args) :]
    options = {n: getattr(a, n) for n in names if n not in kwargs and hasattr(a, n)}
    return run(*args, **options, **kwargs)


def run_main(
    run: Callable[..., dict[str, Any]],
    a: argparse.Namespace,
    *args: Any,
    module: str,
    argv: Sequence[str] | None,
    report: Callable[[dict[str, Any]], str],
    results: str,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run ``forward(run, a, *args, **kwargs)`` with the command line as ``argv``, print
    ``report(doc)`` and where ``a.out / results`` was written; returns the results document."""
    doc = forward(run, a, *args, argv=command(module, argv), **kwargs)
    print(report(doc))
    print(f"\nwrote {Path(a.out) / results}")
    return doc


def run_eval_main(
    run: Callable[..., dict[str, Any]], a: argparse.Namespace, selection: Any, **kwargs: Any
) -> dict[str, Any]:
    """``run_main`` of a benchmark over an eval set (``benchmarks.evalset.add_eval_args``):
    ``run(a.target, a.eval, selection, a.out, ...)`` with the eval set's column options;
    ``kwargs``: ``run_main``'s keywords and further ones for ``run``."""
    return run_main(run, a, a.target, a.eval, selection, a.out, hf_columns=hf_columns_from(a), **kwargs)
