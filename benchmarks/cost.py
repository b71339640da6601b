"""Cost of drafting at real model shapes, without weights: step times, c, speed-up ceiling, and the
end-to-end speed-up at forced 100% acceptance.

    python -m benchmarks.cost --preset qwen2.5-vl-7b/qwen2.5-1.5b --out runs/cost      # GPU
    python -m benchmarks.cost --tiny --out /tmp/cost                                    # CPU smoke run

The tool writes model folders of the real architectures' shapes (configs only, plus a tokenizer
trained locally: vocab sizes come from the configs, which dummy weights do not care about) and
starts vLLM with ``load_format="dummy"``. Engines ("jobs"), each started once:

* ``target``:  the target alone: target decode step time per batch size (and the no-spec baseline);
* ``drafter``: the small LM alone: drafter decode step time; c = drafter step / target step;
* ``stock``:   target + the plain small LM through vLLM's stock ``draft_model`` (per γ);
* ``stock-async``: ``stock`` with ``async_scheduling=True`` (vLLM 0.26 allows it for draft models
  when asked): the reference of ``massv-async`` at the same settings;
* ``stock-vanilla``: ``stock`` with no massv-vllm code in its engine process (a spawned process
  under ``VLLM_PLUGINS=""``; checked: its engine reports no patch applied). ``stock`` over it is
  what massv-vllm's plugin costs a plain ``draft_model`` user. A run with this job spawns every
  engine, so that the pair differs only in the plugin (Qwen2.5-VL only: vLLM 0.26 does not start a
  Gemma3-12B + 1B speculative engine without the KV-window fix);
* ``massv``:   target + the MASSV drafter (same small LM + projector) through ``"massv"`` (per γ);
* ``massv-stockloop``: the same with vLLM's own draft loop (``MASSV_FAST_DRAFT=0``), the "before";
* ``massv-async``: ``massv`` with ``async_scheduling=True``;
* ``massv-stepgraphs`` (``-async``): ``massv`` (``-async``) with the first draft pass of decode steps
  left to vLLM (``MASSV_FAST_DRAFT_FIRST_PASS=0``; the default until 2026-11-30's seventh session);
* ``massv-onegraph`` (``-async``): ``massv`` (``-async``) with draft steps 2..γ as one graph per
  proposal (``MASSV_FAST_DRAFT_ONE_GRAPH=1``);
* ``massv-parallel``: ``massv`` with ``"parallel_drafting": true`` (one drafter forward proposes all
  γ tokens; the drafter folder names a mask token, ``pard_token``). Its ceiling counts one drafter
  forward, approximated by the drafter's own decode step time; ``massv-parallel-async`` the same with
  ``async_scheduling=True``; ``massv-parallel-vllmpass`` (``-async``) with that one draft pass left
  to vLLM (``MASSV_FAST_DRAFT_FIRST_PASS=0``).

Patch switches set by the caller (``MASSV_FAST_DRAFT_FIRST_PASS=0`` ...) reach every engine: they
are part of the run's key, and each engine's switches (the caller's and its job's) are written
beside its results (``engines.<job>.env`` in ``cost.json``).

``--interleave`` starts the run's engines together (an equal share of GPU memory each) and times
them in turns, one repeat each, the order reversed every other round: the host's speed, which on
the GPU machine changes within seconds, then weighs on each engine alike, and the report adds
*paired* ratios (the median over repeats of the ratio of two repeats timed side by side) to
``stock / stock-vanilla`` and ``TPOT / stock``. Their MAL is counted in the workers' step logs:
the engines of one process share vLLM's metrics.

``--only ENGINE --until-tpot B=MS ...`` times that one engine's batch size B again, in the same
engine, while its TPOT is above MS (for up to ``--until-seconds`` per batch size): a host-bound
engine can then be caught in one of the host's fast spells at ~10 s a try. The table takes the
last timing; the job file and the report keep every earlier one.

``--profile N`` also profiles N decode steps of every speculative engine at each batch size (torch
profiler in the worker, ``benchmarks.cost_ext.CostProbe``) and reports host and GPU milliseconds
per engine step for each phase: target verify, input preparation, sampling and rejection, each
draft forward, attention metadata, the image path, and host time blocked in device syncs.

Every engine zeroes both models' final norms (``benchmarks.cost_ext.CostProbe``): all greedy
tokens become id 0, so acceptance is forced to 100% at unchanged cost, and the measured speed-up
of ``stock``/``massv`` over ``target`` is the real ceiling of this drafter at this γ. The table
also shows the analytical ceiling τ/(γ·c + 1) at the MALs given with ``--mal`` (2.46 and 3.20:
text-only and MASSV on Qwen2.5-VL-7B in the paper) and at τ = γ + 1 (100% acceptance), next to the
measured one.

Decode time per token (TPOT) is the steady decode step time over the tokens a request gains per
step (1, or γ + 1 at forced acceptance): the median duration of the engine steps that decode the
whole batch and nothing else, timed in the worker (``measure``), over n decode tokens with
``ignore_eos``; a spec engine decodes whole forced-acceptance steps. The median of ``--repeats``
runs is reported with their fastest and their spread, and each repeat records the host's CPU
steal and the container's quota throttling (``host_sample``) and how fast the engine's process
and this frontend process run a fixed Python loop (``cost_ext.python_speed_us``): on the GPU
machine, a VM, spec engines' repeats were bimodal, with the engine's loop slower in the slow ones.
Two older estimates stay beside it: ``engine_tpot_ms`` from vLLM's per-request first/last-token
timestamps (at B > 1 it carries the prefills of requests that reached the engine later) and
``wall_tpot_ms``, (time(n + 1 tokens) - time(1 token)) / n.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import cli
from benchmarks.cost_ext import SLOW_HOST_EFFECT, SLOW_HOST_US, WATCHDOG_ENV, python_speed_us, slow_host
from benchmarks.cpus import choose_cpus, pinned
from benchmarks.report import (
    META_SCHEMA,
    NUM,
    ListOf,
    MapOf,
    Opt,
    check_schema,
    fmt,
    format_table,
    machine_id,
    run_metadata,
    write_json,
)
from massv_vllm.metrics import SpecCounters, speedup, speedup_ceiling

RESULTS_VERSION = 1
# The MASSV engines, "before" (vLLM's own draft loop) first: its result is saved even if a later
# engine fails.
MASSV_MODES = (
    "massv-stockloop",
    "massv",
    "massv-async",
    "massv-stepgraphs",
    "massv-stepgraphs-async",
    "massv-onegraph",
    "massv-onegraph-async",
    "massv-parallel",
    "massv-parallel-async",
    "massv-parallel-vllmpass",
    "massv-parallel-vllmpass-async",
)
STOCK_MODES = ("stock", "stock-async", "stock-vanilla")
JOBS = ("target", "drafter", *STOCK_MODES, *MASSV_MODES)
# stock-vanilla only when asked: it spawns every engine of its run and has no Gemma3 engine.
DEFAULT_JOBS = tuple(j for j in JOBS if j != "stock-vanilla")
PARALLEL_MODES = tuple(m for m in MASSV_MODES if m.startswith("massv-parallel"))
# Drafter forwards per spec step: γ sequential ones, or one for parallel drafting.
DRAFT_FORWARDS = {m: (lambda gamma: 1) for m in PARALLEL_MODES}
# Engine-process environment per job: "massv-stockloop" is MASSV on vLLM's own draft loop (the
# starting point of the fast-drafting work), "massv" the full-graph loop (patches/_draft_loop.py)
# with its defaults; the others turn one of its switches.
VLLM_PASS = {"MASSV_FAST_DRAFT_FIRST_PASS": "0"}
ONE_GRAPH = {"MASSV_FAST_DRAFT_ONE_GRAPH": "1"}
# "stock-vanilla": no massv-vllm plugin in the engine process. A forked engine would inherit the
# patches this process already applied or scheduled, so it is spawned, and so is every engine of
# its run (SPAWN): fork and spawn are not compared.
SPAWN = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
VANILLA = {"VLLM_PLUGINS": "", **SPAWN}
JOB_ENV = {
    "stock-vanilla": VANILLA,
    "massv-stockloop": {"MASSV_FAST_DRAFT": "0"},
    "massv-stepgraphs": VLLM_PASS,
    "massv-stepgraphs-async": VLLM_PASS,
    "massv-onegraph": ONE_GRAPH,
    "massv-onegraph-async": ONE_GRAPH,
    "massv-parallel-vllmpass": VLLM_PASS,
    "massv-parallel-vllmpass-async": VLLM_PASS,
}
# Engine arguments per job on top of the shared ones: "massv-async" overlaps the host's scheduling
# and input preparation with the GPU (vLLM allows async scheduling for draft models when asked).
ASYNC = {"async_scheduling": True}
JOB_KW = {m: ASYNC for m in (*STOCK_MODES, *MASSV_MODES) if m.endswith("-async")}
# Each MASSV mode's TPOT is reported over the stock engine of the same scheduling.
STOCK_OF = {"massv": "stock", "massv-stockloop": "stock", "massv-async": "stock-async"}
# What the plugin costs stock draft_model: the stock engine over the one without massv-vllm.
PLUGIN_EFFECT = ("stock", "stock-vanilla")
# Speculative-config keys per job on top of the MASSV drafter and γ.
PARALLEL = {"parallel_drafting": True}
JOB_SPEC = {m: PARALLEL for m in PARALLEL_MODES}
EXTENSION = "benchmarks.cost_ext.CostProbe"
WATCHDOG_S = 240.0  # an engine job still measuring after this long prints its stacks

# ---- shapes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Public config values of a target VLM and its small same-family LM (weights are dummy)."""

    family: str  # "qwen2_5_vl" | "gemma3"
    target_text: dict[str, Any]
    target_vision: dict[str, Any]
    target_top: dict[str, Any]
    small: dict[str, Any]  # the small LM's text config (vocab before padding to the target's)
    processor: dict[str, Any] = field(default_factory=dict)  # kwargs of the tiny builder's processor
    tiny: bool = False
    dtype: str = "bfloat16"  # what the published checkpoints declare: vLLM's dtype="auto" follows it


