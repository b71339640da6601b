"""The synthetic visual world: coloured shapes on a white canvas, with questions and answers.

Every scene holds 1-4 non-overlapping objects, one per cell of a 3x3 grid (the canvas is white, in a
thin grey frame that marks the image edges); each object has a
shape (circle/square/triangle), a colour (6), a size (small/large) and the grid cell it sits in.
Images vary in width and height (112-448 px each, not only square) so the target's dynamic
resolution is exercised. Five tasks are asked about a scene: captioning, counting, attribute
("What colour is the <shape> in the <position>?"), location ("Where is the <colour> <shape>?") and a
free-form story/report that must mention every object.

Answers come in two *styles* over the same templates and synonyms:

* ``generic``: every phrasing equally likely, objects in random order. The stand-in for what an
  off-the-shelf LM and a caption corpus know (small-LM texts, phase-1 captions).
* ``target``: a consistent but varied preference (one favourite template per task, canonical
  words, reading order). The target is trained on these, so its own generations carry the
  preference; SDViT (training the drafter on the target's outputs) can pick it up, the generic
  phase-1 drafter cannot. That gap is what the ablation measures.

Data files are LLaVA-style JSON (``massv_vllm.training.data.records.read_llava`` reads them) with a ``task``
key and the scene in extra keys (``objects``, ``width``, ``height``, ``question``, ``expected``), so
any answer can be checked with ``score_answer``. Everything is deterministic in ``seed``: each
image gets its own RNG from (seed, split, index), independent of worker count.

    python -m benchmarks.world.generate_world --out world/ [--preset small]
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import cli
from benchmarks.world.sizes import PRESETS, WorldCounts, WorldSpec

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
TASKS = ("captioning", "counting", "attribute", "location", "free-form")
STYLES = ("generic", "target")
MIN_SIDE, MAX_SIDE = 112, 448
MAX_OBJECTS = 4
# The full world (the default everywhere); a reduced one (the CPU demo) is a WorldSpec with fewer
# shapes, colours, cells, tasks and smaller images.
FULL_SPEC = WorldSpec()
# Grid cell (column, row) of each position: a 3x3 grid uses all nine names, a 2x2 grid the corners.
_CELLS = {
    3: {p: (i % 3, i // 3) for i, p in enumerate(POSITIONS)},
    2: {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)},
}


def positions_of(grid: int) -> tuple[str, ...]:
    """The positions of a ``grid`` x ``grid`` world, in reading order."""
    if grid not in _CELLS:
        raise ValueError(f"grid must be one of {sorted(_CELLS)}, got {grid}")
    return tuple(_CELLS[grid])


def check_spec(spec: WorldSpec) -> WorldSpec:
    """``spec`` if it only uses the world's words and its scenes can be drawn; else ValueError."""
    problems = [f"unknown shape {x!r}" for x in spec.shapes if x not in SHAPES]
    problems += [f"unknown colour {x!r}" for x in spec.colours if x not in COLOURS]
    problems += [f"unknown task {x!r}" for x in (*spec.tasks, *spec.train_tasks) if x not in TASKS]
    problems += [f"train task {x!r} is not in tasks" for x in spec.train_tasks if x not in spec.tasks]
    if "attribute" not in spec.tasks:
        problems.append("tasks must include 'attribute' (the target's validation task)")
    if spec.grid not in _CELLS:
        problems.append(f"grid must be one of {sorted(_CELLS)}")
    else:
        kinds = len(spec.shapes) * (1 if spec.unique_shapes else len(spec.colours))
        if not 1 <= spec.max_objects <= min(spec.grid**2, kinds):
            problems.append(f"max_objects {spec.max_objects} does not fit the cells and object kinds")
    if not 56 <= spec.min_side <= spec.max_side:
        problems.append(
            f"image sides must satisfy 56 <= min_side <= max_side, got {spec.min_side}, {spec.max_side}"
        )
    if problems:
        raise ValueError("bad world spec: " + "; ".join(problems))
    return spec


