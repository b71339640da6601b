"""``python -m benchmarks.world run --out DIR [--preset P] [--until STAGE | --stages A,B] [--force A,B]``

Runs the synthetic-world pipeline (see benchmarks/world/README.md): full size on a GPU; without a
GPU it says so and runs the CPU demo (a reduced world, a few minutes on 2 cores). ``--preset``
picks one (``full``, ``demo``, ``small``: tiny smoke-test sizes). ``summary --out DIR`` reprints
a run's summary.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from benchmarks import cli


def _list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from benchmarks.world.pipeline import STAGES, StageError, format_summary, run_pipeline
    from benchmarks.world.sizes import PRESETS

    p = cli.parser(__doc__, prog="python -m benchmarks.world")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the pipeline")
    r.add_argument("--out", required=True, help="run folder (stages done there are skipped)")
    pr = r.add_mutually_exclusive_group()
    pr.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="sizes to run (default: full on a GPU, demo without one)",
    )
    pr.add_argument(
        "--small",
        dest="preset",
        action="store_const",
        const="small",
        help="same as --preset small (tiny smoke-test sizes; the numbers mean nothing)",
    )
    g = r.add_mutually_exclusive_group()
    g.add_argument("--until", choices=STAGES, help="stop after this stage")
    g.add_argument("--stages", type=_list, help=f"only these stages, comma-separated ({','.join(STAGES)})")
    r.add_argument("--force", type=_list, default=[], help="rerun these stages even if done")
    r.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("summary", help="print the summary of a run folder")
    s.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.cmd == "summary":
        path = Path(a.out) / "summary.json"
        if not path.is_file():
            print(f"error: {path} not found (run the pipeline first)", file=sys.stderr)
            return 2
        print(format_summary(json.loads(path.read_text())))
        return 0
    try:
        run_pipeline(a.out, preset=a.preset, until=a.until, stages=a.stages, force=a.force, seed=a.seed)
    except StageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
