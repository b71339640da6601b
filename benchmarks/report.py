"""Writers shared by the benchmarks: run metadata, JSON (atomic), a small schema checker, text
tables and PNG plots (matplotlib, headless).

Every results file carries ``meta`` (``run_metadata``): date, command, host (GPU/CPU names),
package versions, git commit and the tool's settings, so a number can always be traced to how it
was measured.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# ---- metadata ------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """The names of the GPUs this process may use, asked through ``nvidia-smi`` (NVML).

    Not ``torch.cuda.get_device_name``: it initializes CUDA in the calling process, and vLLM then
    starts every later engine of a multi-engine benchmark with ``spawn`` instead of ``fork``
    (~20 s more per engine on the H200, 2026-12-01)."""
    cmd = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        if not visible.strip():
            return []  # CUDA_VISIBLE_DEVICES="" hides every GPU
        cmd += ["-i", visible]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):  # no driver here: a CPU run still writes its report
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def machine_id(path: str = "/proc/sys/kernel/random/boot_id") -> str | None:
    """This machine's boot id: each device machine boots a kernel of its own (their hostnames are
    all "vm"), so engines of one run timed on two machines show two ids. None off Linux."""
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None


def run_metadata(settings: Mapping[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Date, command line, host, versions and ``settings`` of this run (the ``meta`` section)."""
    from massv_vllm.provenance import git_commit, package_versions

    argv = list(sys.argv if argv is None else argv)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *argv]),
        "host": {
            "hostname": platform.node(),
            "machine": machine_id(),
            "gpu": gpu_names(),
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            # host-bound timings (spec steps) slow down when other work shares the CPUs
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
        },
        "versions": package_versions(),
        "git_commit": git_commit(),
        "settings": _jsonable(dict(settings)),
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(path: str | Path, doc: Any) -> Path:
    """Write ``doc`` as indented JSON atomically (a killed run never leaves a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


# ---- schema check ------------------------------------------------------------------------------
# A schema is a type (or tuple of types), a dict {key: schema} (those keys required), or one of the
# wrappers below. Small on purpose: it documents and checks the JSON files the tools write.


class Opt:
    """The value may be None (JSON null)."""

    def __init__(self, schema: Any):
        self.schema = schema


class ListOf:
    def __init__(self, schema: Any):
        self.schema = schema


class MapOf:
    """A dict with arbitrary string keys whose values all match ``schema``."""

    def __init__(self, schema: Any):
        self.schema = schema


NUM = (int, float)


def check_schema(doc: Any, schema: Any, where: str = "$") -> list[str]:
    """Every place where ``doc`` does not match ``schema`` (empty list: it matches)."""
    if isinstance(schema, Opt):
        return [] if doc is None else check_schema(doc, schema.schema, where)
    if isinstance(schema, ListOf):
        if not isinstance(doc, list):
            return [f"{where}: expected a list, got {type(doc).__name__}"]
        return [p for i, v in enumerate(doc) for p in check_schema(v, schema.schema, f"{where}[{i}]")]
    if isinstance(schema, MapOf):
        if not isinstance(doc, dict):
            return [f"{where}: expected an object, got {type(doc).__name__}"]
        return [p for k, v in doc.items() for p in check_schema(v, schema.schema, f"{where}.{k}")]
    if isinstance(schema, dict):
        if not isinstance(doc, dict):
            return [f"{where}: expected an object, got {type(doc).__name__}"]
        out = [f"{where}: missing key '{k}'" for k in schema if k not in doc]
        for k, s in schema.items():
            if k in doc:
                out += check_schema(doc[k], s, f"{where}.{k}")
        return out
    types = schema if isinstance(schema, tuple) else (schema,)
    # JSON has no int/bool distinction problem, but Python does: True is an int.
    if isinstance(doc, bool) and bool not in types:
        return [f"{where}: expected {_tname(types)}, got bool"]
    if not isinstance(doc, types):
        return [f"{where}: expected {_tname(types)}, got {type(doc).__name__}"]
    return []


def _tname(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


META_SCHEMA = {
    "date": str,
    "command": str,
    "host": {"gpu": ListOf(str), "cpu": str},
    "versions": MapOf(str),
    "git_commit": Opt(str),
    "settings": dict,
}

# ---- text tables ---------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None, digits: int = 2
) -> str:
    """A plain fixed-width table (first column left-aligned, the rest right-aligned); cells that are
    not strings go through ``fmt(cell, digits)``."""
    cells = [[str(h) for h in headers]]
    cells += [[c if isinstance(c, str) else fmt(c, digits) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    out = [title] if title else []
    out += [line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]]
    return "\n".join(out)


# ---- plots ---------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: benchmarks run on servers
    import matplotlib.pyplot as plt

    return plt


def bar_panels(
    path: str | Path,
    panels: Mapping[str, tuple[Sequence[str], Mapping[str, Sequence[float | None]]]],
    ylabel: str,
    title: str | None = None,
    hline: float | None = None,
) -> Path:
    """Grouped bars, one panel per entry: ``{panel title: (categories, {series: values})}``.

    ``None`` values are drawn as missing bars; ``hline`` marks a reference level (e.g. 1.0x).
    """
    plt = _pyplot()
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(max(5.0, 1.2 * _max_bars(panels)) * n, 4.2), squeeze=False)
    for ax, (ptitle, (cats, series)) in zip(axes[0], panels.items()):
        k = max(len(series), 1)
        width = 0.8 / k
        for j, (name, vals) in enumerate(series.items()):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(cats))]
            ys = [math.nan if v is None else v for v in vals]
            bars = ax.bar(xs, ys, width=width, label=name)
            for b, v in zip(bars, vals):
                if v is not None:
                    ax.annotate(
                        f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7
                    )
        if hline is not None:
            ax.axhline(hline, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(cats)))
        ax.set_xticklabels(cats, rotation=20, ha="right")
        ax.set_title(ptitle)
        ax.set_ylabel(ylabel)
        if series:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _max_bars(panels: Mapping[str, tuple[Sequence[str], Mapping[str, Sequence[Any]]]]) -> int:
    return max((len(c) * max(len(s), 1) for c, s in panels.values()), default=1) // 2 + 3


def line_panels(
    path: str | Path,
    panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Lines with markers, one panel per entry: ``{panel title: {series: (xs, ys)}}``."""
    plt = _pyplot()
    n = max(len(panels), 1)
    fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 4.0), squeeze=False)
    for ax, (ptitle, series) in zip(axes[0], panels.items()):
        for name, (xs, ys) in series.items():
            ax.plot(list(xs), list(ys), marker="o", label=name)
        if all(float(x).is_integer() for xs, _ in series.values() for x in xs):
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(ptitle)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if ylim:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def histograms(
    path: str | Path,
    samples: Mapping[str, Sequence[float]],
    bins: int = 50,
    value_range: tuple[float, float] = (0.0, 1.0),
    xlabel: str = "",
    title: str | None = None,
) -> Path:
    """Overlaid step histograms (density) of several samples on the same bins."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, xs in samples.items():
        if len(xs):
            ax.hist(
                list(xs),
                bins=bins,
                range=value_range,
                density=True,
                histtype="step",
                linewidth=1.6,
                label=f"{name} (n={len(xs)})",
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    if any(len(xs) for xs in samples.values()):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