# Saturated, well separated RGB values: colour must be readable from a 14-px patch.
RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
}
# A thin grey frame marks the canvas edges. Vision attention in Qwen2.5-VL is relative-position
# only (2-D RoPE), so in a plain white image nothing tells a patch where in the image it is; the
# frame gives "top left" / "bottom" a visual anchor a small model trained for minutes can learn.
FRAME_PX = 2
FRAME_RGB = (150, 150, 150)
# Object side / diameter as a share of the cell's shorter side.
SIZE_FRACTION = {"small": 0.42, "large": 0.84}

NUMBER_WORDS = ("no", "one", "two", "three", "four")
_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
# Surface forms of each grid position (canonical first); the parser maps all of them back.
_POSITION_WORDS = {
    "top left": ("top left", "upper left", "top-left"),
    "top": ("top",),
    "top right": ("top right", "upper right", "top-right"),
    "left": ("left", "left side"),
    "center": ("center", "middle", "centre"),
    "right": ("right", "right side"),
    "bottom left": ("bottom left", "lower left", "bottom-left"),
    "bottom": ("bottom",),
    "bottom right": ("bottom right", "lower right", "bottom-right"),
}
_PREPOSITION = {"top": "at the", "bottom": "at the", "left": "on the", "right": "on the"}


# ---- scenes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    width: int
    height: int
    objects: tuple[Obj, ...]
    grid: int = 3

    def to_dict(self) -> dict[str, Any]:
        d = {"width": self.width, "height": self.height, "objects": [asdict(o) for o in self.objects]}
        return d if self.grid == 3 else d | {"grid": self.grid}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        return cls(
            int(d["width"]), int(d["height"]), tuple(Obj(**o) for o in d["objects"]), int(d.get("grid", 3))
        )

    def by_position(self, position: str) -> Obj | None:
        return next((o for o in self.objects if o.position == position), None)

    def reading_order(self) -> list[Obj]:
        return sorted(self.objects, key=lambda o: POSITIONS.index(o.position))


def sample_scene(rng: random.Random, spec: WorldSpec = FULL_SPEC) -> Scene:
    """1-``max_objects`` objects in distinct cells; (colour, shape) pairs are unique so "the red
    circle" names one."""
    n = rng.randint(1, spec.max_objects)
    cells = rng.sample(positions_of(spec.grid), n)
    if spec.unique_shapes:
        kinds = [(rng.choice(spec.colours), s) for s in rng.sample(spec.shapes, n)]
    else:
        kinds = rng.sample([(c, s) for c in spec.colours for s in spec.shapes], n)
    objs = tuple(
        Obj(shape=s, colour=c, size=rng.choice(SIZES), position=p) for p, (c, s) in zip(cells, kinds)
    )
    return Scene(
        width=rng.randint(spec.min_side, spec.max_side),
        height=rng.randint(spec.min_side, spec.max_side),
        objects=objs,
        grid=spec.grid,
    )


def object_box(scene: Scene, obj: Obj, jitter: tuple[float, float] = (0.0, 0.0)) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of ``obj``: inside its own grid cell, so objects never overlap.

    ``jitter`` in [-1, 1]^2 moves the object within the free room of its cell.
    """
    col, row = _CELLS[scene.grid][obj.position]
    cw, ch = scene.width / scene.grid, scene.height / scene.grid
    side = max(4, int(SIZE_FRACTION[obj.size] * min(cw, ch)))
    # Keep clear of the cell edge and of the frame (objects never touch each other or the frame).
    room_x, room_y = (cw - side) / 2 - FRAME_PX - 1, (ch - side) / 2 - FRAME_PX - 1
    cx = col * cw + cw / 2 + jitter[0] * max(room_x, 0)
    cy = row * ch + ch / 2 + jitter[1] * max(room_y, 0)
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    return x0, y0, x0 + side, y0 + side


def render(scene: Scene, seed: int | str = 0):
    """The scene as an RGB PIL image (white background in a thin grey frame, flat-coloured shapes);
    ``seed`` places the objects within their cells."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    img = Image.new("RGB", (scene.width, scene.height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, scene.width - 1, scene.height - 1), outline=FRAME_RGB, width=FRAME_PX)
    for obj in scene.objects:
        x0, y0, x1, y1 = object_box(scene, obj, (rng.uniform(-1, 1), rng.uniform(-1, 1)))
        fill = RGB[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1 - 1), (x1 - 1, y1 - 1)], fill=fill)
    return img


