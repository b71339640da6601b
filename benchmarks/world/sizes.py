"""Every size knob of the synthetic-world pipeline, in one place: ``full`` (one GPU), ``demo`` (the
CPU demo, what a machine without a GPU runs) and ``small`` (a smoke test).

``full`` is sized for one H100 within two back-to-back 8-minute commands (the stage list and the
split between the commands are in README.md): a ~20M-parameter Qwen2.5-VL target trained from
scratch for at most ``target.time_budget_s``, a ~4M-parameter Qwen2 small LM, and short drafter
training, on the full world (``WorldSpec()``). ``demo`` runs the same stages on a reduced world
(``DEMO.spec``) in about 6 minutes on 2 CPU cores, with real results: the target reads the image
and the drafters' MAL shows the paper's ordering. ``small`` exercises every stage on the full
world with tiny models in ~2 minutes; its numbers mean nothing.
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
class WorldSpec:
    """What the world holds (``generate_world``): the objects' vocabulary, the grid, the image sides
    and the tasks. The default is the full world; the CPU demo uses a reduced one."""

    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    grid: int = 3  # objects sit in the cells of a grid x grid layout: 3 (9 positions) or 2 (the corners)
    min_side: int = 112  # image width and height, each drawn from [min_side, max_side]
    max_side: int = 448
    max_objects: int = 4
    # Each shape at most once per image, so "the square in the top left" is found by its shape alone
    # (a small target learns to find a shape in minutes; the grid position takes far longer).
    unique_shapes: bool = False
    tasks: tuple[str, ...] = ("captioning", "counting", "attribute", "location", "free-form")
    # What the target is asked about each training image (attribute twice: the headline skill).
    train_tasks: tuple[str, ...] = (
        "captioning",
        "counting",
        "attribute",
        "attribute",
        "location",
        "free-form",
    )


@dataclass(frozen=True)
class TargetSizes:
    """The target VLM (``massv_vllm.testing.tiny.make_qwen2_5_vl_target`` keywords) and how it is trained."""

    arch: dict = field(default_factory=dict)
    # Vision attention window in pixels. 448 (the largest image side) makes every "window" a whole
    # image: transformers' non-flash vision attention loops over windows, so fewer is faster.
    window_px: int = 448
    batch_size: int = 128
    lr: float = 7e-4
    vision_lr_scale: float = 1.0  # the vision tower's rate relative to ``lr``
    weight_decay: float = 0.01
    warmup_steps: int = 200
    max_steps: int = 2600
    time_budget_s: float = 300.0  # hard stop for the training loop (evaluations included)
    eval_every: int = 400
    stop_accuracy: float = 0.98  # early stop once val attribute accuracy reaches this
    workers: int = 14  # DataLoader processes (image decode + processor), at most CPUs - 2
    cache_samples: bool = False  # keep encoded samples in memory (small worlds, no workers)


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
    # Prompts per LLM.chat call of the generate stage. On CPU a whole call must fit one prefill
    # step: a seeded request prefilled in chunks stops vLLM 0.26's CPU engine ("CPU Generator does
    # not use offset") when no MASSV drafter is served.
    gen_shard_size: int = 512
    gamma: int = 5
    # Masked sequences per sample for the parallel drafter's loss (--parallel-anchors): each is one
    # more forward of the sample, so the CPU demo takes 1.
    parallel_anchors: int = 4
    ablation_max_tokens: int = 128
    ablation_batch_size: int = 64
    ablation_limit: int | None = None  # eval prompts per run (None: all)
    tvd_limit: int = 16  # TVD records per task
    max_model_len: int = 4096  # vLLM engines (generation, ablation); at most the target's positions
    # Drafters compared in the ablation (pipeline.DRAFTER_DIRS); --small keeps two to save vLLM
    # engine starts on CPU (and then skips training the parallel drafter).
    ablation_drafters: tuple[str, ...] = ("text-only", "massv-no-sdvit", "massv", "massv-parallel")


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
    spec: WorldSpec = field(default_factory=WorldSpec)  # what the world holds (default: the full world)


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

# The CPU demo: what a machine without a GPU runs. A reduced world -- 3 colours (chance 1/3), 3 shapes
# (each at most once per image), 4 positions (a 2x2 grid), 56-px images (one image token per grid
# cell), captioning and attribute questions -- that a 1M-parameter target learns to read on one
# CPU core in about two minutes, so the MAL ordering of the full run shows on a laptop or CI box.
DEMO = WorldSizes(
    name="demo",
    world=WorldCounts(
        target_train=2000, captions=1000, instructions=800, eval_per_task=64, val=64, lm_texts=4000
    ),
    vocab_size=512,
    spec=WorldSpec(
        shapes=("circle", "square", "triangle"),
        colours=("red", "green", "blue"),
        grid=2,
        min_side=56,
        max_side=56,
        max_objects=3,
        unique_shapes=True,
        tasks=("captioning", "attribute"),
        train_tasks=("captioning", "attribute", "attribute"),
    ),
    target=TargetSizes(
        arch=dict(
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=256,
            vision_hidden=64,
            vision_depth=2,
            vision_heads=2,
            max_position_embeddings=1024,
            # Every image is 56x56: 2x2 merged tokens of 28 px, one per grid cell.
            min_pixels=56 * 56,
            max_pixels=56 * 56,
        ),
        batch_size=32,
        lr=2e-3,
        vision_lr_scale=0.1,  # without it the target rarely learns to read the image (README)
        warmup_steps=30,
        max_steps=800,
        time_budget_s=300.0,
        eval_every=100,
        stop_accuracy=1.01,  # all steps: captions keep improving once colour questions are right
        workers=0,
        cache_samples=True,
    ),
    lm=LMSizes(
        arch=dict(
            hidden_size=128,
            num_layers=4,
            num_heads=2,
            num_kv_heads=1,
            intermediate_size=256,
            max_position_embeddings=1024,
        ),
        batch_size=32,
        lr=3e-3,
        warmup_steps=20,
        max_steps=300,
        time_budget_s=60.0,
    ),
    drafter=DrafterSizes(
        phase1_epochs=5.0,
        phase1_batch_size=32,
        phase1_lr=5e-3,
        sdvit_epochs=10.0,
        sdvit_batch_size=32,
        sdvit_lr=2e-3,
        gen_max_tokens=96,
        gen_shard_size=32,
        parallel_anchors=1,
        ablation_max_tokens=96,
        ablation_batch_size=32,
        tvd_limit=16,
        max_model_len=512,
    ),
    dtype="float32",
    enforce_eager=True,
    cpu_threads=1,
)

PRESETS = {"full": FULL, "demo": DEMO, "small": SMALL}