QWEN25_VL_7B_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=128000,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
QWEN25_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    fullatt_block_indexes=[7, 15, 23, 31],
    window_size=112,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
)
QWEN_PIXELS = dict(min_pixels=3136, max_pixels=12845056)
# Qwen2.5-VL-32B (public config): for tensor-parallel runs (--engine-arg tensor_parallel_size=2).
QWEN25_VL_32B_TEXT = QWEN25_VL_7B_TEXT | dict(
    hidden_size=5120,
    intermediate_size=27648,
    num_hidden_layers=64,
    num_attention_heads=40,
    num_key_value_heads=8,
)
QWEN25_VL_32B_VISION = QWEN25_VL_7B_VISION | dict(intermediate_size=3456, out_hidden_size=5120)
QWEN25_1_5B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
)
QWEN25_0_5B = QWEN25_1_5B | dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14
)
GEMMA3_12B_TEXT = dict(
    hidden_size=3840,
    intermediate_size=15360,
    num_hidden_layers=48,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=1024,
    vocab_size=262208,
    max_position_embeddings=131072,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
    },
)
GEMMA3_SIGLIP = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=896,
    patch_size=14,
)
GEMMA3_1B = dict(
    hidden_size=1152,
    intermediate_size=6912,
    num_hidden_layers=26,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=512,
    vocab_size=262144,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
    rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
    },
)

PRESETS: dict[str, Preset] = {
    "qwen2.5-vl-7b/qwen2.5-1.5b": Preset(
        "qwen2_5_vl", QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION, {}, QWEN25_1_5B, QWEN_PIXELS
    ),
    "qwen2.5-vl-32b/qwen2.5-1.5b": Preset(
        "qwen2_5_vl", QWEN25_VL_32B_TEXT, QWEN25_VL_32B_VISION, {}, QWEN25_1_5B, QWEN_PIXELS
    ),
    "qwen2.5-vl-7b/qwen2.5-0.5b": Preset(
        "qwen2_5_vl", QWEN25_VL_7B_TEXT, QWEN25_VL_7B_VISION, {}, QWEN25_0_5B, QWEN_PIXELS
    ),
    "gemma3-12b/gemma3-1b": Preset(
        "gemma3",
        GEMMA3_12B_TEXT,
        GEMMA3_SIGLIP,
        {"mm_tokens_per_image": 256},
        GEMMA3_1B,
        dict(image_size=896, patch_size=14, mm_tokens_per_image=256),
    ),
    # CPU smoke test: the same code path at toy sizes (head_dim 32: the CPU attention minimum).
    "tiny-qwen": Preset(
        "qwen2_5_vl",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
        ),
        dict(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=2,
            out_hidden_size=128,
            fullatt_block_indexes=[1],
        ),
        {},
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=992,
            tie_word_embeddings=True,
        ),
        dict(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 64),
        tiny=True,
        dtype="float32",  # vLLM's CPU backend
    ),
}


@dataclass(frozen=True)
class ShapeSet:
    preset: str
    family: str
    target: Path
    small_lm: Path  # plain Qwen2/Gemma3 LM, vocab padded to the target's: the stock draft model
    drafter: Path  # MASSV drafter folder: the same LM + projector (weights: sparse placeholder)


def _tiny_dims(family: str) -> dict[str, Any]:
    if family == "qwen2_5_vl":
        return dict(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    return dict(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32, intermediate_size=64)


def _override(folder: Path, top: dict[str, Any], sections: dict[str, dict[str, Any]]) -> None:
    """Rewrite ``folder/config.json`` with new dims; derived per-layer lists are regenerated."""
    from transformers import AutoConfig

    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for name, upd in sections.items():
        d = cfg if name == "" else cfg[name]
        d.pop("layer_types", None)  # follows num_hidden_layers; rebuilt by the config class
        d.update(upd)
    cfg.update(top)
    path.write_text(json.dumps(cfg, indent=2))
    AutoConfig.from_pretrained(str(folder)).save_pretrained(str(folder))  # validate + normalise


def write_shape_set(root: str | Path, preset_name: str) -> ShapeSet:
    """Config-only target, small LM and MASSV drafter folders of ``preset_name`` under ``root``."""
    from massv_vllm.families import FAMILIES, parallel_mask_token_id
    from massv_vllm.serving.checks import (
        check_pair,
        expected_shapes,
        load_base_config,
        target_config_from_dir,
    )
    from massv_vllm.serving.config import CONFIG_KEY, MassvConfig, ProjectorConfig, TargetInfo
    from massv_vllm.testing import tiny

    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; known: {sorted(PRESETS)}")
    pre = PRESETS[preset_name]
    fam = FAMILIES[pre.family]
    root = Path(root) / preset_name.replace("/", "__")
    s = ShapeSet(preset_name, pre.family, root / "target", root / "small-lm", root / "massv-drafter")
    if (s.drafter / "done").is_file():
        return s

    if root.exists():
        shutil.rmtree(root)
    tok = tiny.train_tokenizer(root / "tokenizer", pre.family)
    # The tiny builders write processor, tokenizer, chat template and generation config exactly
    # as for the real families; their configs then get the real dimensions and the weights go.
    if pre.family == "qwen2_5_vl":
        tiny.make_qwen2_5_vl_target(
            s.target, tok, **_tiny_dims(pre.family), vision_hidden=32, vision_depth=1, **pre.processor
        )
    else:
        tiny.make_gemma3_target(
            s.target, tok, **_tiny_dims(pre.family), vision_hidden=32, vision_layers=1, **pre.processor
        )
    tiny.make_small_lm(s.small_lm, tok, pre.family, **_tiny_dims(pre.family))
    for folder in (s.target, s.small_lm):
        for w in folder.glob("*.safetensors"):
            w.unlink()
    dt = {"dtype": pre.dtype}
    _override(
        s.target,
        pre.target_top | dt,
        {"text_config": pre.target_text | dt, "vision_config": pre.target_vision},
    )
    tcfg = target_config_from_dir(s.target)
    target_vocab = fam.text_vocab_size(tcfg)
    base_vocab = int(pre.small["vocab_size"])
    # The stock draft model must match the target's vocab (vLLM checks): padded like our drafters.
    _override(s.small_lm, {}, {"": pre.small | dt | {"vocab_size": target_vocab}})
    massv = MassvConfig(
        target=TargetInfo(
            family=fam.name,
            architecture=fam.target_architectures[0],
            image_token_id=fam.image_token_id(tcfg),
            image_embed_dim=fam.image_embed_dim(tcfg),
            vocab_size=target_vocab,
        ),
        base_architecture=fam.base_architecture,
        base_vocab_size=base_vocab,
        projector=ProjectorConfig(
            input_dim=fam.image_embed_dim(tcfg),
            hidden_dim=int(pre.small["hidden_size"]),
            depth=2,
            activation="gelu",
        ),
    )
    shutil.copytree(s.small_lm, s.drafter)
    cfg = load_base_config(s.drafter, "drafter")
    setattr(cfg, CONFIG_KEY, massv.to_dict())
    cfg.architectures = [fam.drafter_architecture]
    # The mask token for parallel drafting (ignored by sequential drafting): a padding row.
    cfg.pard_token = parallel_mask_token_id(base_vocab, target_vocab, massv.target.image_token_id)
    cfg.save_pretrained(str(s.drafter))
    write_placeholder_safetensors(s.drafter / "model.safetensors", expected_shapes(cfg, massv))
    check_pair(s.drafter, tcfg, s.target)  # the same validation vLLM's "massv" path runs
    (s.drafter / "done").write_text("ok\n")
    return s


def write_placeholder_safetensors(
    path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16"
) -> Path:
    """A valid safetensors file of zeros with these tensor shapes, written as a sparse file.

    The drafter checks (``check_drafter``) read tensor names and shapes from the header; with
    ``load_format="dummy"`` vLLM never reads the data, and a sparse file costs no disk or time even
    at 1.5B parameters.
    """
    import struct

    itemsize = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "note": "massv-vllm cost placeholder"}}
    offset = 0
    for name in sorted(shapes):
        n = 1
        for d in shapes[name]:
            n *= d
        header[name] = {
            "dtype": dtype,
            "shape": list(shapes[name]),
            "data_offsets": [offset, offset + n * itemsize],
        }
        offset += n * itemsize
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)  # zero-filled, sparse on every common filesystem
    return path


# ---- timing ------------------------------------------------------------------------------------


def _prompts(
    target: Path, n: int, prompt_len: int, image_size: tuple[int, int] | None, seed: int = 0
) -> list[Any]:
    """``n`` distinct prompts: random text tokens (and one synthetic image each, if asked)."""
    import random

    from transformers import AutoProcessor

    from massv_vllm.testing.tiny import synthetic_image

    proc = AutoProcessor.from_pretrained(str(target), trust_remote_code=False)
    tok = proc.tokenizer
    special = set(tok.all_special_ids)
    pool = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if image_size is None:
            out.append({"prompt_token_ids": [rng.choice(pool) for _ in range(prompt_len)]})
            continue
        words = tok.decode([rng.choice(pool) for _ in range(prompt_len)])
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": words}]}]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        out.append(
            {"prompt": text, "multi_modal_data": {"image": synthetic_image(seed * 1000 + i, image_size)}}
        )
    return out


def _timed(llm: Any, prompts: list[Any], max_tokens: int) -> tuple[float, list[Any]]:
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    return time.perf_counter() - t0, outs