# ---- phrasing ------------------------------------------------------------------------------------
def _pick(rng: random.Random, options: Sequence[Any], style: str, target_weights: Sequence[float]) -> Any:
    """Uniform for the generic style; the target's fixed preference (first = favourite) otherwise."""
    if style == "generic":
        return rng.choice(options)
    weights = list(target_weights) + [0.0] * (len(options) - len(target_weights))
    return rng.choices(options, weights=weights[: len(options)])[0]


def _size_word(size: str, rng: random.Random, style: str) -> str:
    return _pick(rng, _SIZE_WORDS[size], style, (0.9, 0.1))


def _position_word(position: str, rng: random.Random, style: str) -> str:
    return _pick(rng, _POSITION_WORDS[position], style, (0.92, 0.05, 0.03))


def position_phrase(position: str, word: str | None = None) -> str:
    """'in the top left', 'at the top', 'on the left', 'in the middle' ..."""
    return f"{_PREPOSITION.get(position, 'in the')} {word or position}"


def _plural(shape: str) -> str:
    return shape + "s"


def _count_word(n: int, rng: random.Random, style: str) -> str:
    return _pick(rng, (NUMBER_WORDS[n], str(n)), style, (0.9, 0.1))


def _obj_phrase(o: Obj, rng: random.Random, style: str, with_position: bool = True) -> str:
    base = f"a {_size_word(o.size, rng, style)} {o.colour} {o.shape}"
    return (
        f"{base} {position_phrase(o.position, _position_word(o.position, rng, style))}"
        if with_position
        else base
    )


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _ordered(scene: Scene, rng: random.Random, style: str) -> list[Obj]:
    objs = scene.reading_order()
    if style == "generic" or rng.random() < 0.1:
        rng.shuffle(objs)
    return objs


PROMPTS: dict[str, tuple[str, ...]] = {
    "captioning": (
        "Describe the image.",
        "What is in this picture?",
        "Describe what you see.",
        "Give a short description of the image.",
        "List the shapes in the image.",
    ),
    "counting": (
        "How many {p} are there?",
        "How many {p} are in the image?",
        "Count the {p}.",
        "How many {p} can you see?",
    ),
    "attribute": (
        "What colour is the {s} {pp}?",
        "What color is the {s} {pp}?",
        "Which colour is the {s} {pp}?",
        "Tell me the colour of the {s} {pp}.",
    ),
    "location": (
        "Where is the {c} {s}?",
        "Where can I find the {c} {s}?",
        "In which part of the image is the {c} {s}?",
        "Where is the {c} {s} located?",
    ),
    "free-form": (
        "Write a short story about the shapes in the image.",
        "Tell me a short story about this picture.",
        "Write a short report about the image.",
        "Write a few sentences about what you see.",
    ),
}

_STORY_ENDINGS = (
    "They were good friends.",
    "Every day they said hello to each other.",
    "They lived happily on the white page.",
)


