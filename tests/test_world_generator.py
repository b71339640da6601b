"""The synthetic world's generator: the fixed spec, rendering, answers, phrasing styles, files."""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter

import pytest

from benchmarks.world import generate_world as gw
from benchmarks.world.sizes import WorldCounts
from massv_vllm.training.data.records import ReadStats, read_llava


def _scenes(n: int, seed: int = 0) -> list[gw.Scene]:
    rng = random.Random(seed)
    return [gw.sample_scene(rng) for _ in range(n)]


def test_scenes_follow_the_fixed_spec():
    scenes = _scenes(600)
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3, 4}
    for s in scenes:
        assert gw.MIN_SIDE <= s.width <= gw.MAX_SIDE and gw.MIN_SIDE <= s.height <= gw.MAX_SIDE
        for o in s.objects:
            assert o.shape in gw.SHAPES and o.colour in gw.COLOURS
            assert o.size in gw.SIZES and o.position in gw.POSITIONS
        assert len({o.position for o in s.objects}) == len(s.objects)  # one object per cell
        assert len({(o.colour, o.shape) for o in s.objects}) == len(s.objects)  # "the red circle" is unique
    # Sizes vary over the whole range, in both directions, and most images are not square.
    widths, heights = [s.width for s in scenes], [s.height for s in scenes]
    assert min(widths) < 150 and max(widths) > 410 and min(heights) < 150 and max(heights) > 410
    assert sum(s.width != s.height for s in scenes) > 500
    used = Counter((o.shape, o.colour, o.size, o.position) for s in scenes for o in s.objects)
    assert {k[0] for k in used} == set(gw.SHAPES) and {k[1] for k in used} == set(gw.COLOURS)
    assert {k[2] for k in used} == set(gw.SIZES) and {k[3] for k in used} == set(gw.POSITIONS)


