"""The staged synthetic-world pipeline: world -> target -> small LM -> drafters -> MASSV -> ablation.

    python -m benchmarks.world run --out runs/world                    # everything (GPU: full size,
                                                                       # no GPU: the CPU demo)
    python -m benchmarks.world run --out runs/world --until drafters   # or in three commands (a GPU
    python -m benchmarks.world run --out runs/world --until sdvit      # call's 10 minutes): 1st, 2nd,
    python -m benchmarks.world run --out runs/world                    # 3rd: the rest

Every stage writes ``DIR/stages/<stage>.json`` (result + seconds) when it finishes; a rerun skips
finished stages, so the run can be split across commands (``--until``, ``--stages``) and resumed
after an interruption. ``--force`` reruns named stages and clears everything built on them.
The stages own the folders below ``DIR``:

    world/, tokenizer/   data files + images, the world tokenizer     target/    the target VLM
    small_lm/            the text-only small LM                      drafters/  massv-init, text-only
    phase1/drafter       MASSV without SDViT                         generate/  the target's responses
    sdvit/drafter        MASSV (phase 1 + SDViT)                     ablation/, tvd/, logs/
    parallel/sdvit/drafter  MASSV trained for parallel drafting too (parallel/phase1: its phase 1)
    feature-cache/       the target's image features, shared by every training run

World, target, small LM and drafter building run in this process; drafter training, generation and
the ablation run the project's scripts (``train/pretrain_projector.py``, ``train/generate.py``,
``train/sdvit.py``, ``python -m benchmarks.ablation``) in subprocesses, so vLLM engines and GPU
memory never outlive their stage; TVD calls ``benchmarks.tvd.run_tvd``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import fmt, format_table
from benchmarks.world.sizes import PRESETS, WorldSizes

REPO = Path(__file__).resolve().parents[2]
STAGES = (
    "world", "target", "small_lm", "drafters", "phase1", "generate", "sdvit", "parallel", "ablation", "tvd",
)  # fmt: skip
DEPENDS: dict[str, tuple[str, ...]] = {
    "world": (),
    "target": ("world",),
    "small_lm": ("world",),
    "drafters": ("target", "small_lm"),
    "phase1": ("drafters",),
    "generate": ("target",),
    "sdvit": ("phase1", "generate"),
    "parallel": ("drafters", "generate"),
    "ablation": ("drafters", "phase1", "sdvit", "parallel"),
    "tvd": ("drafters", "phase1", "sdvit", "parallel"),
}
# The ablation's drafters, by the names the table uses, and the folders the stages write them to.
DRAFTER_DIRS = {
    "text-only": "drafters/text-only",
    "massv-no-sdvit": "phase1/drafter",
    "massv": "sdvit/drafter",
    "massv-parallel": "parallel/sdvit/drafter",
}
# Served with "parallel_drafting": true (the benchmarks' ``NAME=parallel:FOLDER`` form): phase 1 and
# SDViT as above, each also trained to draft all γ tokens in one forward (``--parallel-draft-tokens``).
PARALLEL_DRAFTERS = ("massv-parallel",)
# Folders each stage writes; --force clears them (and those of every stage downstream). The training
# stages' shared feature cache holds the target's features, so it goes with the target.
STAGE_OUTPUTS: dict[str, tuple[str, ...]] = {
    "world": ("world", "tokenizer"),
    "target": ("target", "feature-cache"),
    "small_lm": ("small_lm",),
    "drafters": ("drafters",),
    "phase1": ("phase1",),
    "generate": ("generate",),
    "sdvit": ("sdvit",),
    "parallel": ("parallel",),
    "ablation": ("ablation",),
    "tvd": ("tvd",),
}


class StageError(RuntimeError):
    """A stage cannot run (missing script or prerequisite, bad output); the message says why."""


def log(msg: str) -> None:
    print(f"[world] {msg}", flush=True)


@dataclass(frozen=True)
class Run:
    out: Path
    sizes: WorldSizes
    seed: int

    def p(self, rel: str) -> Path:
        return self.out / rel

    @property
    def world(self) -> Path:
        return self.out / "world"

    @property
    def target(self) -> Path:
        return self.out / "target"

    def marker(self, stage: str) -> Path:
        return self.out / "stages" / f"{stage}.json"

    def result(self, stage: str) -> dict[str, Any] | None:
        m = self.marker(stage)
        return json.loads(m.read_text())["result"] if m.is_file() else None


# ---- helpers ------------------------------------------------------------------------------------
# A stage is a job of its own: it must not join a process group its parent may have started
# (an in-process training run leaves RANK/MASTER_PORT set and its port bound).
DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# vLLM on CPU, for the tiny models here: the engine and its worker in the stage's own process (no
# two extra processes to spawn and import vLLM into, ~20-40 s per engine on 2 cores), and no
# torch.compile of the CPU sampler at each start (~15 s; eager is as fast for these batch sizes).
VLLM_CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1"}


def _env(vllm_cpu: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    if vllm_cpu:
        for k, v in VLLM_CPU_ENV.items():
            env.setdefault(k, v)
    return env


def require_script(stage: str, rel: str) -> Path:
    path = REPO / rel
    if not path.is_file():
        raise StageError(f"stage {stage} needs {rel}, not found")
    return path


def run_cmd(
    stage: str, args: Sequence[Any], log_path: Path, threads: int | None = None, vllm_cpu: bool = False
) -> None:
    """Run ``args`` (a Python script or module of this repo) with its output teed to ``log_path``;
    ``threads`` sets OMP_NUM_THREADS (CPU training; vLLM manages its own threads); ``vllm_cpu``
    runs vLLM engines in-process and without torch.compile (``VLLM_CPU_ENV``)."""
    cmd = [sys.executable, *map(str, args)]
    env = _env(vllm_cpu)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log(f"{stage}: {' '.join(cmd)}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as f:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert proc.stdout is not None
        # A progress bar's updates arrive as lines (text mode splits on its carriage returns): on a
        # terminal they redraw one line; piped, only the log file keeps them.
        tty, on_bar = sys.stdout.isatty(), False
        for line in proc.stdout:
            f.write(line)
            if _progress_bar(line):
                if tty:
                    sys.stdout.write("\r" + line.rstrip("\n"))
                    on_bar = True
            elif not _noise(line):
                sys.stdout.write(("\n" if on_bar else "") + line)
                on_bar = False
        sys.stdout.write("\n" if on_bar else "")
        rc = proc.wait()
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise StageError(f"stage {stage} failed (exit {rc}); log {log_path}; last lines:\n{tail}")


def _progress_bar(line: str) -> bool:
    # tqdm, with a total ("sdvit:  96%|█████▌| 240/250 [00:30<00:01, 7.99step/s]") or without
    # ("preparing data: 800rec [00:01, 612.3rec/s]")
    return re.search(r"\d%\||\[\d+:\d\d(<[\d:?]+)?, ", line) is not None


def _noise(line: str) -> bool:
    return (
        "Warning" in line or line.startswith(("WARNING", "INFO", "DEBUG", "(EngineCore")) or "it/s]" in line
    )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise StageError(f"expected {path}, not found")
    return json.loads(path.read_text())


# ---- stages ------------------------------------------------------------------------------------------
def stage_world(run: Run) -> dict[str, Any]:
    from benchmarks.world.generate_world import generate_world, tokenizer_corpus
    from massv_vllm.testing.tiny import train_tokenizer

    spec = run.sizes.spec
    meta = generate_world(run.world, run.sizes.world, seed=run.seed, spec=spec)
    n_corpus = 2000 if run.sizes.name == "full" else 300
    train_tokenizer(
        run.p("tokenizer"), "qwen2_5_vl", tokenizer_corpus(n_corpus, run.seed, spec), run.sizes.vocab_size
    )
    from transformers import AutoTokenizer

    n_tok = len(AutoTokenizer.from_pretrained(str(run.p("tokenizer"))))
    return {"records": meta["records"], "tokenizer_size": n_tok}


def stage_target(run: Run) -> dict[str, Any]:
    from benchmarks.world.train_target import train_target

    s = train_target(run.world, run.p("tokenizer"), run.target, run.sizes.target, run.sizes.dtype, run.seed)
    return _trim_training(s) | {
        "attribute_accuracy": s["attribute_accuracy"],
        "chance_attribute_accuracy": s["chance_attribute_accuracy"],
        "eval_accuracy": s["eval_accuracy"],
        "val_history": s["val_history"],
    }


def stage_small_lm(run: Run) -> dict[str, Any]:
    from benchmarks.world.train_lm import train_lm

    s = train_lm(run.world, run.p("tokenizer"), run.p("small_lm"), run.sizes.lm, run.sizes.dtype, run.seed)
    return _trim_training(s) | {k: s[k] for k in ("held_out_loss_before", "held_out_loss_after")}


def _trim_training(s: dict[str, Any]) -> dict[str, Any]:
    curve = s["loss_curve"]
    k = max(1, len(curve) // 10)
    return {
        "parameters": s["parameters"],
        "steps": s["steps"],
        "stop_reason": s["stop_reason"],
        "train_seconds": s["train_seconds"],
        "loss_first": sum(v for _, v in curve[:k]) / k,
        "loss_last": sum(v for _, v in curve[-k:]) / k,
        "loss_curve": curve,
    }


def stage_drafters(run: Run) -> dict[str, Any]:
    from massv_vllm.build import build_drafter
    from massv_vllm.training.modeling import MassvDrafter

    out = {}
    for name, text_only in (("massv-init", False), ("text-only", True)):
        d = build_drafter(
            run.p("small_lm"), run.target, run.p(f"drafters/{name}"), text_only=text_only, seed=run.seed
        )
        m = MassvDrafter.from_pretrained(d)
        out[name] = {
            "path": str(d.relative_to(run.out)),
            "projector_parameters": sum(p.numel() for p in m.projector.parameters()) if m.projector else 0,
        }
    return out


# The drafter-training and benchmark stages call the project's scripts through their command lines
# (train/README.md, benchmarks/README.md), each in its own process.
ZERO0 = "train/configs/zero0.json"


def _train_args(run: Run, epochs: float, batch: int, lr: float) -> list[Any]:
    """Options shared by phase 1 and SDViT. ``--resume`` continues a killed run from its last
    checkpoint and starts from scratch when there is none, so a rerun never repeats work. Every
    training run shares one feature cache (keyed by target and image content): the parallel stage
    reads the features phase 1 and SDViT computed (on the GPU, computing them again took ~4 of its
    6 minutes)."""
    return [
        "--deepspeed_config", REPO / ZERO0, "--epochs", epochs, "--global-batch-size", batch,
        "--micro-batch-size", batch, "--lr", lr, "--warmup-ratio", 0.05, "--seed", run.seed, "--resume",
        "--feature-cache", run.p("feature-cache"),
    ]  # fmt: skip


def _on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def _cpu_threads(run: Run) -> int | None:
    return run.sizes.cpu_threads if _on_cpu() else None


def _phase1(run: Run, stage: str, out: str, extra: Sequence[Any] = ()) -> dict[str, Any]:
    """Phase 1 (``train/pretrain_projector.py``) from the untrained MASSV drafter into ``out``."""
    script = require_script(stage, "train/pretrain_projector.py")
    d = run.sizes.drafter
    args = [script, "--drafter", run.p("drafters/massv-init"), "--target", run.target,
            "--data", run.world / "captions.json", "--out", run.p(out)]  # fmt: skip
    train = _train_args(run, d.phase1_epochs, d.phase1_batch_size, d.phase1_lr)
    log_path = run.p(f"logs/{out.replace('/', '-')}.log")
    run_cmd(stage, [*args, *train, *extra], log_path, threads=_cpu_threads(run))
    return _training_result(run.p(out))


def _sdvit(run: Run, stage: str, drafter: str, out: str, extra: Sequence[Any] = ()) -> dict[str, Any]:
    """SDViT (``train/sdvit.py``) of the phase-1 drafter in ``drafter`` on the generated answers."""
    script = require_script(stage, "train/sdvit.py")
    d = run.sizes.drafter
    args = [script, "--drafter", run.p(drafter), "--target", run.target,
            "--data", run.p("generate/generated.jsonl"), "--out", run.p(out),
            "--image-root", run.world]  # fmt: skip  # the generated data's images live in the world
    train = _train_args(run, d.sdvit_epochs, d.sdvit_batch_size, d.sdvit_lr)
    log_path = run.p(f"logs/{out.replace('/', '-')}.log")
    run_cmd(stage, [*args, *train, *extra], log_path, threads=_cpu_threads(run))
    return _training_result(run.p(out))


def stage_phase1(run: Run) -> dict[str, Any]:
    return _phase1(run, "phase1", "phase1")


def stage_generate(run: Run) -> dict[str, Any]:
    script = require_script("generate", "train/generate.py")
    d = run.sizes.drafter
    out = run.p("generate")
    args = [script, "--target", run.target, "--data", run.world / "instructions.json", "--out", out,
            "--max-tokens", d.gen_max_tokens, "--responses-per-prompt", 1, "--seed", run.seed,
            "--max-model-len", d.max_model_len, "--shard-size", d.gen_shard_size]  # fmt: skip
    run_cmd("generate", args, run.p("logs/generate.log"), vllm_cpu=_on_cpu())
    return _generation_result(run, out / "generated.jsonl")


def stage_sdvit(run: Run) -> dict[str, Any]:
    return _sdvit(run, "sdvit", DRAFTER_DIRS["massv-no-sdvit"], "sdvit")


def stage_parallel(run: Run) -> dict[str, Any]:
    """The MASSV recipe again (same data, sizes and seed), both phases with the parallel-drafting
    loss for γ tokens added; skipped when the preset's ablation leaves the parallel drafter out."""
    d = run.sizes.drafter
    if not any(n in PARALLEL_DRAFTERS for n in d.ablation_drafters):
        return {"skipped": "the preset's ablation has no parallel drafter"}
    extra = ["--parallel-draft-tokens", d.gamma, "--parallel-anchors", d.parallel_anchors]
    return {
        "gamma": d.gamma,
        "phase1": _phase1(run, "parallel", "parallel/phase1", extra),
        "sdvit": _sdvit(run, "parallel", "parallel/phase1/drafter", "parallel/sdvit", extra),
    }