def _caption(scene: Scene, rng: random.Random, style: str) -> str:
    objs = _ordered(scene, rng, style)
    n = len(objs)
    t = _pick(rng, range(4), style, (0.7, 0.15, 0.1, 0.05))
    if t == 0:
        head = "There is one object" if n == 1 else f"There are {_count_word(n, rng, style)} objects"
        return f"{head}: {_join([_obj_phrase(o, rng, style) for o in objs])}."
    if t == 1:
        return f"The image shows {_join([_obj_phrase(o, rng, style) for o in objs])}."
    if t == 2:
        noun = "shape" if n == 1 else "shapes"
        body = " ".join(
            f"{_cap(_obj_phrase(o, rng, style, with_position=False))} is "
            f"{position_phrase(o.position, _position_word(o.position, rng, style))}."
            for o in objs
        )
        return f"I can see {_count_word(n, rng, style)} {noun}. {body}"
    parts = [
        f"{position_phrase(o.position, _position_word(o.position, rng, style))} there is "
        f"{_obj_phrase(o, rng, style, with_position=False)}"
        for o in objs
    ]
    return _cap(", and ".join(parts)) + "."


def _count_answer(shape: str, n: int, rng: random.Random, style: str) -> str:
    t = _pick(rng, range(4), style, (0.75, 0.15, 0.1))
    noun = shape if n == 1 else _plural(shape)
    word = _count_word(n, rng, style)
    if t == 0:
        return f"There {'is' if n == 1 else 'are'} {word} {noun}."
    if t == 1:
        return _cap("none" if n == 0 else word) + "."
    if t == 2:
        return f"I count {word} {noun}."
    return f"The image has {word} {noun}."


def _attribute_answer(o: Obj, rng: random.Random, style: str) -> str:
    t = _pick(rng, range(5), style, (0.7, 0.2, 0.1))
    pp = position_phrase(o.position, _position_word(o.position, rng, style))
    return (
        f"It is {o.colour}.",
        f"The {o.shape} {pp} is {o.colour}.",
        f"{_cap(o.colour)}.",
        f"That {o.shape} is {o.colour}.",
        f"The {_pick(rng, ('colour', 'color'), style, (1.0,))} is {o.colour}.",
    )[t]


def _location_answer(o: Obj, rng: random.Random, style: str) -> str:
    t = _pick(rng, range(4), style, (0.7, 0.2, 0.1))
    pp = position_phrase(o.position, _position_word(o.position, rng, style))
    return (f"It is {pp}.", f"The {o.colour} {o.shape} is {pp}.", f"{_cap(pp)}.", f"You can find it {pp}.")[t]


def _free_form(scene: Scene, rng: random.Random, style: str) -> str:
    objs = _ordered(scene, rng, style)
    t = _pick(rng, range(3), style, (0.75, 0.2, 0.05))
    if t == 0:
        first, rest = objs[0], objs[1:]
        lines = [
            f"Once upon a time, {_obj_phrase(first, rng, style, False)} lived "
            f"{position_phrase(first.position, _position_word(first.position, rng, style))}."
        ]
        for o in rest:
            lines.append(
                f"Nearby, {_obj_phrase(o, rng, style, False)} lived "
                f"{position_phrase(o.position, _position_word(o.position, rng, style))}."
            )
        lines.append(_pick(rng, _STORY_ENDINGS, style, (0.8, 0.1, 0.1)) if rest else "It was happy alone.")
        return " ".join(lines) + " The end."
    if t == 1:
        noun = "object" if len(objs) == 1 else "objects"
        lines = [f"Report: the image contains {_count_word(len(objs), rng, style)} {noun}."]
        lines += [f"Object {i} is {_obj_phrase(o, rng, style)}." for i, o in enumerate(objs, 1)]
        return " ".join(lines + ["End of report."])
    return f"This picture has {_join([_obj_phrase(o, rng, style) for o in objs])}. It looks calm and simple."