def test_rendering_objects_are_inside_their_cells_disjoint_and_drawn_in_their_colour():
    for i, scene in enumerate(_scenes(80, seed=1)):
        img = gw.render(scene, seed=i)
        assert img.size == (scene.width, scene.height)
        rng = random.Random(i)
        boxes = [gw.object_box(scene, o, (rng.uniform(-1, 1), rng.uniform(-1, 1))) for o in scene.objects]
        for o, (x0, y0, x1, y1) in zip(scene.objects, boxes):
            col, row = gw.POSITIONS.index(o.position) % 3, gw.POSITIONS.index(o.position) // 3
            cw, ch = scene.width / 3, scene.height / 3
            assert col * cw <= x0 < x1 <= (col + 1) * cw and row * ch <= y0 < y1 <= (row + 1) * ch
            assert x0 >= gw.FRAME_PX and y0 >= gw.FRAME_PX  # clear of the frame
            assert img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + 1)) == gw.RGB[o.colour]
            if o.size == "large":
                assert (x1 - x0) > 1.5 * gw.SIZE_FRACTION["small"] * min(cw, ch)
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0
        # White canvas in a grey frame: the frame on the edges, white where no object is.
        assert img.getpixel((0, scene.height // 2)) == gw.FRAME_RGB
        colours = set(img.getdata())
        assert (255, 255, 255) in colours
        assert {gw.RGB[o.colour] for o in scene.objects} <= colours


@pytest.mark.parametrize("style", gw.STYLES)
def test_reference_answers_are_correct_and_wrong_ones_are_caught(style):
    rng = random.Random(7)
    for scene in _scenes(300, seed=2):
        for task in gw.TASKS:
            prompt, q = gw.make_question(scene, task, rng)
            sample = {**scene.to_dict(), "question": q, "task": task}
            answer = gw.make_answer(scene, task, q, rng, style)
            assert gw.score_answer(task, answer, sample), (task, prompt, answer, scene)
            if task == "attribute":
                wrong = next(c for c in gw.COLOURS if c != q["expected"])
                assert not gw.score_answer(task, answer.lower().replace(q["expected"], wrong), sample)
                assert q["shape"] in prompt
            elif task == "location":
                wrong = next(p for p in gw.POSITIONS if p != q["expected"])
                assert not gw.score_answer(task, f"It is in the {wrong}.", sample)
            elif task == "counting":
                assert not gw.score_answer(
                    task, f"There are {gw.NUMBER_WORDS[(q['expected'] + 1) % 5]}.", sample
                )
            elif task in ("captioning", "free-form") and len(scene.objects) > 1:
                o = scene.objects[0]
                other = next(
                    c for c in gw.COLOURS if (c, o.shape) not in {(x.colour, x.shape) for x in scene.objects}
                )
                assert not gw.score_answer(
                    task, answer.replace(f"{o.colour} {o.shape}", f"{other} {o.shape}"), sample
                )


def test_parsers_map_synonyms_to_canonical_values():
    assert gw.parse_positions("in the upper left corner, not the lower right") == ["top left", "bottom right"]
    assert gw.parse_positions("on the left side and in the middle, at the top") == ["left", "center", "top"]
    assert gw.parse_positions("the bottom-right and the top") == ["bottom right", "top"]
    assert gw.parse_count("I count 3 circles.") == 3 and gw.parse_count("None.") == 0
    assert gw.parse_count("There are no squares.") == 0 and gw.parse_count("Blue.") is None
    assert gw.parse_objects("a big red circle and a green square") == [
        ("large", "red", "circle"),
        (None, "green", "square"),
    ]


_MASK = {
    **{c: "C" for c in gw.COLOURS},
    **{w: "N" for w in (*gw.NUMBER_WORDS, "none", *"01234")},
    **{s: "S" for s in gw.SHAPES},
    **{s + "s": "S" for s in gw.SHAPES},
    "is": "V",
    "are": "V",
    "object": "O",
    "objects": "O",
    "in": "P",
    "at": "P",
    "on": "P",
}


def _template_shares(style: str, task: str, n: int = 400) -> Counter:
    """Which phrasing answers take in ``style``: their first two words, with colours, numbers,
    shapes, is/are and prepositions masked (so the scene does not count as phrasing)."""
    rng = random.Random(3)
    shapes = Counter()
    for scene in _scenes(n, seed=4):
        _, q = gw.make_question(scene, task, rng)
        words = gw.make_answer(scene, task, q, rng, style).lower().replace(".", " ").replace(",", " ").split()
        shapes[tuple(_MASK.get(w, w) for w in words[:2])] += 1
    return shapes


@pytest.mark.parametrize("task", gw.TASKS)
def test_phrasings_vary_and_the_target_style_has_a_preference(task):
    generic, target = _template_shares("generic", task), _template_shares("target", task)
    assert len(generic) >= 3 and len(target) >= 2  # several phrasings in both styles
    top_generic = generic.most_common(1)[0][1] / sum(generic.values())
    top_target = target.most_common(1)[0][1] / sum(target.values())
    assert top_target > top_generic + 0.2  # the target prefers one phrasing; generic does not


def test_written_splits_are_llava_files_deterministic_in_the_seed(tmp_path):
    counts = WorldCounts(target_train=4, captions=3, instructions=5, eval_per_task=2, val=3, lm_texts=10)
    meta = gw.generate_world(tmp_path / "a", counts, seed=5, workers=1)
    assert meta["records"] == {"target_train": 24, "captions": 3, "instructions": 5, "eval": 10, "val": 3}
    gw.generate_world(tmp_path / "b", counts, seed=5, workers=1)
    gw.generate_world(tmp_path / "c", counts, seed=6, workers=1)
    a, b, c = (json.loads((tmp_path / d / "eval.json").read_text()) for d in "abc")
    assert a == b and a != c
    img = "images/eval/000003.png"
    assert (tmp_path / "a" / img).read_bytes() == (tmp_path / "b" / img).read_bytes()

    stats = ReadStats()
    recs = list(read_llava(tmp_path / "a" / "eval.json", stats=stats))
    assert stats.kept == 10 and not stats.skipped
    assert [r.task for r in recs] == list(gw.TASKS) * 2  # every task equally often
    for r in recs:
        assert r.images[0].is_file() and r.prompt.startswith("<image>\n")
        scene = gw.Scene.from_dict(r.meta)
        assert 1 <= len(scene.objects) <= 4
        assert gw.score_answer(r.task, r.response, {**r.meta, "task": r.task})
    instr = list(read_llava(tmp_path / "a" / "instructions.json"))
    assert all(r.response is None for r in instr)  # prompts only: the target writes the answers
    caps = list(read_llava(tmp_path / "a" / "captions.json"))
    assert {r.task for r in caps} == {"captioning"} and all(r.response for r in caps)
    texts = [json.loads(line) for line in (tmp_path / "a" / "lm_texts.jsonl").read_text().splitlines()]
    assert len(texts) == 10 and all(t["prompt"] and t["answer"] for t in texts)


def test_a_reduced_world_keeps_to_its_spec():
    from benchmarks.world.sizes import DEMO

    spec = DEMO.spec
    rng = random.Random(0)
    scenes = [gw.sample_scene(rng, spec) for _ in range(400)]
    corners = set(gw.positions_of(2))
    assert corners == {"top left", "top right", "bottom left", "bottom right"}
    for s in scenes:
        assert (s.width, s.height, s.grid) == (spec.min_side, spec.max_side, 2)
        assert 1 <= len(s.objects) <= spec.max_objects
        assert {o.position for o in s.objects} <= corners and len({o.position for o in s.objects}) == len(
            s.objects
        )
        assert {o.colour for o in s.objects} <= set(spec.colours)
        assert len({o.shape for o in s.objects}) == len(s.objects)  # unique shapes: "the square" names one
        assert gw.Scene.from_dict(s.to_dict()) == s
    for i, scene in enumerate(scenes[:40]):  # each object inside its quarter, drawn in its colour
        img = gw.render(scene, seed=i)
        rng2 = random.Random(i)
        for o in scene.objects:
            x0, y0, x1, y1 = gw.object_box(scene, o, (rng2.uniform(-1, 1), rng2.uniform(-1, 1)))
            col, row = (0 if "left" in o.position else 1), (0 if "top" in o.position else 1)
            assert col * 28 <= x0 < x1 <= (col + 1) * 28 and row * 28 <= y0 < y1 <= (row + 1) * 28
            assert img.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + 1)) == gw.RGB[o.colour]
    with pytest.raises(ValueError, match="unknown colour 'pink'.*max_objects 5"):
        gw.check_spec(dataclasses.replace(spec, colours=("red", "pink"), max_objects=5))


def test_reduced_world_files_ask_only_its_tasks(tmp_path):
    from benchmarks.world.sizes import DEMO

    spec = DEMO.spec
    counts = WorldCounts(target_train=5, captions=3, instructions=4, eval_per_task=3, val=4, lm_texts=20)
    meta = gw.generate_world(tmp_path, counts, seed=1, workers=1, spec=spec)
    assert meta["records"]["target_train"] == 5 * len(spec.train_tasks)
    assert meta["spec"]["colours"] == list(spec.colours) and meta["spec"]["image_side"] == [56, 56]
    ev = gw.load_split(tmp_path, "eval")
    assert [r["task"] for r in ev] == list(spec.tasks) * 3
    for r in ev + gw.load_split(tmp_path, "target_train"):
        assert r["grid"] == 2 and gw.score_answer(r["task"], r["conversations"][1]["value"], r)
    texts = [json.loads(x) for x in (tmp_path / "lm_texts.jsonl").read_text().splitlines()]
    assert {t["task"] for t in texts} <= set(spec.tasks)