def drafter_arg(run: Run, name: str) -> str:
    """``name``'s folder as the benchmarks take it (``parallel:FOLDER`` for a parallel drafter)."""
    return ("parallel:" if name in PARALLEL_DRAFTERS else "") + str(run.p(DRAFTER_DIRS[name]))


def _training_result(out: Path) -> dict[str, Any]:
    """Loss trend of a phase-1/SDViT run, read from its ``train_log.jsonl`` step events."""
    log_path = out / "train_log.jsonl"
    if not log_path.is_file():
        raise StageError(f"expected {log_path}, not found")
    curve = []
    for line in log_path.read_text().splitlines():
        ev = json.loads(line) if line.strip() else {}
        if ev.get("event") == "step":
            curve.append((int(ev["step"]), float(ev["loss"])))
    if not curve:
        raise StageError(f"{log_path} holds no training steps")
    if not (out / "drafter" / "config.json").is_file():
        raise StageError(f"no trained drafter in {out / 'drafter'}")
    k = max(1, len(curve) // 10)
    return {
        "drafter": str(out / "drafter"),
        "steps": len(curve),
        "loss_first": sum(v for _, v in curve[:k]) / k,
        "loss_last": sum(v for _, v in curve[-k:]) / k,
        "loss_curve": curve,
    }


def _scored_samples(run: Run, split: str) -> dict[str, dict[str, Any]]:
    from benchmarks.world.generate_world import load_split

    return {r["id"]: r for r in load_split(run.world, split)}


def _accuracy(pairs: list[tuple[dict[str, Any], str]]) -> dict[str, dict[str, Any]]:
    """Per-task accuracy of (data-file sample, answer) pairs, recomputed from the answer text."""
    from benchmarks.world.generate_world import score_answer

    per: dict[str, list[bool]] = {}
    for sample, answer in pairs:
        per.setdefault(sample["task"], []).append(score_answer(sample["task"], answer, sample))
    return {t: {"n": len(v), "accuracy": sum(v) / len(v)} for t, v in sorted(per.items())}


def _generation_result(run: Run, path: Path) -> dict[str, Any]:
    """How many responses the target wrote and how often they are right (greedy ones and all)."""
    if not path.is_file():
        raise StageError(f"stage generate wrote no {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    samples = _scored_samples(run, "instructions")
    greedy, every = [], []
    for r in rows:
        sample = samples.get(r.get("source_id"))
        answer = next((t["value"] for t in r["conversations"] if t["from"] == "gpt"), None)
        if sample is None or answer is None:
            continue
        every.append((sample, answer))
        if r.get("sampling", {}).get("temperature") == 0:
            greedy.append((sample, answer))
    return {
        "path": str(path),
        "responses": len(rows),
        "accuracy_greedy": _accuracy(greedy),
        "accuracy_all": _accuracy(every),
    }


def stage_ablation(run: Run) -> dict[str, Any]:
    """vLLM acceptance + speed-up per drafter (``benchmarks.ablation``; TVD is its own stage)."""
    require_script("ablation", "benchmarks/ablation.py")
    d = run.sizes.drafter
    out = run.p("ablation")
    args = ["-m", "benchmarks.ablation", "--target", run.target, "--eval", run.world / "eval.json",
            "--drafters", *(f"{n}={drafter_arg(run, n)}" for n in d.ablation_drafters),
            "--gamma", d.gamma, "--temperatures", "0", "1", "--batch-size", d.ablation_batch_size,
            "--max-tokens", d.ablation_max_tokens, "--no-tvd", "--out", out]  # fmt: skip
    if d.ablation_limit is not None:
        args += ["--limit", d.ablation_limit]
    if run.sizes.enforce_eager:  # short jobs: skip CUDA-graph capture at each engine start
        args += ["--engine-arg", "enforce_eager=true"]
    args += ["--engine-arg", f"max_model_len={d.max_model_len}"]
    run_cmd("ablation", args, run.p("logs/ablation.log"), vllm_cpu=_on_cpu())
    doc = _read_json(out / "ablation.json")
    return {
        "gamma": doc["gamma"],
        "tasks": doc["tasks"],
        "table": doc["table"],
        "exactness": doc["exactness"],
        "drafters": doc["drafters"],
        "startup_s": {
            m: v["startup_s"] for m, v in _read_json(out / "acceptance/results.json")["modes"].items()
        },
        "target_vllm_greedy_accuracy": _vllm_greedy_accuracy(run, out / "acceptance/modes/none.json"),
    }


def _vllm_greedy_accuracy(run: Run, mode_file: Path) -> dict[str, dict[str, Any]]:
    """The target's accuracy from its own T=0 outputs in vLLM (the ablation's no-speculation runs)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run.target))
    samples = _scored_samples(run, "eval")
    pairs = []
    for r in _read_json(mode_file)["runs"]:
        if r["temperature"] != 0:
            continue
        for q in r["requests"]:
            if q["id"] in samples and q["token_ids"] is not None:
                pairs.append((samples[q["id"]], tok.decode(q["token_ids"], skip_special_tokens=True).strip()))
    return _accuracy(pairs)


def stage_tvd(run: Run) -> dict[str, Any]:
    """TVD between each drafter and the target along the target's own greedy answers (transformers)."""
    require_script("tvd", "benchmarks/tvd.py")
    from benchmarks.tvd import overall, run_tvd

    d = run.sizes.drafter
    doc = run_tvd(
        run.target,
        run.world / "eval.json",
        {n: drafter_arg(run, n) for n in d.ablation_drafters},
        run.p("tvd"),
        responses="generate",
        max_new_tokens=d.ablation_max_tokens,
        limit=d.tvd_limit,
        progress=False,
    )
    return {
        "summary": overall(doc),
        "histogram": str(run.p("tvd/tvd_hist.png")),
    }


STAGE_FNS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "world": stage_world,
    "target": stage_target,
    "small_lm": stage_small_lm,
    "drafters": stage_drafters,
    "phase1": stage_phase1,
    "generate": stage_generate,
    "sdvit": stage_sdvit,
    "parallel": stage_parallel,
    "ablation": stage_ablation,
    "tvd": stage_tvd,
}


# ---- runner ---------------------------------------------------------------------------------------
def select_stages(until: str | None, stages: Sequence[str] | None, force: Sequence[str] = ()) -> list[str]:
    for s in [*(stages or []), *([until] if until else []), *force]:
        if s not in STAGES:
            raise StageError(f"unknown stage {s!r}; stages are: {', '.join(STAGES)}")
    if stages:
        return [s for s in STAGES if s in stages]
    return list(STAGES[: STAGES.index(until) + 1]) if until else list(STAGES)


FULL_COMMAND = "python -m benchmarks.world run --out runs/world"
WHY = {
    "demo": "the CPU demo (a reduced world sized for a machine without a GPU)",
    "small": "tiny smoke-test sizes (the numbers mean nothing)",
    "full": "the full-size pipeline",
}


def choose_preset(preset: str | None, has_gpu: bool) -> tuple[WorldSizes, str]:
    """The preset to run (``preset``, or by the hardware when None) and a plain sentence saying
    which one and why."""
    if preset is not None:
        if preset not in PRESETS:
            raise StageError(f"unknown preset {preset!r}; presets are: {', '.join(PRESETS)}")
        return PRESETS[preset], f"running {WHY[preset]}, as asked (--preset {preset})"
    if not has_gpu:
        return PRESETS["demo"], f"no GPU found: running {WHY['demo']}"
    return PRESETS["full"], f"GPU found: running {WHY['full']}"


def downstream(stages: Sequence[str]) -> list[str]:
    """``stages`` and every stage that depends on them, directly or not, in pipeline order."""
    hit = set(stages)
    for name in STAGES:  # STAGES is topologically ordered
        if any(d in hit for d in DEPENDS[name]):
            hit.add(name)
    return [s for s in STAGES if s in hit]


def _invalidate(run: Run, force: Sequence[str]) -> None:
    """Forget forced stages and everything built on them: markers and output folders."""
    import shutil

    for name in downstream(force):
        if run.marker(name).is_file() or any(run.p(o).exists() for o in STAGE_OUTPUTS[name]):
            log(f"stage {name}: cleared ({'forced' if name in force else 'depends on a forced stage'})")
        run.marker(name).unlink(missing_ok=True)
        for o in STAGE_OUTPUTS[name]:
            shutil.rmtree(run.p(o), ignore_errors=True)


def _check_run_dir(out: Path, sizes: WorldSizes, seed: int) -> None:
    info = out / "run.json"
    want = {"preset": sizes.name, "seed": seed}
    if info.is_file():
        have = json.loads(info.read_text())
        if {k: have.get(k) for k in want} != want:
            raise StageError(
                f"{out} holds a run with preset={have.get('preset')} seed={have.get('seed')}; this one is "
                f"preset={sizes.name} seed={seed}: use another --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        info.write_text(json.dumps(want | {"sizes": asdict(sizes)}, indent=2, default=str) + "\n")


def run_pipeline(
    out: str | Path,
    preset: str | None = None,
    until: str | None = None,
    stages: Sequence[str] | None = None,
    force: Sequence[str] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """Run the selected stages (skipping finished ones), then write and print ``DIR/summary.json``."""
    import torch

    out = Path(out).resolve()
    sizes, why = choose_preset(preset, torch.cuda.is_available())
    log(why)
    _check_run_dir(out, sizes, seed)
    run = Run(out, sizes, seed)
    if sizes.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(sizes.cpu_threads)
    _invalidate(run, force)
    ran: dict[str, float] = {}
    for name in select_stages(until, stages, force):
        marker = run.marker(name)
        if marker.is_file() and name not in force:
            log(f"stage {name}: already done ({json.loads(marker.read_text())['seconds']:.1f}s), skipped")
            continue
        missing = [d for d in DEPENDS[name] if not run.marker(d).is_file()]
        if missing:
            raise StageError(
                f"stage {name} needs stage(s) {', '.join(missing)} first (run them, or drop --stages)"
            )
        log(f"stage {name}: start")
        t0 = time.perf_counter()
        result = STAGE_FNS[name](run)
        secs = time.perf_counter() - t0
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {"stage": name, "seconds": secs, "preset": sizes.name, "result": result},
                indent=2,
                default=str,
            )
            + "\n"
        )
        tmp.replace(marker)
        ran[name] = secs
        log(f"stage {name}: done in {secs:.1f}s")
    summary = build_summary(run, why, ran)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(format_summary(summary), flush=True)
    return summary


# ---- summary ------------------------------------------------------------------------------------------
def build_summary(run: Run, why: str, ran: dict[str, float]) -> dict[str, Any]:
    stages = {}
    for name in STAGES:
        m = run.marker(name)
        if m.is_file():
            stages[name] = {
                "seconds": round(json.loads(m.read_text())["seconds"], 1),
                "status": "ran" if name in ran else "cached",
            }
        else:
            stages[name] = {"seconds": None, "status": "not run"}
    results = {name: run.result(name) for name in STAGES}
    return {
        "preset": run.sizes.name,
        "why": why,
        "out": str(run.out),
        "seed": run.seed,
        "spec": asdict(run.sizes.spec),
        "stages": stages,
        "total_seconds": round(sum(s["seconds"] or 0 for s in stages.values()), 1),
        "results": results,
        "mal_order": mal_order(results.get("ablation")),
        "parallel_vs_sequential": parallel_ratio(results.get("ablation")),
    }


# The paper's ordering of the drafters' MAL at T=0: MASSV's two steps each help.
ORDER = ("text-only", "massv-no-sdvit", "massv")


def mal_order(ablation: dict[str, Any] | None) -> dict[str, Any] | None:
    """MAL at T=0 over all tasks per drafter, and whether text-only < MASSV without SDViT <= MASSV."""
    rows = ((ablation or {}).get("table") or {}).get("T=0")
    if not rows or not all(d in rows for d in ORDER):
        return None
    mal = {d: rows[d]["all"]["mal"] for d in ORDER}
    if any(v is None for v in mal.values()):
        return {"mal": mal, "ordered": False}
    return {"mal": mal, "ordered": mal["text-only"] < mal["massv-no-sdvit"] <= mal["massv"]}


def parallel_ratio(ablation: dict[str, Any] | None) -> dict[str, Any] | None:
    """MAL over all tasks of the parallel MASSV drafter against sequential MASSV's, per temperature."""
    table = (ablation or {}).get("table") or {}
    out = {}
    for temp, rows in table.items():
        par, seq = (rows.get(n, {}).get("all", {}).get("mal") for n in ("massv-parallel", "massv"))
        if par is not None and seq:
            out[temp] = {"massv-parallel": par, "massv": seq, "ratio": par / seq}
    return out or None


def _world_words(spec: dict[str, Any]) -> str:
    grid = spec["grid"]
    sides = (
        f"{spec['min_side']}"
        if spec["min_side"] == spec["max_side"]
        else f"{spec['min_side']}-{spec['max_side']}"
    )
    return (
        f"{len(spec['colours'])} colours, {len(spec['shapes'])} shapes, a {grid}x{grid} grid, {sides}-px "
        f"images, {len(spec['tasks'])} task{'s' if len(spec['tasks']) > 1 else ''} ({', '.join(spec['tasks'])})"
    )


def preset_note(s: dict[str, Any]) -> str | None:
    """What a run that is not the full size shows, and the command for the full-size result."""
    from benchmarks.world.sizes import FULL

    full = f"{FULL_COMMAND}` on a machine with a GPU ({_world_words(asdict(FULL.spec))})"
    if s["preset"] == "demo":
        params = ((s["results"].get("target") or {}).get("parameters") or 0) / 1e6
        return (
            f"This is the CPU demo: a reduced world ({_world_words(s['spec'])}) and a {params:.1f}M-parameter "
            f"target, sized for a machine without a GPU.\nThe full-size result comes from `{full}."
        )
    if s["preset"] == "small":
        return f"Tiny smoke-test sizes: the numbers mean nothing. The full-size result comes from `{full}."
    return None


def format_summary(s: dict[str, Any]) -> str:
    title = "CPU demo" if s["preset"] == "demo" else s["preset"]
    parts = [f"== synthetic world: {title} ==\n{s['why']}"]
    parts.append(
        format_table(
            ["stage", "status", "seconds"],
            [[k, v["status"], fmt(v["seconds"], 1)] for k, v in s["stages"].items()],
        )
    )
    parts.append(f"total stage time: {s['total_seconds']:.1f}s")
    r = s["results"]
    if r.get("world"):
        parts.append(
            f"world: {r['world']['records']} records; tokenizer {r['world']['tokenizer_size']} tokens"
        )
    if r.get("target"):
        t = r["target"]
        parts.append(
            f"target: {t['parameters'] / 1e6:.1f}M params, {t['steps']} steps ({t['stop_reason']}), "
            f"loss {t['loss_first']:.3f} -> {t['loss_last']:.3f}; attribute accuracy "
            f"{fmt(t['attribute_accuracy'], 3)} (chance {t['chance_attribute_accuracy']:.3f})"
        )
        vllm_acc = (r.get("ablation") or {}).get("target_vllm_greedy_accuracy") or {}
        gen_acc = (r.get("generate") or {}).get("accuracy_greedy") or {}
        rows = [
            [
                k,
                v["n"],
                v["accuracy"],
                (vllm_acc.get(k) or {}).get("accuracy"),
                (gen_acc.get(k) or {}).get("accuracy"),
            ]
            for k, v in t["eval_accuracy"].items()
        ]
        parts.append(
            "target accuracy, recomputed from its own answers (eval split: transformers greedy, vLLM greedy;\n"
            "instruction split: vLLM greedy responses of the generate stage)\n"
            + format_table(["task", "n", "eval (HF)", "eval (vLLM)", "instructions (vLLM)"], rows, digits=3)
        )
    if r.get("small_lm"):
        t = r["small_lm"]
        parts.append(
            f"small LM: {t['parameters'] / 1e6:.1f}M params, {t['steps']} steps, loss "
            f"{t['loss_first']:.3f} -> {t['loss_last']:.3f}, held-out "
            f"{t['held_out_loss_before']:.3f} -> {t['held_out_loss_after']:.3f}"
        )
    par = r.get("parallel") or {}
    trained = [(n, r.get(n)) for n in ("phase1", "sdvit")]
    trained += [(f"parallel {n}", par.get(n)) for n in ("phase1", "sdvit")]
    for name, t in trained:
        if t:
            parts.append(f"{name}: {t['steps']} steps, loss {t['loss_first']:.3f} -> {t['loss_last']:.3f}")
    if r.get("generate"):
        parts.append(f"generate: {r['generate']['responses']} self-distilled responses")
    if r.get("ablation"):
        parts.append(format_ablation(r["ablation"]))
    order = s.get("mal_order")
    if order:
        m = order["mal"]
        line = (
            f"MAL at T=0 over all tasks: text-only {fmt(m['text-only'], 2)} < MASSV without SDViT "
            f"{fmt(m['massv-no-sdvit'], 2)} <= MASSV {fmt(m['massv'], 2)}"
        )
        parts.append(
            line
            + (": the paper's ordering" if order["ordered"] else ": NOT the paper's ordering (see above)")
        )
    for temp, v in (s.get("parallel_vs_sequential") or {}).items():
        parts.append(
            f"parallel drafting, {temp}: MAL {fmt(v['massv-parallel'], 2)} (one drafter forward per step) "
            f"vs {fmt(v['massv'], 2)} sequential = {v['ratio']:.2f}x"
        )
    if r.get("tvd"):
        parts.append(
            "TVD (drafter vs target, along the target's greedy answers; histogram: "
            f"{r['tvd']['histogram']})\n"
            + format_table(
                ["drafter", "mean TVD", "median", "top-1 agreement", "tokens"],
                [
                    [n, v["mean"], v["median"], v["top1_agreement"], v["num_tokens"]]
                    for n, v in r["tvd"]["summary"].items()
                ],
                digits=3,
            )
        )
    note = preset_note(s) if "spec" in s else None
    if note:
        parts.append(note)
    return "\n\n".join(parts)


def format_ablation(res: dict[str, Any]) -> str:
    """Per temperature: rows = drafters, columns = tasks, cells = "MAL / speed-up"."""
    out = []
    for temp, rows in res["table"].items():
        body = [
            [d] + [f"{fmt(c[k]['mal'], 2)} / {fmt(c[k]['speedup'], 2)}x" for k in res["tasks"]]
            for d, c in rows.items()
        ]
        out.append(
            f"ablation {temp}, gamma={res['gamma']}: MAL / speed-up over no speculation "
            "(speed-up is launch-bound on models this small: read MAL)\n"
            + format_table(["drafter", *res["tasks"]], body)
        )
    ex = res.get("exactness") or {}
    if ex.get("checked"):
        out.append(
            "T=0 outputs identical with and without speculation"
            if ex.get("identical")
            else f"T=0 outputs differ between modes for {ex.get('num_mismatches')} requests"
        )
    return "\n\n".join(out)