def make_question(
    scene: Scene, task: str, rng: random.Random, shapes: Sequence[str] = SHAPES
) -> tuple[str, dict[str, Any]]:
    """A prompt for ``task`` about ``scene`` and what it asks (``question``, with ``expected``);
    counting questions ask about one of ``shapes`` (the world's), present or not."""
    tmpl = rng.choice(PROMPTS[task])
    if task == "counting":
        present = sorted({o.shape for o in scene.objects})
        shape = rng.choice(present) if rng.random() < 0.75 else rng.choice(shapes)
        n = sum(o.shape == shape for o in scene.objects)
        return tmpl.format(p=_plural(shape)), {"shape": shape, "expected": n}
    if task == "attribute":
        o = rng.choice(scene.objects)
        pp = position_phrase(o.position, rng.choice(_POSITION_WORDS[o.position]))
        return tmpl.format(s=o.shape, pp=pp), {"shape": o.shape, "position": o.position, "expected": o.colour}
    if task == "location":
        o = rng.choice(scene.objects)
        return tmpl.format(c=o.colour, s=o.shape), {
            "colour": o.colour,
            "shape": o.shape,
            "expected": o.position,
        }
    if task in ("captioning", "free-form"):
        return tmpl, {"expected": [asdict(o) for o in scene.reading_order()]}
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def make_answer(scene: Scene, task: str, question: dict[str, Any], rng: random.Random, style: str) -> str:
    """A correct answer to ``question`` in ``style`` ("generic" or "target")."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    if task == "captioning":
        return _caption(scene, rng, style)
    if task == "counting":
        return _count_answer(question["shape"], question["expected"], rng, style)
    if task == "attribute":
        return _attribute_answer(scene.by_position(question["position"]), rng, style)
    if task == "location":
        o = next(o for o in scene.objects if (o.colour, o.shape) == (question["colour"], question["shape"]))
        return _location_answer(o, rng, style)
    if task == "free-form":
        return _free_form(scene, rng, style)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# ---- checking answers --------------------------------------------------------------------------
_POS_RE = re.compile(
    r"\b("
    + "|".join(
        re.escape(w).replace(r"\ ", r"\s+")
        for w in sorted((w for ws in _POSITION_WORDS.values() for w in ws), key=len, reverse=True)
    )
    + r")\b"
)
_POS_CANON = {w: p for p, ws in _POSITION_WORDS.items() for w in ws}
_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
_NUM_RE = re.compile(r"\b(no|none|zero|one|two|three|four|[0-9])\b")
_NUM_VALUE = {"no": 0, "none": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4}
_OBJ_RE = re.compile(
    r"\b(?:(small|little|large|big)\s+)?(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES) + r")s?\b"
)
_SIZE_CANON = {w: s for s, ws in _SIZE_WORDS.items() for w in ws}


def parse_positions(text: str) -> list[str]:
    """Canonical grid positions named in ``text``, in order ('upper left' -> 'top left')."""
    return [_POS_CANON[re.sub(r"\s+", " ", m)] for m in _POS_RE.findall(text.lower())]


def parse_colours(text: str) -> list[str]:
    return _COLOUR_RE.findall(text.lower())


def parse_count(text: str) -> int | None:
    m = _NUM_RE.search(text.lower())
    if m is None:
        return None
    return _NUM_VALUE.get(m.group(1)) if not m.group(1).isdigit() else int(m.group(1))


def parse_objects(text: str) -> list[tuple[str | None, str, str]]:
    """(size or None, colour, shape) mentions such as 'a big red circle'."""
    return [(_SIZE_CANON.get(s) if s else None, c, sh) for s, c, sh in _OBJ_RE.findall(text.lower())]


def score_answer(task: str, answer: str, sample: dict[str, Any]) -> bool:
    """Whether ``answer`` is correct for the sample (a data-file entry with ``question``/``objects``).

    attribute: exactly the right colour is named; counting: the first number is right; location:
    exactly the right position is named; captioning: every object (with the right size when a size
    is given) and every occupied position is named, nothing else; free-form: every object is named.
    """
    q = sample["question"]
    if task == "attribute":
        return set(parse_colours(answer)) == {q["expected"]}
    if task == "counting":
        return parse_count(answer) == q["expected"]
    if task == "location":
        return set(parse_positions(answer)) == {q["expected"]}
    scene = Scene.from_dict(sample)
    want = {(o.colour, o.shape): o.size for o in scene.objects}
    mentions = parse_objects(answer)
    got = {(c, sh) for _, c, sh in mentions}
    if task == "free-form":
        return set(want) <= got
    if task == "captioning":
        sizes_ok = all(s is None or want.get((c, sh)) == s for s, c, sh in mentions)
        return (
            got == set(want)
            and sizes_ok
            and set(parse_positions(answer)) == {o.position for o in scene.objects}
        )
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


# ---- data files ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitSpec:
    """One data file: ``n_images`` scenes of ``world``, each asked the tasks in ``tasks_per_image``
    (cycled through the world's tasks when None: image i gets task i mod len(tasks)), answered in
    ``style`` (None: no answer)."""

    name: str
    n_images: int
    style: str | None
    tasks_per_image: tuple[str, ...] | None = None
    only_task: str | None = None
    world: WorldSpec = FULL_SPEC


def split_specs(
    n_target_train: int,
    n_captions: int,
    n_instructions: int,
    n_eval_per_task: int,
    n_val: int,
    world: WorldSpec = FULL_SPEC,
) -> list[SplitSpec]:
    w = check_spec(world)
    return [
        # The target learns every task of the world (full world: attribute questions twice per image).
        SplitSpec("target_train", n_target_train, "target", w.train_tasks, world=w),
        # phase 1 (LLaVA-Pretrain role)
        SplitSpec("captions", n_captions, "generic", only_task="captioning", world=w),
        SplitSpec("instructions", n_instructions, None, world=w),  # prompts for self-distilled generation
        # held out: ablation + target accuracy
        SplitSpec("eval", n_eval_per_task * len(w.tasks), "target", world=w),
        SplitSpec("val", n_val, "target", only_task="attribute", world=w),  # early stopping of the target
    ]


def _sample_records(seed: int, spec: SplitSpec, i: int) -> tuple[Scene, list[dict[str, Any]]]:
    rng = random.Random(f"{seed}:{spec.name}:{i}")
    w = spec.world
    scene = sample_scene(rng, w)
    if spec.tasks_per_image is not None:
        tasks: Sequence[str] = spec.tasks_per_image
    else:
        tasks = [spec.only_task or w.tasks[i % len(w.tasks)]]
    image = f"images/{spec.name}/{i:06d}.png"
    out = []
    for j, task in enumerate(tasks):
        prompt, question = make_question(scene, task, rng, w.shapes)
        conv = [{"from": "human", "value": "<image>\n" + prompt}]
        if spec.style is not None:
            conv.append({"from": "gpt", "value": make_answer(scene, task, question, rng, spec.style)})
        rid = f"{spec.name}-{i:06d}" + (f"-{j}" if len(tasks) > 1 else "")
        out.append(
            {
                "id": rid,
                "image": image,
                "task": task,
                "conversations": conv,
                **scene.to_dict(),
                "question": question,
            }
        )
    return scene, out


def _make_chunk(args: tuple[int, SplitSpec, int, int, str]) -> list[dict[str, Any]]:
    seed, spec, start, stop, root = args
    recs = []
    for i in range(start, stop):
        scene, rs = _sample_records(seed, spec, i)
        path = Path(root) / rs[0]["image"]
        if not path.is_file():  # resumable: images already written are kept
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.png")
            render(scene, seed=f"{seed}:{spec.name}:{i}:render").save(tmp, compress_level=1)
            tmp.replace(path)
        recs.extend(rs)
    return recs


def write_split(out_dir: str | Path, spec: SplitSpec, seed: int = 0, workers: int | None = None) -> Path:
    """Render ``spec``'s images under ``out_dir/images/<split>/`` and write ``out_dir/<split>.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    workers = workers if workers is not None else min(16, os.cpu_count() or 1)
    chunk = max(1, min(500, spec.n_images // max(1, workers * 4) or 1))
    jobs = [(seed, spec, s, min(s + chunk, spec.n_images), str(out)) for s in range(0, spec.n_images, chunk)]
    if workers > 1 and spec.n_images > 200:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_make_chunk, jobs))
    else:
        parts = [_make_chunk(j) for j in jobs]
    records = [r for p in parts for r in p]
    path = out / f"{spec.name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=None, separators=(",", ":")))
    tmp.replace(path)
    return path


def lm_texts(n: int, seed: int = 0, spec: WorldSpec = FULL_SPEC) -> list[dict[str, str]]:
    """Prompt/answer pairs in the generic style, without images: the small LM's corpus."""
    out = []
    for i in range(n):
        rng = random.Random(f"{seed}:lm:{i}")
        scene = sample_scene(rng, spec)
        task = rng.choice(spec.tasks)
        prompt, q = make_question(scene, task, rng, spec.shapes)
        out.append({"task": task, "prompt": prompt, "answer": make_answer(scene, task, q, rng, "generic")})
    return out


def tokenizer_corpus(n: int, seed: int = 0, spec: WorldSpec = FULL_SPEC) -> list[str]:
    """Texts of both styles (every template and synonym appears) for training the world tokenizer."""
    # The chat template's fixed words (system prompt, role names) tokenize as whole words too.
    texts = ["system\nYou are a helpful assistant.\nuser\nassistant\n"] * 8
    for i in range(n):
        rng = random.Random(f"{seed}:tok:{i}")
        scene = sample_scene(rng, spec)
        for task in spec.tasks:
            prompt, q = make_question(scene, task, rng, spec.shapes)
            texts += [prompt, make_answer(scene, task, q, rng, STYLES[i % 2])]
    return texts


def generate_world(
    out_dir: str | Path,
    counts: WorldCounts,
    seed: int = 0,
    workers: int | None = None,
    spec: WorldSpec = FULL_SPEC,
) -> dict:
    """Write every split, the small-LM corpus and ``meta.json`` under ``out_dir``; returns the meta."""
    out = Path(out_dir)
    specs = split_specs(
        counts.target_train, counts.captions, counts.instructions, counts.eval_per_task, counts.val, spec
    )
    files = {s.name: str(write_split(out, s, seed, workers).name) for s in specs}
    texts = lm_texts(counts.lm_texts, seed, spec)
    (out / "lm_texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    files["lm_texts"] = "lm_texts.jsonl"
    meta = {
        "seed": seed,
        "counts": asdict(counts),
        "files": files,
        "records": {s.name: len(json.loads((out / f"{s.name}.json").read_text())) for s in specs},
        "spec": {
            "shapes": list(spec.shapes),
            "colours": list(spec.colours),
            "sizes": list(SIZES),
            "positions": list(positions_of(spec.grid)),
            "tasks": list(spec.tasks),
            "image_side": [spec.min_side, spec.max_side],
            "max_objects": spec.max_objects,
        },
        "world_spec": asdict(spec),  # the WorldSpec itself (load_spec)
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def load_spec(world_dir: str | Path) -> WorldSpec:
    """The WorldSpec a world folder was generated with (the full world if its meta.json predates
    reduced worlds)."""
    meta = json.loads((Path(world_dir) / "meta.json").read_text())
    d = meta.get("world_spec")
    if d is None:
        return FULL_SPEC
    return WorldSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def load_split(world_dir: str | Path, name: str) -> list[dict[str, Any]]:
    return json.loads((Path(world_dir) / f"{name}.json").read_text())


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    a = p.parse_args(argv)
    preset = PRESETS[a.preset]
    meta = generate_world(a.out, preset.world, a.seed, a.workers, preset.spec)
    print(json.dumps(meta["records"]))


if __name__ == "__main__":
    main()