def decode_tpot_ms(outs: list[Any]) -> float | None:
    """Median over requests of the engine's own decode time per output token (ms).

    Taken from vLLM's per-request timestamps (``RequestOutput.metrics``: first and last token, engine
    core clock), so prefill and the frontend's start-up of ``generate`` stay out of it; None if the
    engine keeps no stats (``disable_log_stats``)."""
    per_req = []
    for o in outs:
        m = getattr(o, "metrics", None)
        n = getattr(m, "num_generation_tokens", 0)
        if m is None or n < 2 or not m.last_token_ts:
            return None
        per_req.append((m.last_token_ts - m.first_token_ts) / (n - 1) * 1e3)
    return statistics.median(per_req) if per_req else None


def steady_step_ms(log: list[tuple], batch_size: int) -> list[float]:
    """Durations (ms) of the logged engine steps that decode all ``batch_size`` requests and are
    followed by another such step (``CostProbe.massv_steps_start``: (start time, decode batch, ...))."""
    return [(b[0] - a[0]) * 1e3 for a, b in zip(log, log[1:]) if a[1] == b[1] == batch_size]


# cgroup v2, then v1: CPU-quota throttling of this container (microseconds, nanoseconds)
THROTTLE_FILES = (
    ("/sys/fs/cgroup/cpu.stat", "throttled_usec", 1e-3),
    ("/sys/fs/cgroup/cpu/cpu.stat", "throttled_time", 1e-6),
)


def host_sample(stat: str = "/proc/stat", throttle_files: tuple = THROTTLE_FILES) -> dict[str, float]:
    """Counters of outside interference with the host's CPUs: the whole machine's steal, idle
    (+ iowait) and total jiffies from ``/proc/stat``, and the container's CPU-quota throttled time
    (ms) from its cgroup; keys missing where the files are. Steal is time the hypervisor gave this
    VM's CPUs to someone else. The GPU machine is a VM whose spec-step timings were bimodal across
    repeats (2026-11-30: ~+10 ms per step in the slow repeats), so each repeat records these."""
    out: dict[str, float] = {}
    try:
        with open(stat) as f:
            fields = f.readline().split()
        vals = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
        if fields[0] == "cpu" and len(vals) == 8:
            # guest time is already inside user and nice
            out.update(steal=vals[7], idle=vals[3] + vals[4], total=sum(vals))
    except (OSError, ValueError, IndexError):
        pass
    for path, key, to_ms in throttle_files:
        try:
            with open(path) as f:
                stats = dict(line.split() for line in f if len(line.split()) == 2)
            out["throttled_ms"] = int(stats[key]) * to_ms
            break
        except (OSError, ValueError, KeyError):
            continue
    return out


