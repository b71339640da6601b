"""Eval sets for the benchmarks (acceptance, TVD, ablation): records grouped by task, images loaded.

An eval set is read with ``massv_vllm.training.data.records.read_records``: LLaVA-style JSON/JSONL
(task from a ``task`` key) or a ``datasets`` folder/parquet (columns named by the options that
``add_eval_args`` adds). Malformed records, unreadable images and repeated ids are skipped and
counted; records without a task go to ``UNLABELLED``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from massv_vllm.training.data.records import DataError, ReadStats, Record, load_image, read_records

UNLABELLED = "unlabelled"  # task of records without one


@dataclass
class EvalItem:
    record: Record
    images: list[Any]  # PIL images, loaded once

    @property
    def task(self) -> str:
        return self.record.task or UNLABELLED


def load_eval_set(
    path: str | Path,
    image_root: str | Path | None = None,
    limit: int | None = None,
    tasks: list[str] | None = None,
    stats: ReadStats | None = None,
    **hf_columns: Any,
) -> dict[str, list[EvalItem]]:
    """Eval records grouped by task (``limit``: at most that many per task), images loaded.

    Samples that are malformed or whose images cannot be read are skipped and counted in ``stats``.
    """
    stats = stats if stats is not None else ReadStats()
    by_task: dict[str, list[EvalItem]] = {}
    seen_ids: set[str] = set()
    for rec in read_records(path, image_root, stats, **hf_columns):
        task = rec.task or UNLABELLED
        if tasks and task not in tasks:
            continue
        if limit is not None and len(by_task.get(task, [])) >= limit:
            continue
        if rec.id in seen_ids:  # ids key the exactness check and resume: they must be unique
            stats.kept -= 1
            stats.skip("duplicate id")
            continue
        try:
            images = [load_image(src) for src in rec.images]
        except DataError:
            stats.kept -= 1
            stats.skip("unreadable image")
            continue
        seen_ids.add(rec.id)
        by_task.setdefault(task, []).append(EvalItem(rec, images))
    if not by_task:
        want = f" with tasks {tasks}" if tasks else ""
        raise DataError(f"{path}: no usable eval records{want} ({stats.summary()})")
    return dict(sorted(by_task.items()))


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """``--target``, ``--eval`` and the options that select and read the eval set."""
    p.add_argument("--target", required=True, help="target VLM folder")
    p.add_argument(
        "--eval",
        "--data",
        dest="eval",
        required=True,
        help="eval set: LLaVA-style JSON/JSONL or a datasets folder/parquet",
    )
    p.add_argument(
        "--image-root", default=None, help="image folder for LLaVA paths (default: the JSON's folder)"
    )
    p.add_argument("--limit", type=int, default=None, help="at most this many records per task")
    p.add_argument("--tasks", nargs="*", default=None, help="only these tasks")
    g = p.add_argument_group("datasets columns (non-JSON eval sets)")
    g.add_argument("--image-column", default="image")
    g.add_argument("--prompt-column", default="prompt")
    g.add_argument("--response-column", default="response")
    g.add_argument("--task-column", default=None)
    g.add_argument("--id-column", default=None)
    g.add_argument("--split", default="train")


def hf_columns_from(a: argparse.Namespace) -> dict[str, Any]:
    """The ``load_eval_set`` column keywords of ``add_eval_args`` options (none for JSON eval sets)."""
    if Path(a.eval).suffix in (".json", ".jsonl"):
        return {}
    return {
        "image_column": a.image_column,
        "prompt_column": a.prompt_column,
        "response_column": a.response_column,
        "task_column": a.task_column,
        "id_column": a.id_column,
        "split": a.split,
    }
