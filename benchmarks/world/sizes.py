"""Every size knob of the synthetic-world pipeline, in one place: ``small`` (CPU/CI) and ``full`` (one GPU).

``full`` is sized for one H100 within two back-to-back 8-minute commands (the stage list and the
split between the commands are in README.md): a ~20M-parameter Qwen2.5-VL target trained from
scratch for at most ``target.time_budget_s``, a ~4M-parameter Qwen2 small LM, and short drafter
training. ``small`` exercises every stage on a 2-core CPU in a few minutes; its numbers mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorldCounts:
    """Records per split of the generated world (``generate_world.generate_world``)."""

    target_train: int
    captions: int
    instructions: int
    eval_per_task: int
    val: int
    lm_texts: int


@dataclass(frozen=True)
class TargetSizes:
    """The target VLM (``massv_vllm.testing.tiny.make_qwen2_5_vl_target`` keywords) and how it is trained."""

    arch: dict = field(default_factory=dict)
    # Vision attention window in pixels. 448 (the largest image side) makes every "window" a whole
    # image: transformers' non-flash vision attention loops over windows, so fewer is faster.
    window_px: int = 448
    batch_size: int = 128
    lr: float = 7e-4
    weight_decay: float = 0.01
    warmup_steps: int = 200
    max_steps: int = 2600
    time_budget_s: float = 300.0  # hard stop for the training loop (evaluations included)
    eval_every: int = 400
    stop_accuracy: float = 0.98  # early stop once val attribute accuracy reaches this
    workers: int = 14  # DataLoader processes (image decode + processor), at most CPUs - 2


@dataclass(frozen=True)
class LMSizes:
    """The small Qwen2 LM (``make_small_lm`` keywords) and its text-only training."""

    arch: dict = field(default_factory=dict)
    batch_size: int = 256
    lr: float = 2e-3
    warmup_steps: int = 50
    max_steps: int = 800
    time_budget_s: float = 60.0


@dataclass(frozen=True)
class DrafterSizes:
    """Drafter training and benchmarking (passed to the train/ and benchmarks/ scripts)."""

    phase1_epochs: float = 3.0
    phase1_batch_size: int = 64
    phase1_lr: float = 1e-3
    sdvit_epochs: float = 3.0
    sdvit_batch_size: int = 32
    sdvit_lr: float = 2e-4
    gen_max_tokens: int = 160
    gamma: int = 5
    ablation_max_tokens: int = 128
    ablation_batch_size: int = 64
    ablation_limit: int | None = None  # eval prompts per run (None: all)
    tvd_limit: int = 16  # TVD records per task
    # Drafters compared in the ablation; --small keeps two to save vLLM engine starts on CPU.
    ablation_drafters: tuple[str, ...] = ("text-only", "massv-no-sdvit", "massv")


@dataclass(frozen=True)
class WorldSizes:
    name: str
    world: WorldCounts
    vocab_size: int
    target: TargetSizes
    lm: LMSizes
    drafter: DrafterSizes
    dtype: str  # dtype the checkpoints are saved in (vLLM serves them in it)
    enforce_eager: bool  # vLLM engines: skip CUDA-graph capture (short jobs start faster)
    # Intra-op threads for the CPU training stages (None: torch's default). Tiny models gain
    # nothing from more, and on a busy 2-core machine OpenMP spin-waiting makes 2 threads ~50x
    # slower than 1.
    cpu_threads: int | None = None


FULL = WorldSizes(
    name="full",
    world=WorldCounts(
        target_train=20000, captions=4000, instructions=4000, eval_per_task=64, val=128, lm_texts=60000
    ),
    vocab_size=1024,
    target=TargetSizes(
        arch=dict(
            hidden_size=384,
            num_layers=6,
            num_heads=6,
            num_kv_heads=2,
            intermediate_size=1024,
            vision_hidden=256,
            vision_depth=4,
            vision_heads=4,
            max_position_embeddings=4096,
        ),
    ),
    lm=LMSizes(
        arch=dict(
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=768,
            max_position_embeddings=4096,
        ),
    ),
    drafter=DrafterSizes(),
    dtype="bfloat16",
    enforce_eager=True,
)

SMALL = WorldSizes(
    name="small",
    world=WorldCounts(target_train=96, captions=32, instructions=16, eval_per_task=2, val=8, lm_texts=600),
    vocab_size=512,
    target=TargetSizes(
        arch=dict(
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            intermediate_size=128,
            vision_hidden=64,
            vision_depth=2,
            vision_heads=2,
            max_position_embeddings=4096,
        ),
        batch_size=8,
        lr=3e-3,
        warmup_steps=4,
        max_steps=24,
        time_budget_s=300.0,  # a safety net only: the run is step-bound, so CI sees the same steps
        eval_every=24,
        stop_accuracy=1.01,  # never stop early: the CI test checks the loss falls over all steps
        workers=0,
    ),
    lm=LMSizes(
        arch=dict(
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            intermediate_size=128,
            max_position_embeddings=4096,
        ),
        batch_size=16,
        lr=3e-3,
        warmup_steps=4,
        max_steps=30,
        time_budget_s=300.0,
    ),
    drafter=DrafterSizes(
        phase1_epochs=2.0,
        phase1_batch_size=8,
        sdvit_epochs=2.0,
        sdvit_batch_size=8,
        gen_max_tokens=48,
        ablation_max_tokens=24,
        ablation_batch_size=10,
        tvd_limit=6,
        ablation_drafters=("text-only", "massv"),
    ),
    dtype="float32",
    enforce_eager=True,
    cpu_threads=1,
)

PRESETS = {"full": FULL, "small": SMALL}