def host_shares(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Between two ``host_sample``s: the stolen and busy shares of all CPUs' time, and the ms
    the container was throttled (None where a counter is missing)."""
    total = after.get("total", 0) - before.get("total", 0)
    jiffies = total > 0 and "total" in before and "total" in after
    throttled = "throttled_ms" in before and "throttled_ms" in after
    return {
        "steal": (after["steal"] - before["steal"]) / total if jiffies else None,
        "busy": 1 - (after["idle"] - before["idle"]) / total if jiffies else None,
        "throttled_ms": after["throttled_ms"] - before["throttled_ms"] if throttled else None,
    }


def fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _repeat(llm: Any, batch: list[Any], n: int, tokens_per_step: int, label: str = "") -> dict[str, Any]:
    """One timed repeat at ``len(batch)`` requests: a one-token run (the prefill time), then ``n + 1``
    tokens with every engine step logged in the worker."""
    b = len(batch)
    t1, _ = _timed(llm, batch, 1)
    speed = llm.collective_rpc("massv_python_speed_us")[0]  # before and after, outside the timing
    # The same loop here, in the frontend process: a slower host slows both; something in
    # the engine process (a thread holding the GIL) only the engine's.
    front = python_speed_us()
    llm.collective_rpc("massv_steps_start")
    h0 = host_sample()
    tn, outs = _timed(llm, batch, n + 1)
    cpu = host_shares(h0, host_sample())
    log = llm.collective_rpc("massv_steps_stop")[0]
    periods = steady_step_ms(log, b)
    cpu["python_us"] = (speed + llm.collective_rpc("massv_python_speed_us")[0]) / 2
    cpu["frontend_python_us"] = (front + python_speed_us()) / 2
    if not periods:
        raise RuntimeError(
            f"no two consecutive engine steps decoded all {b} requests: raise --steps ({n} tokens)"
        )
    rep = {
        "t1": t1,
        "tn": tn,
        "engine": decode_tpot_ms(outs),
        "steady": statistics.median(periods) / tokens_per_step,
        "count": len(periods),
        "cpu": cpu,
        # request-steps that decoded (logs saved before this count existed have none)
        "decoding": sum(e[2] for e in log) if all(len(e) > 2 for e in log) else None,
        "zero": all(t == 0 for o in outs for t in o.outputs[0].token_ids),
    }
    print(
        f"[cost]   {label}B={b}: TPOT {rep['steady']:.3f} ms, CPU steal {fmt_share(cpu['steal'])}"
        f" busy {fmt_share(cpu['busy'])} throttled {fmt(cpu['throttled_ms'])} ms,"
        f" Python loop: engine process {cpu['python_us']:.0f} µs,"
        f" frontend {cpu['frontend_python_us']:.0f} µs",
        file=sys.stderr,
        flush=True,
    )
    return rep


def _row(b: int, n: int, reps: list[dict[str, Any]], mal: float | None) -> dict[str, Any]:
    """One batch size's result from its repeats (``_repeat``)."""
    have = [r["engine"] for r in reps if r["engine"] is not None]
    t1, tn = statistics.median(r["t1"] for r in reps), statistics.median(r["tn"] for r in reps)
    steady = [r["steady"] for r in reps]
    return {
        "batch_size": b,
        "prefill_s": t1,
        "tpot_ms": statistics.median(steady),
        "tpot_ms_repeats": steady,
        "steady_steps": [r["count"] for r in reps],
        "cpu_repeats": [r["cpu"] for r in reps],
        "engine_tpot_ms": statistics.median(have) if have else None,
        "wall_tpot_ms": max(tn - t1, 0.0) / n * 1e3,
        "decode_tokens": n,
        "mal": mal,
        "all_tokens_zero": all(r["zero"] for r in reps),
    }


def decode_tokens(steps: int, tokens_per_step: int) -> int:
    """Decode tokens timed per repeat: ``steps`` rounded up to whole forced-acceptance steps."""
    return -(-steps // tokens_per_step) * tokens_per_step


def measure(
    llm: Any,
    prompts: list[Any],
    batch_sizes: list[int],
    steps: int,
    repeats: int,
    tokens_per_step: int = 1,
    until_tpot: dict[int, float] | None = None,
    until_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Per batch size: prefill time, decode time per output token (TPOT), MAL and token check.

    TPOT is the steady decode step time over the tokens each request gains in it (``tokens_per_step``:
    1, or γ + 1 at forced acceptance): the median duration of the engine steps that decode the whole
    batch (``steady_step_ms``), median of ``repeats`` runs. Steps that mix decodes with prefills
    stay out: ``LLM.generate`` hands requests over one by one while the engine already steps, so
    at B > 1 the request timestamps' TPOT (``engine_tpot_ms``, kept beside it) carries other
    requests' prefills. ``wall_tpot_ms`` is the oldest estimate (n tokens minus one token, over n).
    A spec engine decodes a whole number of forced-acceptance steps, so no step is cut short.

    ``until_tpot`` (batch size -> ms): time that batch size again, in this engine, while its TPOT
    is above the limit and another timing fits in ``until_s`` seconds from its first; the row is
    the last timing (the first that met the limit, or the last there was time for) and keeps the
    earlier ones in ``earlier_timings``. A host-bound engine's speed follows the host's, which
    switches within seconds to minutes: this finds a fast spell at ~10 s a try, not an engine
    start's ~2 min, and keeps every try on record."""
    n = decode_tokens(steps, tokens_per_step)
    rows = []
    for b in batch_sizes:
        batch = prompts[:b]
        # progress on stderr, so a stalled engine shows which batch size it stalled in
        print(f"[cost]   B={b}: warm-up, then {repeats} repeats", file=sys.stderr, flush=True)
        _timed(llm, batch, n + 1)  # warm-up at this batch size (graphs, allocator)
        limit = (until_tpot or {}).get(b)
        earlier: list[dict[str, Any]] = []
        end = time.monotonic() + until_s
        while True:
            t0 = time.monotonic()
            before = SpecCounters.from_llm(llm)
            reps = [_repeat(llm, batch, n, tokens_per_step) for _ in range(repeats)]
            row = _row(b, n, reps, (SpecCounters.from_llm(llm) - before).mean_accepted_length)
            now = time.monotonic()
            if limit is None or row["tpot_ms"] <= limit or now + (now - t0) > end:  # met, or none fits
                break
            earlier.append({k: row[k] for k in ("tpot_ms", "tpot_ms_repeats", "cpu_repeats")})
            print(
                f"[cost]   B={b}: TPOT {row['tpot_ms']:.3f} ms over {limit:.3f}: timing {len(earlier) + 1}",
                file=sys.stderr,
                flush=True,
            )
        if limit is not None:
            row.update(until_tpot_ms=limit, earlier_timings=earlier)
        rows.append(row)
    return rows


def measure_interleaved(
    engines: dict[str, tuple[Any, int, bool]],
    prompts: list[Any],
    batch_sizes: list[int],
    steps: int,
    repeats: int,
) -> dict[str, list[dict[str, Any]]]:
    """``measure`` for engines that run side by side (name -> (LLM, tokens per step, async
    scheduling)), one repeat of each in turn, the order reversed every other round (A B, B A, ...):
    the host's speed, which on the GPU machine changes within seconds, then weighs on each engine
    alike, and repeat i of each engine were timed next to each other (the paired ratios).

    vLLM's metrics live in the frontend process, one set for all of its engines (a new engine
    unregisters the last one's), so the MAL here is counted in the workers' step logs instead:
    decoded tokens over the request-steps that decoded them (``decoding_requests``). An async
    scheduler schedules each request once more before it sees the request finish: that step
    decodes nothing, so it is not counted (one per request and repeat; H200, 2026-12-01: 23 logged
    decode steps per request for 22 forced-acceptance steps)."""
    names = list(engines)
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for b in batch_sizes:
        batch = prompts[:b]
        print(
            f"[cost]   B={b}: warm-up of {len(names)} engines, then {repeats} rounds",
            file=sys.stderr,
            flush=True,
        )
        for llm, tps, _ in engines.values():
            _timed(llm, batch, decode_tokens(steps, tps) + 1)
        reps: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for i in range(repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                llm, tps, _ = engines[name]
                reps[name].append(_repeat(llm, batch, decode_tokens(steps, tps), tps, f"{name} "))
        for name in names:
            _, tps, ahead = engines[name]
            n = decode_tokens(steps, tps)
            decoding = [r["decoding"] for r in reps[name]]
            steps_done = None if None in decoding else sum(decoding) - (b * len(decoding) if ahead else 0)
            mal = b * n * len(decoding) / steps_done if tps > 1 and steps_done else None  # tps 1: no drafter
            out[name].append({**_row(b, n, reps[name], mal), "interleaved": names})
    return out


def profile_decode(
    llm: Any, prompts: list[Any], steps: int, tokens_per_step: int, trace: Path | None = None
) -> dict[str, Any]:
    """Per-phase host/GPU ms per engine step over ``steps`` decode steps (prefill excluded)."""
    llm.collective_rpc("massv_profile_start", args=(len(prompts),))
    # a few more steps than profiled: the full-batch decode starts only once every request is in
    _timed(llm, prompts, (steps + 3) * tokens_per_step + 1)
    return llm.collective_rpc("massv_profile_stop", args=(str(trace) if trace else None,))[0]


@contextlib.contextmanager
def started_engine(
    model: Path,
    spec: dict[str, Any] | None,
    engine_kw: dict[str, Any],
    env: dict[str, str] | None = None,
    watchdog_s: float = WATCHDOG_S,
) -> Iterator[tuple[Any, dict[str, Any]]]:
    """An engine with the probe (``CostProbe``), both models' final norms zeroed (forced
    acceptance), shut down on exit; yields (LLM, what its start recorded). Its process prints its
    Python stacks if it still runs ``watchdog_s`` after its start."""
    # This process loads vLLM's plugins (massv-vllm's among them) once, under the caller's
    # environment: a job's VLLM_PLUGINS then reaches its engine process only.
    from vllm.plugins import load_general_plugins

    from massv_vllm.engine import engine_env, make_llm, shutdown

    load_general_plugins()
    t0 = time.perf_counter()
    with engine_env({**(env or {}), WATCHDOG_ENV: str(watchdog_s)}):
        llm = make_llm(str(model), spec, **engine_kw)
    startup = time.perf_counter() - t0
    try:
        info = {
            "startup_s": startup,
            "engine_cpus": llm.collective_rpc("massv_cpu_affinity")[0],
            "patches": llm.collective_rpc("massv_patches")[0],
            "zeroed": llm.collective_rpc("massv_zero_final_norms")[0],
            # as vLLM settled it (its CPU platform turns async scheduling off)
            "async_scheduling": bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling),
        }
        zeroed = info["zeroed"]
        if not zeroed.get("target") or (spec is not None and not zeroed.get("drafter")):
            raise RuntimeError(
                f"could not find the final norms to zero (found {zeroed}); acceptance is not forced"
            )
        yield llm, info
    finally:
        shutdown(llm)


def tokens_per_step(spec: dict[str, Any] | None) -> int:
    """Tokens a request gains per engine step at forced acceptance."""
    return 1 if spec is None else spec["num_speculative_tokens"] + 1


def run_job(
    model: Path,
    spec: dict[str, Any] | None,
    prompts: list[Any],
    batch_sizes: list[int],
    steps: int,
    repeats: int,
    engine_kw: dict[str, Any],
    env: dict[str, str] | None = None,
    profile_steps: int = 0,
    trace_dir: Path | None = None,
    until_tpot: dict[int, float] | None = None,
    until_s: float = 0.0,
) -> dict[str, Any]:
    # An engine job takes ~45-80 s from its start; past WATCHDOG_S (and the timings again it may
    # take) the frontend and the engine process print their Python stacks (the engine's is armed
    # while it starts: cost_ext).
    watchdog_s = WATCHDOG_S + until_s * len(until_tpot or {})
    faulthandler.dump_traceback_later(watchdog_s, file=sys.stderr)
    try:
        with started_engine(model, spec, engine_kw, env, watchdog_s) as (llm, info):
            per_step = tokens_per_step(spec)
            rows = measure(llm, prompts, batch_sizes, steps, repeats, per_step, until_tpot, until_s)
            profile = {}
            if profile_steps and spec is not None:
                for b in batch_sizes:
                    trace = trace_dir / f"trace-b{b}.json.gz" if trace_dir else None
                    profile[str(b)] = profile_decode(llm, prompts[:b], profile_steps, per_step, trace)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return {**info, "rows": rows, "profile": profile}


def run_jobs_interleaved(
    jobs: dict[str, tuple[Path, dict[str, Any] | None, dict[str, Any], dict[str, str] | None]],
    prompts: list[Any],
    batch_sizes: list[int],
    steps: int,
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """``run_job`` for several engines at once (name -> (model, spec, engine_kw, env)): all are
    started, then measured in turns (``measure_interleaved``); the same result per name."""
    # the watchdogs (this process's, each engine's) cover all starts and every round
    watchdog_s = WATCHDOG_S * len(jobs)
    faulthandler.dump_traceback_later(watchdog_s, file=sys.stderr)
    try:
        with contextlib.ExitStack() as stack:
            started = {}
            for name, (model, spec, kw, env) in jobs.items():
                print(f"[cost] {name}: starting, to be timed in turns", file=sys.stderr, flush=True)
                started[name] = stack.enter_context(started_engine(model, spec, kw, env, watchdog_s))
            engines = {
                name: (llm, tokens_per_step(jobs[name][1]), info["async_scheduling"])
                for name, (llm, info) in started.items()
            }
            rows = measure_interleaved(engines, prompts, batch_sizes, steps, repeats)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return {name: {**info, "rows": rows[name], "profile": {}} for name, (_, info) in started.items()}


# ---- the whole run --------------------------------------------------------------------------------


def capture_sizes(batch_sizes: list[int], gammas: list[int]) -> list[int]:
    """CUDA-graph sizes for the decode shapes measured, the same list for every engine (a much
    shorter start than vLLM's ~40 default sizes, which reach 512 tokens):

    * B tokens: a decode step without speculation;
    * B·(γ+1): a verify step, and MASSV's later draft steps;
    * B·(γ+2) and B·(2γ+1): the drafter's first pass, which adds one slot per request to the
      B·(γ+1) verified tokens (γ slots with parallel drafting). Without these the first pass ran
      eagerly at B=8 in the 2026-11-30 profile (graph mode NONE), a cost vLLM's default sizes
      would not have.

    A speculative engine rounds each size up to a multiple of γ+1 and drops what then exceeds the
    largest size given, so the first-pass sizes are given already rounded for their γ."""

    def up(n: int, m: int) -> int:
        return -(-n // m) * m

    sizes = set(batch_sizes)
    for b in batch_sizes:
        for g in gammas:
            sizes |= {b * (g + 1), up(b * (g + 2), g + 1), up(b * (2 * g + 1), g + 1)}
    return sorted(sizes)


def engine_settings(
    family: str,
    batch_sizes: list[int],
    gammas: list[int],
    steps: int,
    prompt_len: int,
    image_size: tuple[int, int] | None,
    compile_backend: str,
    overrides: dict[str, Any] | None,
) -> dict[str, Any]:
    """Engine arguments shared by every job, so timings compare like with like."""
    from massv_vllm.engine import on_gpu

    image_tokens = image_size[0] * image_size[1] // 784 + 16 if image_size else 0  # ~ Qwen's 28x28 per token
    kw: dict[str, Any] = dict(
        load_format="dummy",
        worker_extension_cls=EXTENSION,
        max_model_len=max(1024, prompt_len + image_tokens + steps + 128),
        max_num_seqs=max(batch_sizes),
        enable_prefix_caching=False,  # every repeat pays the same prefill
        max_images=1,
    )
    if on_gpu() and not (overrides or {}).get("enforce_eager"):
        cc: dict[str, Any] = {"cudagraph_capture_sizes": capture_sizes(batch_sizes, gammas)}
        if compile_backend != "inductor":
            cc["backend"] = compile_backend
        kw["compilation_config"] = cc
    return kw | dict(overrides or {})


def job_engine_kw(family: str, kw: dict[str, Any], mode: str, spec: dict[str, Any] | None) -> dict[str, Any]:
    """One job's engine arguments: the shared ones, the job's own (``JOB_KW``), and for a Gemma3
    speculative engine one KV-cache group for the drafter's sliding + full layers (what the
    ``"massv"`` alias sets itself; stock ``draft_model`` needs it too). Engines without a drafter
    keep vLLM's default hybrid KV manager: it only decides which blocks stay allocated, and at the
    default settings (max_model_len 1024) no sequence outgrows Gemma3's 1024-token window, so the
    compute is the same."""
    out = kw | JOB_KW.get(mode, {})
    if family == "gemma3" and spec is not None:
        out["disable_hybrid_kv_cache_manager"] = True
    return out


def massv_env() -> dict[str, str]:
    """The patch switches set in this process (``massv_vllm.patches.envs``): every engine it starts
    inherits them."""
    from massv_vllm.patches.envs import SWITCHES

    return {k: os.environ[k] for k in sorted(SWITCHES) if k in os.environ}


def job_env(family: str, mode: str, spec: dict[str, Any] | None) -> dict[str, str] | None:
    """Environment of one job's engine: the job's own (``JOB_ENV``), and for Gemma3 engines

    - the ``spawn`` start method for the engine process: forked Gemma3-12B engines stalled in
      start-up or died with "Cannot re-initialize CUDA in forked subprocess" on the H200
      (2026-11-30, first pass of the eighth session), spawned ones started (the error was most
      likely this process's own ``torch.cuda.is_available()``, NVML-based since ec0cc96; kept
      until a Gemma3 run shows forked engines start);
    - without a drafter, vLLM's V1 model runner, which every speculative engine runs on anyway
      (Model Runner V2 refuses ``draft_model``);
    - for the stock ``draft_model`` engine, the KV-window fix (``MASSV_PATCH_KV_WINDOWS=always``;
      MASSV engines get it by default): Gemma3-12B's window (1024) and Gemma3-1B's (512) made
      vLLM 0.26 refuse to start any speculative engine of the pair."""
    env = dict(JOB_ENV.get(mode) or {})
    if family == "gemma3":
        env.update(SPAWN)
        if spec is None:
            env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        elif mode in STOCK_MODES:
            env["MASSV_PATCH_KV_WINDOWS"] = "always"
    return env or None


def job_mode(name: str) -> str:
    """The job of an engine's name: ``stock-vanilla-g5`` -> ``stock-vanilla``, ``target`` -> itself."""
    return name.rpartition("-g")[0] or name


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def target_identity(preset: str) -> dict[str, Any]:
    """What a preset's target engine is made of: presets equal here share one target engine."""
    return {k: v for k, v in asdict(PRESETS[preset]).items() if k != "small"}


def _prompt_texts(prompts: list[Any]) -> list[Any]:
    """The prompts' text or token ids (their images are fixed by seed and size in the settings)."""
    return [p.get("prompt", p.get("prompt_token_ids")) for p in prompts]


def run_cost(
    out_dir: str | Path,
    *,
    preset: str = "qwen2.5-vl-7b/qwen2.5-1.5b",
    jobs: list[str] | tuple[str, ...] = DEFAULT_JOBS,
    gammas: list[int] | tuple[int, ...] = (5,),
    batch_sizes: list[int] | tuple[int, ...] = (1, 8, 32),
    steps: int = 64,
    repeats: int = 3,
    prompt_len: int = 64,
    image_size: tuple[int, int] | None = (448, 448),
    mals: list[float] | tuple[float, ...] = (2.46, 3.20, 3.30),
    compile_backend: str = "inductor",
    engine_kw: dict[str, Any] | None = None,
    models_dir: str | Path | None = None,
    fresh: bool = False,
    profile_steps: int = 0,
    trace: bool = False,
    cpus: list[int] | None = None,
    argv: list[str] | None = None,
    shared_target: str | Path | None = None,
    interleave: bool = False,
    only: Sequence[str] | None = None,
    until_tpot: dict[int, float] | None = None,
    until_s: float = 0.0,
) -> dict[str, Any]:
    """Write the shape set, run the chosen jobs, write cost.json and return it. ``cpus``: pin the
    run and its engine processes to these CPUs (``choose_cpus``). ``interleave``: start the
    engines together and time them in turns (``measure_interleaved``), each with an equal share of
    the GPU's memory; the run's key records it.

    Each finished engine job is saved in ``out_dir/jobs/``; a later call with the same settings
    reuses it and the report covers every finished job, so the jobs can be split over several
    commands (e.g. ``--jobs target drafter``, then ``--jobs stock massv``) with one final table.
    ``shared_target``: the ``target`` job of another preset's run in the same command
    (``run_cost_presets``), taken instead of starting the target again when its target, settings
    and prompts are this run's. ``only``: run just these engines of the plan (e.g. ``stock-g5``),
    under the run's key, so a later call of the whole run reuses them. ``until_tpot`` (with one
    engine in ``only``): time it again at a batch size while its TPOT is above the limit, for up to
    ``until_s`` seconds per batch size (``measure``); it leaves the run's key alone, as its engine's
    settings are the same.
    """
    from massv_vllm.engine import massv_spec, on_gpu

    unknown = sorted(set(jobs) - set(JOBS))
    if unknown or not jobs:
        raise ValueError(f"jobs must be among {JOBS}, got {list(jobs)}")
    if any(g < 1 for g in gammas) or any(b < 1 for b in batch_sizes) or steps < 1 or repeats < 1:
        raise ValueError("gammas, batch sizes, steps and repeats must be >= 1")
    if compile_backend not in ("inductor", "eager"):
        raise ValueError("compile_backend must be 'inductor' (vLLM's default) or 'eager' (no Inductor)")
    n_engines = (
        ("target" in jobs) + ("drafter" in jobs) + len(set(jobs) - {"target", "drafter"}) * len(set(gammas))
    )
    if only and interleave:
        raise ValueError("--only picks engines to run one after another: not with --interleave")
    if until_tpot is not None and (len(set(only or ())) != 1 or set(until_tpot) - set(batch_sizes)):
        raise ValueError(
            f"--until-tpot {until_tpot} times one engine again: name it alone with --only (got {only}), "
            f"at batch sizes of the run ({sorted(batch_sizes)})"
        )
    if interleave and (n_engines < 2 or "drafter" in jobs or profile_steps or shared_target):
        raise ValueError(
            "interleave times two or more engines that take the same prompts in turns: not the "
            "drafter alone (text prompts), not with --profile, and one preset per run"
        )
    out = Path(out_dir)
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    if preset in PRESETS and PRESETS[preset].family == "gemma3" and "stock-vanilla" in jobs:
        raise ValueError(
            "stock-vanilla: vLLM 0.26 does not start a Gemma3 speculative engine without massv-vllm's "
            "KV-window fix (MASSV_PATCH_KV_WINDOWS), so there is no plugin-free stock engine to time"
        )
    shapes = write_shape_set(models_dir or out / "models", preset)
    batch_sizes = sorted(set(batch_sizes))
    gammas = sorted(set(gammas))
    kw = engine_settings(
        shapes.family, batch_sizes, gammas, steps, prompt_len, image_size, compile_backend, engine_kw
    )
    if interleave and on_gpu() and "gpu_memory_utilization" not in (engine_kw or {}):
        kw["gpu_memory_utilization"] = round(0.9 / n_engines, 3)  # vLLM's default 0.9, shared
    settings = {
        "preset": preset,
        "gammas": gammas,
        "batch_sizes": batch_sizes,
        "steps": steps,
        "repeats": repeats,
        "prompt_len": prompt_len,
        "image_size": list(image_size) if image_size else None,
        "compile_backend": compile_backend,
        "engine_kw": kw,
        "profile_steps": profile_steps,
        "gpu": on_gpu(),
    }
    if cpus:  # only when pinned, so unpinned runs keep their results' key
        settings["cpus"] = sorted(cpus)
    caller_env = massv_env()
    if caller_env:  # switches set by the caller reach every engine: not reusable under others
        settings["massv_env"] = caller_env
    spawn_all = "stock-vanilla" in jobs
    if spawn_all:  # forked engines' results are not reused in such a run
        settings["start_method"] = "spawn"
    if interleave:
        settings["interleave"] = True
    key = _key(settings)
    prompts = _prompts(shapes.target, max(batch_sizes), prompt_len, image_size)
    # The target engine does not depend on the drafter: its key names the target and the prompts.
    target_key = _key({**settings, "preset": target_identity(preset), "prompts": _prompt_texts(prompts)})
    plan: list[tuple[str, Path, dict[str, Any] | None]] = []  # (job-gγ, model, speculative config)
    if "target" in jobs:
        plan.append(("target", shapes.target, None))
    if "drafter" in jobs:
        plan.append(("drafter", shapes.small_lm, None))
    for g in gammas:
        for mode in STOCK_MODES:
            if mode in jobs:
                spec = {"method": "draft_model", "model": str(shapes.small_lm), "num_speculative_tokens": g}
                plan.append((f"{mode}-g{g}", shapes.target, spec))
        for mode in MASSV_MODES:
            if mode in jobs:
                spec = massv_spec(str(shapes.drafter), g, **JOB_SPEC.get(mode, {}))
                plan.append((f"{mode}-g{g}", shapes.target, spec))

    if only:
        names = [name for name, *_ in plan]
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"--only {unknown}: this run's engines are {names}")
        plan = [job for job in plan if job[0] in only]

    def reusable(name: str) -> bool:
        path = out / "jobs" / f"{name}.json"
        return not fresh and path.is_file() and json.loads(path.read_text()).get("key") == key

    todo = [job for job in plan if not reusable(job[0])]
    if interleave and todo:
        todo = plan  # timed in turns: all of them, or their repeats are not pairs
    for name, *_ in plan:
        if all(name != t[0] for t in todo):
            print(f"[cost] {name}: reusing {out / 'jobs' / f'{name}.json'}", file=sys.stderr, flush=True)

    def save(name: str, res: dict[str, Any], env: dict[str, str] | None, wall_s: float) -> None:
        if name.startswith("stock-vanilla-") and res.get("patches") != []:  # unproven is not plugin-free
            raise RuntimeError(
                f"{name}: its engine ran with massv-vllm patches applied ({res.get('patches')})"
            )
        record = {"key": key, "name": name, "env": caller_env | (env or {}), "machine": machine_id(), **res}
        record["wall_s"] = wall_s  # start, measure, shut down: what a session budgets
        if name == "target":
            record["target_key"] = target_key
        write_json(out / "jobs" / f"{name}.json", record)  # checkpoint per engine

    def env_of(name: str, spec: dict[str, Any] | None) -> dict[str, str] | None:
        env = job_env(shapes.family, job_mode(name), spec)
        return {**(env or {}), **SPAWN} if spawn_all else env

    if interleave and todo:
        jobs_kw = {
            name: (model, spec, job_engine_kw(shapes.family, kw, job_mode(name), spec), env_of(name, spec))
            for name, model, spec in todo
        }  # fmt: skip
        t0 = time.perf_counter()
        with pinned(cpus):
            done = run_jobs_interleaved(jobs_kw, prompts, batch_sizes, steps, repeats)
        for name, res in done.items():  # the run's wall time, shared out
            save(name, res, jobs_kw[name][3], (time.perf_counter() - t0) / len(done))
        todo = []
    for name, model, spec in todo:
        path = out / "jobs" / f"{name}.json"
        if name == "target" and shared_target and Path(shared_target).is_file():
            shared = json.loads(Path(shared_target).read_text())
            if shared.get("target_key") == target_key:
                print(f"[cost] target: the same engine as {shared_target}", file=sys.stderr, flush=True)
                # its wall time stays with the preset that ran it: this run started no engine for it
                write_json(path, {**shared, "key": key, "shared_from": str(shared_target), "wall_s": None})
                continue
            print(f"[cost] target: {shared_target} differs (target, settings or prompts): run again",
                  file=sys.stderr, flush=True)  # fmt: skip
        print(f"[cost] {name} ...", file=sys.stderr, flush=True)
        # The small LM alone gets text prompts as long as the target's (image placeholders included).
        job_prompts = (
            _prompts(shapes.target, max(batch_sizes), prompt_len, None) if name == "drafter" else prompts
        )
        mode = job_mode(name)
        trace_dir = out / "traces" / name if profile_steps and trace else None
        if trace_dir:
            trace_dir.mkdir(parents=True, exist_ok=True)
        env = env_of(name, spec)
        t0 = time.perf_counter()
        with pinned(cpus):
            res = run_job(
                model,
                spec,
                job_prompts,
                batch_sizes,
                steps,
                repeats,
                job_engine_kw(shapes.family, kw, mode, spec),
                env=env,
                profile_steps=profile_steps,
                trace_dir=trace_dir,
                until_tpot=until_tpot,
                until_s=until_s,
            )
        save(name, res, env, time.perf_counter() - t0)
    results = {}
    for path in sorted((out / "jobs").glob("*.json")):
        res = json.loads(path.read_text())
        if res.get("key") == key:
            results[res["name"]] = res
    found_gammas = sorted({int(n.rpartition("-g")[2]) for n in results if "-g" in n})
    doc = {
        "version": RESULTS_VERSION,
        "meta": run_metadata({**settings, "jobs_run": [p[0] for p in plan], "mals": list(mals)}, argv),
        "preset": preset,
        "folders": {
            "target": str(shapes.target),
            "small_lm": str(shapes.small_lm),
            "drafter": str(shapes.drafter),
        },
        "engines": {
            k: {
                "startup_s": v["startup_s"],
                "wall_s": v.get("wall_s"),
                "zeroed": v["zeroed"],
                "cpus": v.get("engine_cpus"),
                "env": v.get("env", {}),
                "machine": v.get("machine"),
                "patches": v.get("patches"),  # None: saved before engines reported them
            }
            for k, v in results.items()
        },
        # a run split over calls may have lost its machine in between: ratios across machines differ
        "machines": sorted({v["machine"] for v in results.values() if v.get("machine")}),
        **summarise(results, batch_sizes, found_gammas, list(mals)),
        "profile": {k: v["profile"] for k, v in results.items() if v.get("profile")},
    }
    problems = check_schema(doc, SCHEMA)
    if problems:
        raise AssertionError("cost.json does not match its schema:\n" + "\n".join(problems))
    write_json(out / "cost.json", doc)
    return doc


PAIRED_NOTE = "(medians; paired: median over repeats of the ratio of two repeats timed in turn, --interleave)"


def paired_ratio(row: dict[str, Any], other: dict[str, Any]) -> float | None:
    """Median over repeats i of TPOT_i(row) / TPOT_i(other), for two engines timed in turns in one
    run (``measure_interleaved``), so that each pair of repeats ran seconds apart; None otherwise."""
    a, b = row.get("tpot_ms_repeats", []), other.get("tpot_ms_repeats", [])
    if (
        not a
        or not row.get("interleaved")
        or row["interleaved"] != other.get("interleaved")
        or len(a) != len(b)
    ):
        return None
    return statistics.median([x / y for x, y in zip(a, b)])


def summarise(
    results: dict[str, Any], batch_sizes: list[int], gammas: list[int], mals: list[float]
) -> dict[str, Any]:
    """Step times, c, analytical ceilings and measured end-to-end speed-ups from the job rows."""
    rows = {name: {r["batch_size"]: r for r in res["rows"]} for name, res in results.items()}

    def tpot(name: str, b: int) -> float | None:
        return rows.get(name, {}).get(b, {}).get("tpot_ms")

    step_ms = {k: {str(b): tpot(k, b) for b in batch_sizes} for k in ("target", "drafter") if k in rows}
    c = {}
    for b in batch_sizes:
        t, d = tpot("target", b), tpot("drafter", b)
        c[str(b)] = d / t if t and d else None
    ceiling = []
    for b in batch_sizes:
        for g in gammas:
            for tau in [*(m for m in mals if m <= g + 1), float(g + 1)]:  # τ can't exceed γ + 1
                cb = c[str(b)]
                ceiling.append(
                    {
                        "batch_size": b,
                        "gamma": g,
                        "mal": tau,
                        "speedup": None if cb is None else speedup_ceiling(tau, g, cb),
                    }
                )
    e2e = []
    for name in rows:
        if name == "drafter":
            continue
        mode, _, g = name.rpartition("-g") if "-g" in name else (name, "", "")
        gamma = int(g) if g else None
        for b in batch_sizes:
            r = rows[name][b]
            cb = c.get(str(b))
            e2e.append(
                {
                    "mode": "none" if mode == "target" else mode,
                    "gamma": gamma,
                    "batch_size": b,
                    "tpot_ms": r["tpot_ms"],
                    # per repeat, so the spread of a cell is on record (older jobs lack them)
                    "tpot_ms_repeats": r.get("tpot_ms_repeats", []),
                    # jobs saved before a counter existed have it as null
                    "cpu_repeats": [{"frontend_python_us": None, **c} for c in r.get("cpu_repeats", [])],
                    "engine_tpot_ms": r.get("engine_tpot_ms"),
                    "wall_tpot_ms": r.get("wall_tpot_ms", r["tpot_ms"]),
                    "prefill_s": r["prefill_s"],
                    "mal": r["mal"],
                    "all_tokens_zero": r["all_tokens_zero"],
                    # --until-tpot: the limit and the timings before the one above (none: not timed again)
                    "until_tpot_ms": r.get("until_tpot_ms"),
                    "earlier_timings": r.get("earlier_timings", []),
                    "speedup_vs_none": speedup(tpot("target", b), r["tpot_ms"]),
                    "predicted_full_acceptance": None
                    if gamma is None or cb is None
                    else speedup_ceiling(gamma + 1, DRAFT_FORWARDS.get(mode, lambda g: g)(gamma), cb),
                    # What a drafter of mean accepted length τ would get with this engine's
                    # measured spec-step time (= TPOT at forced acceptance × (γ + 1)).
                    "predicted_at_mal": {}
                    if gamma is None
                    else {
                        f"{tau:.2f}": speedup(tpot("target", b), r["tpot_ms"] * (gamma + 1) / tau)
                        for tau in mals
                        if tau <= gamma + 1
                    },
                }
            )
    overhead = []
    for g in gammas:
        for b in batch_sizes:
            for mode, stock in STOCK_OF.items():
                s, m = tpot(f"{stock}-g{g}", b), tpot(f"{mode}-g{g}", b)
                if s and m:
                    overhead.append(
                        {
                            "mode": mode,
                            "gamma": g,
                            "batch_size": b,
                            "massv_over_stock_tpot": m / s,
                            "paired_massv_over_stock": paired_ratio(
                                rows[f"{mode}-g{g}"][b], rows[f"{stock}-g{g}"][b]
                            ),
                        }
                    )
    plugin = []
    for g in gammas:
        for b in batch_sizes:
            names = [f"{mode}-g{g}" for mode in PLUGIN_EFFECT]
            s, v = (tpot(n, b) for n in names)
            if s and v:
                plugin.append(
                    {
                        "gamma": g,
                        "batch_size": b,
                        "stock_over_vanilla_tpot": s / v,
                        "paired_stock_over_vanilla": paired_ratio(*(rows[n][b] for n in names)),
                    }
                )
    return {
        "step_ms": step_ms,
        "cost_ratio": c,
        "ceiling": ceiling,
        "e2e": e2e,
        "massv_overhead": overhead,
        "plugin_effect": plugin,
    }


SCHEMA = {
    "version": int,
    "meta": META_SCHEMA,
    "preset": str,
    "folders": {"target": str, "small_lm": str, "drafter": str},
    "engines": MapOf(
        {
            "startup_s": NUM,
            "wall_s": Opt(NUM),
            "zeroed": MapOf(ListOf(str)),
            "cpus": Opt(ListOf(int)),
            "env": MapOf(str),
            "machine": Opt(str),
            "patches": Opt(ListOf(str)),
        }
    ),
    "machines": ListOf(str),
    "step_ms": MapOf(MapOf(Opt(NUM))),
    "cost_ratio": MapOf(Opt(NUM)),
    "ceiling": ListOf({"batch_size": int, "gamma": int, "mal": NUM, "speedup": Opt(NUM)}),
    "e2e": ListOf(
        {
            "mode": str,
            "gamma": Opt(int),
            "batch_size": int,
            "tpot_ms": NUM,
            "tpot_ms_repeats": ListOf(NUM),
            "cpu_repeats": ListOf(
                {
                    "steal": Opt(NUM),
                    "busy": Opt(NUM),
                    "throttled_ms": Opt(NUM),
                    "python_us": NUM,
                    "frontend_python_us": Opt(NUM),
                }
            ),
            "engine_tpot_ms": Opt(NUM),
            "wall_tpot_ms": NUM,
            "prefill_s": NUM,
            "mal": Opt(NUM),
            "all_tokens_zero": bool,
            "until_tpot_ms": Opt(NUM),
            "earlier_timings": ListOf({"tpot_ms": NUM, "tpot_ms_repeats": ListOf(NUM), "cpu_repeats": list}),
            "speedup_vs_none": Opt(NUM),
            "predicted_full_acceptance": Opt(NUM),
            "predicted_at_mal": MapOf(Opt(NUM)),
        }
    ),
    "massv_overhead": ListOf(
        {
            "mode": str,
            "gamma": int,
            "batch_size": int,
            "massv_over_stock_tpot": NUM,
            "paired_massv_over_stock": Opt(NUM),
        }
    ),
    "plugin_effect": ListOf(
        {
            "gamma": int,
            "batch_size": int,
            "stock_over_vanilla_tpot": NUM,
            "paired_stock_over_vanilla": Opt(NUM),
        }
    ),
    "profile": MapOf(
        MapOf(
            {
                "steps": int,
                "phases": MapOf({"calls": NUM, "host_ms": NUM, "gpu_ms": NUM}),
                "sync": {"calls": NUM, "host_ms": NUM},
                "gpu_busy_ms": NUM,
                "step_period_ms": NUM,
                "graph_modes": MapOf(MapOf(NUM)),
                "top_kernels": ListOf({"name": str, "calls": NUM, "gpu_ms": NUM}),
            }
        )
    ),
}


# cost.json of a run over several presets (run_cost_presets): each preset's own document.
PRESETS_SCHEMA = {"version": int, "presets": ListOf(str), "runs": MapOf(SCHEMA)}


def run_cost_presets(out_dir: str | Path, presets: list[str], **kwargs: Any) -> dict[str, Any]:
    """One run over several presets of one target (e.g. both Qwen2.5 drafter sizes of
    Qwen2.5-VL-7B): ``run_cost`` per preset in ``out_dir/<preset>/``, the target engine started
    once and its step times shared, and ``out_dir/cost.json`` holding every preset's document.
    Split over commands like ``run_cost``: a rerun reuses every finished engine."""
    if len(set(presets)) != len(presets) or len(presets) < 2:
        raise ValueError(f"give two or more different presets, got {presets}")
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; known: {sorted(PRESETS)}")
    targets = {p: target_identity(p) for p in presets}
    if any(t != targets[presets[0]] for t in targets.values()):
        raise ValueError(f"presets {presets} have different targets: one run shares one target engine")
    out = Path(out_dir)
    runs, shared = {}, None
    for preset in presets:
        sub = out / preset.replace("/", "__")
        runs[preset] = run_cost(sub, preset=preset, shared_target=shared, **kwargs)
        shared = shared or sub / "jobs" / "target.json"
    doc = {"version": RESULTS_VERSION, "presets": list(presets), "runs": runs}
    problems = check_schema(doc, PRESETS_SCHEMA)
    if problems:
        raise AssertionError("cost.json does not match its schema:\n" + "\n".join(problems))
    write_json(out / "cost.json", doc)
    return doc


def format_presets_report(doc: dict[str, Any]) -> str:
    """Each preset's report, then MASSV against stock and the ceiling side by side per preset."""
    out = [format_report(d) for d in doc["runs"].values()]
    out += _machines_warning(sorted({m for d in doc["runs"].values() for m in d.get("machines", [])}))
    mals = next(iter(doc["runs"].values()))["meta"]["settings"].get("mals", [])
    rows = []
    for preset, d in doc["runs"].items():
        e2e = {(r["mode"], r["gamma"], r["batch_size"]): r for r in d["e2e"]}
        over = {
            (r["mode"], r["gamma"], r["batch_size"]): r["massv_over_stock_tpot"] for r in d["massv_overhead"]
        }
        for (mode, g, b), r in sorted(e2e.items(), key=lambda kv: (kv[0][1] or 0, kv[0][2], kv[0][0])):
            if mode not in ("massv", "massv-async"):
                continue
            ceiling, s = r["predicted_full_acceptance"], r["speedup_vs_none"]
            rows.append(
                [
                    preset.partition("/")[2] or preset,
                    mode,
                    g,
                    b,
                    fmt(r["tpot_ms"], 3),
                    fmt(over.get((mode, g, b)), 3),
                    fmt(s),
                    fmt(None if not ceiling or s is None else s / ceiling),
                    *[fmt(r["predicted_at_mal"].get(f"{float(t):.2f}")) for t in mals],
                ]
            )
    out.append(
        format_table(
            ["drafter", "engine", "γ", "B", "TPOT ms", "TPOT / stock", "speed-up", "of ceiling"]
            + [f"at MAL {float(t):.2f}" for t in mals],
            rows,
            "one run, every drafter: MASSV at forced acceptance (the target engine is shared)",
        )
    )
    return "\n\n".join(out)


def _machines_warning(machines: list[str]) -> list[str]:
    """A line for a run whose engines were timed on more than one machine (a run resumed after its
    machine was lost): host-bound spec steps ran up to ~20 % apart on different H200 machines."""
    if len(machines) < 2:
        return []
    return [
        f"WARNING: these engines ran on {len(machines)} machines (boot ids "
        + ", ".join(m[:8] for m in machines)
        + "): ratios between engines of different machines are not one run's"
    ]


def _host_lines(doc: dict[str, Any]) -> list[str]:
    """The host's speed in this run: the engines' Python loop, median over every timed cell, and a
    warning when it is slow enough that host-bound engines (stock ``draft_model``, the drafter
    alone) are timed 1.3-2x slow while MASSV's GPU-bound step is not (2026-12-01, fourth session)."""
    us = [c["python_us"] for r in doc.get("e2e", []) for c in r.get("cpu_repeats", []) if c.get("python_us")]
    if not us:
        return []
    median, n_slow, slow = slow_host(us)
    lines = [f"host: the engines' Python loop took {median:.0f} µs (median of {len(us)} repeats)"]
    if slow:
        lines.append(
            f"WARNING: a slow host (> {SLOW_HOST_US:.0f} µs): {n_slow} of {len(us)} repeats; {SLOW_HOST_EFFECT}; "
            "compare stock with runs on fast hosts"
        )
    return lines


def _spread(xs: list[float]) -> str:
    """(max - min) / median of a cell's repeats, in percent ("-" with fewer than two)."""
    if len(xs) < 2:
        return "-"
    return f"{(max(xs) - min(xs)) / statistics.median(xs) * 100:.0f}%"


def format_report(doc: dict[str, Any]) -> str:
    bs = [int(b) for b in doc["cost_ratio"]]
    settings = doc.get("meta", {}).get("settings", {})
    mals = [float(m) for m in settings.get("mals", [])]
    out = [f"run and engines pinned to CPUs {settings['cpus']}"] if settings.get("cpus") else []
    out += _machines_warning(doc.get("machines", []))
    out += _host_lines(doc)
    if settings.get("massv_env"):
        out.append("set for every engine: " + " ".join(f"{k}={v}" for k, v in settings["massv_env"].items()))
    rows = [[k, *[fmt(v.get(str(b)), 3) for b in bs]] for k, v in doc["step_ms"].items()]
    rows.append(["c = drafter/target", *[fmt(doc["cost_ratio"][str(b)], 3) for b in bs]])
    out.append(
        format_table(
            ["decode step (ms)", *[f"B={b}" for b in bs]], rows, f"{doc['preset']}: per-step decode time"
        )
    )
    ceil: dict[tuple[int, float], dict[int, Any]] = {}
    for r in doc["ceiling"]:
        ceil.setdefault((r["gamma"], r["mal"]), {})[r["batch_size"]] = r["speedup"]
    rows = [[f"γ={g}, MAL {tau:.2f}", *[fmt(v.get(b)) for b in bs]] for (g, tau), v in ceil.items()]
    out.append(format_table(["predicted τ/(γc+1)", *[f"B={b}" for b in bs]], rows, "speed-up ceiling from c"))
    rows = []
    for r in doc["e2e"]:
        label = r["mode"] if r["gamma"] is None else f"{r['mode']} γ={r['gamma']}"
        reps = r.get("tpot_ms_repeats") or []
        ceiling = r["predicted_full_acceptance"]
        steal = [c["steal"] for c in r.get("cpu_repeats") or [] if c["steal"] is not None]
        throttled = [c["throttled_ms"] for c in r.get("cpu_repeats") or [] if c["throttled_ms"] is not None]
        python = [c["python_us"] for c in r.get("cpu_repeats") or [] if c.get("python_us")]
        rows.append(
            [
                label,
                r["batch_size"],
                fmt(r["tpot_ms"], 3),
                fmt(min(reps) if reps else None, 3),
                _spread(reps),
                fmt_share(max(steal)) if steal else "-",
                fmt(max(throttled), 1) if throttled else "-",
                f"{max(python) / min(python):.2f}x" if python else "-",
                fmt(r.get("engine_tpot_ms"), 3),
                fmt(r["mal"]),
                "yes" if r["all_tokens_zero"] else "NO",
                fmt(r["speedup_vs_none"]),
                fmt(ceiling),
                fmt(None if not ceiling or r["speedup_vs_none"] is None else r["speedup_vs_none"] / ceiling),
                # speed-up at the fastest repeat: the median's, scaled by median / fastest
                fmt(
                    None
                    if not ceiling or r["speedup_vs_none"] is None or not reps
                    else r["speedup_vs_none"] * r["tpot_ms"] / min(reps) / ceiling
                ),
                *[fmt(r["predicted_at_mal"].get(f"{t:.2f}")) for t in mals],
            ]
        )
    out.append(
        format_table(
            [
                "engine",
                "B",
                "TPOT ms",
                "fastest",
                "spread",
                "max steal",
                "max throttled ms",
                "Python slowest/fastest",
                "request TPOT",
                "MAL",
                "tokens=0",
                "speed-up",
                "ceiling",
                "of ceiling",
                "fastest of ceiling",
                *[f"at MAL {t:.2f}" for t in mals],
            ],
            rows,
            "end to end at forced 100% acceptance (TPOT: steady full-batch decode step time per token,"
            " median of the repeats, fastest = their minimum, spread = their (max-min)/median; max steal:"
            " the most CPU time the VM's hypervisor took away during a repeat; max throttled: the most time"
            " the container's CPU quota held it back in a repeat; Python slowest/fastest: a fixed Python loop"
            " in the engine's process around each repeat, its slowest over its fastest; request TPOT: from vLLM's"
            " per-request timestamps, prefills of later requests included; speed-up over no speculation, same engine settings;"
            " ceiling = (γ+1)·T_target/(T_target+γ·T_drafter); 'at MAL τ' = τ·T_target / measured step)",
        )
    )
    retimed = [r for r in doc["e2e"] if r.get("until_tpot_ms") is not None]
    if retimed:
        rows = [
            [
                r["mode"] if r["gamma"] is None else f"{r['mode']} γ={r['gamma']}",
                r["batch_size"],
                fmt(r["until_tpot_ms"], 2),
                len(r["earlier_timings"]) + 1,
                ", ".join(fmt(t["tpot_ms"], 2) for t in r["earlier_timings"]) or "-",
                fmt(r["tpot_ms"], 3),
                "yes" if r["tpot_ms"] <= r["until_tpot_ms"] else "NO",
            ]
            for r in retimed
        ]
        out.append(
            format_table(
                ["engine", "B", "limit ms", "timings", "earlier TPOT ms", "TPOT ms above", "met"],
                rows,
                "timed again in one engine while over the limit (--until-tpot; the table above has the last timing)",
            )
        )
    if doc["massv_overhead"]:
        rows = [
            [
                r["mode"],
                f"γ={r['gamma']}",
                r["batch_size"],
                STOCK_OF[r["mode"]],
                fmt(r["massv_over_stock_tpot"], 3),
                fmt(r.get("paired_massv_over_stock"), 3),  # older results lack it
            ]
            for r in doc["massv_overhead"]
        ]
        out.append(
            format_table(
                ["engine", "", "B", "against", "TPOT / stock", "paired"],
                rows,
                f"MASSV TPOT over the plain draft model's, each at the same scheduling {PAIRED_NOTE}",
            )
        )
    if doc.get("plugin_effect"):
        rows = [
            [
                f"γ={r['gamma']}",
                r["batch_size"],
                fmt(r["stock_over_vanilla_tpot"], 3),
                fmt(r.get("paired_stock_over_vanilla"), 3),  # older results lack it
            ]
            for r in doc["plugin_effect"]
        ]
        out.append(
            format_table(
                ["", "B", "stock / stock-vanilla", "paired"],
                rows,
                f"stock draft_model's TPOT with massv-vllm's plugin in its engine over without it {PAIRED_NOTE}",
            )
        )
    for job, per_b in doc.get("profile", {}).items():
        for b, prof in per_b.items():
            rows = [
                [label, fmt(v["calls"], 2), fmt(v["host_ms"], 3), fmt(v["gpu_ms"], 3)]
                for label, v in sorted(prof["phases"].items())
            ]
            rows.append(
                [
                    "host blocked in device syncs",
                    fmt(prof["sync"]["calls"], 2),
                    fmt(prof["sync"]["host_ms"], 3),
                    "",
                ]
            )
            rows.append(["GPU busy (all kernels)", "", "", fmt(prof["gpu_busy_ms"], 3)])
            rows.append(["step period (wall)", "", fmt(prof["step_period_ms"], 3), ""])
            rows += [
                [f"{model} forward as: {mode}", fmt(n, 2), "", ""]
                for model, modes in sorted(prof.get("graph_modes", {}).items())
                for mode, n in sorted(modes.items())
            ]
            rows += [
                [f"  kernel {k['name'][:60]}", fmt(k["calls"], 1), "", fmt(k["gpu_ms"], 3)]
                for k in prof["top_kernels"][:10]
            ]
            out.append(
                format_table(
                    ["phase", "calls", "host ms", "GPU ms"],
                    rows,
                    f"{job}, B={b}: per engine step, mean of {prof['steps']} decode steps "
                    "(host ms include nested phases)",
                )
            )
    walls = sorted(v["wall_s"] for v in doc.get("engines", {}).values() if v.get("wall_s") is not None)
    if walls:  # what the next GPU session has to plan for (start-up alone leaves out the rest)
        out.append(
            f"engine time: {len(walls)} engines, {sum(walls):.0f} s in all, "
            f"{statistics.median(walls):.0f} s median, {walls[-1]:.0f} s longest (start, measure, shut down)"
        )
    return "\n\n".join(out)


def _until(text: str) -> tuple[int, float]:
    """``--until-tpot``'s ``B=MS``."""
    b, sep, ms = text.partition("=")
    try:
        if sep and int(b) >= 1 and float(ms) > 0:
            return int(b), float(ms)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r}: expected B=MS, a batch size and a TPOT in ms, e.g. 1=7.77")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from massv_vllm.engine import parse_engine_args

    p = cli.parser(__doc__)
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        nargs="+",
        default=["qwen2.5-vl-7b/qwen2.5-1.5b"],
        help="one preset, or several of one target: one run, the target engine shared, OUT/<preset>/ each",
    )
    p.add_argument(
        "--tiny", action="store_true", help="CPU smoke run: tiny-qwen, few steps, batch 1 and 2, γ=2"
    )
    p.add_argument("--jobs", nargs="+", choices=JOBS, default=list(DEFAULT_JOBS))
    p.add_argument("--gammas", type=int, nargs="+", default=None, help="γ per stock/massv engine (default 5)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 8 32")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="decode tokens timed per measurement (default 128, rounded up to whole spec steps)",
    )
    p.add_argument("--repeats", type=int, default=None, help="median of this many measurements (default 5)")
    p.add_argument("--prompt-len", type=int, default=64, help="random text tokens per prompt")
    p.add_argument("--image-size", default="448x448", help="WxH of one synthetic image per prompt, or 'none'")
    p.add_argument(
        "--mal",
        type=float,
        nargs="+",
        default=[2.46, 3.20, 3.30],
        help="MALs for the predicted speed-ups (paper: text-only 2.46, MASSV 3.20; world: MASSV 3.3)",
    )
    p.add_argument(
        "--compile-backend",
        choices=("inductor", "eager"),
        default="inductor",
        help="torch.compile backend (CUDA graphs either way); 'eager' skips Inductor: faster start",
    )
    p.add_argument(
        "--eager",
        action="store_true",
        help="enforce_eager: no compile, no CUDA graphs (not for final numbers)",
    )
    p.add_argument("--fresh", action="store_true", help="rerun jobs even if finished results exist")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="ENGINE",
        default=None,
        help="run only these engines of the run (JOB-gγ, e.g. stock-g5; or target, drafter), under the "
        "run's key: a later call of the whole run reuses them",
    )
    p.add_argument(
        "--until-tpot",
        nargs="+",
        type=_until,
        metavar="B=MS",
        default=None,
        help="with --only ENGINE: time batch size B again in that engine while its TPOT is above MS ms "
        "(every timing kept in its job file); the table takes the last",
    )
    p.add_argument(
        "--until-seconds",
        type=float,
        default=None,
        help="with --until-tpot: seconds per batch size for timing it again (default 60)",
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="start the engines together and time them in turns, one repeat each (host drift weighs on "
        "each alike; paired ratios); each gets an equal share of GPU memory",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also profile STEPS decode steps of every speculative engine (phase table)",
    )
    p.add_argument("--trace", action="store_true", help="with --profile: write chrome traces to OUT/traces/")
    p.add_argument(
        "--cpus",
        default=None,
        help="pin the run and its engines to these CPUs: a list like 0-7,16, or one-per-core:N (the first "
        "N physical cores, one hardware thread each)",
    )
    cli.add_engine_arg(p, help=None)
    p.add_argument(
        "--models-dir", default=None, help="where to write the config-only folders (default OUT/models)"
    )
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    tiny = a.tiny
    image = None if a.image_size == "none" else tuple(int(x) for x in a.image_size.lower().split("x"))
    if image is not None and len(image) != 2:
        p.error("--image-size must be WxH or 'none'")
    kw = parse_engine_args(a.engine_arg)
    try:
        cpus = choose_cpus(a.cpus) if a.cpus else None
    except ValueError as e:
        p.error(str(e))
    if a.eager:
        kw["enforce_eager"] = True
    if tiny and len(a.preset) > 1:
        p.error("--tiny runs the tiny preset alone: leave out --preset")
    several = len(a.preset) > 1
    # Named here, not left to cli.forward: run_cost_presets passes them on as **kwargs.
    if a.interleave and several:
        p.error("--interleave: one preset per run")
    by_name = {
        k: getattr(a, k)
        for k in ("jobs", "compile_backend", "fresh", "trace", "models_dir", "interleave", "only")
    }
    if a.until_seconds is not None and not a.until_tpot:
        p.error("--until-seconds: only with --until-tpot (it bounds the timings again that that asks for)")
    if a.until_tpot:
        by_name.update(
            until_tpot=dict(a.until_tpot), until_s=60.0 if a.until_seconds is None else a.until_seconds
        )
    return cli.run_main(
        run_cost_presets if several else run_cost,
        a,
        a.out,
        module="benchmarks.cost",
        argv=argv,
        report=format_presets_report if several else format_report,
        results="cost.json",
        **({"presets": a.preset} if several else {"preset": "tiny-qwen" if tiny else a.preset[0]}),
        gammas=a.gammas or ([2] if tiny else [5]),
        batch_sizes=a.batch_sizes or ([1, 2] if tiny else [1, 8, 32]),
        steps=a.steps or (12 if tiny else 128),
        repeats=a.repeats or (2 if tiny else 5),
        prompt_len=a.prompt_len if not tiny else min(a.prompt_len, 16),
        image_size=(image and (112, 112)) if tiny else image,
        mals=a.mal,
        engine_kw=kw,
        profile_steps=a.profile,
        cpus=cpus,
        **by_name,
    )


if __name__ == "__main__":
    main()
