"""Recipes (train/recipes/*.json): every one parses and maps onto real options of its scripts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from massv_vllm.training import generation
from massv_vllm.training.recipes import PRETRAIN, SDVIT, build_parser, load_recipe, parse_args_with_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "train" / "recipes").glob("*.json"))
PARSERS = {
    PRETRAIN: lambda: build_parser(PRETRAIN),
    SDVIT: lambda: build_parser(SDVIT),
    "generate": generation.build_parser,
}
REQUIRED = {
    PRETRAIN: ["--drafter", "d", "--target", "t", "--data", "x.json", "--out", "o"],
    SDVIT: ["--drafter", "d", "--target", "t", "--data", "x.json", "--out", "o"],
    "generate": ["--target", "t", "--data", "x.json", "--out", "o"],
}


def test_recipes_exist_for_the_supported_pairs():
    pairs = {(json.loads(p.read_text())["target"], json.loads(p.read_text())["small_lm"]) for p in RECIPES}
    assert pairs == {
        ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"),
        ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"),
        ("google/gemma-3-12b-it", "google/gemma-3-1b-it"),
    }


def _typed(action: argparse.Action, value):
    """What argparse would produce for ``value`` given on the command line."""
    if isinstance(action, argparse._StoreTrueAction):
        assert isinstance(value, bool), f"{action.dest}: expected true/false, got {value!r}"
        return value
    if action.nargs in ("+", "*"):
        assert isinstance(value, list), f"{action.dest}: expected a list"
        return [action.type(str(v)) if action.type else v for v in value]
    return action.type(str(value)) if action.type else str(value)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_keys_are_valid_options(recipe):
    raw = json.loads(recipe.read_text())
    for script, make in PARSERS.items():
        assert script in raw, f"{recipe.name} has no {script} section"
        parser = make()
        section = load_recipe(recipe, script, parser)  # raises on unknown keys / bad choices
        actions = {a.dest: a for a in parser._actions}
        args = parse_args_with_recipe(make(), script, ["--recipe", str(recipe), *REQUIRED[script]])
        for key, value in section.items():
            assert _typed(actions[key], value) == value, (
                f"{recipe.name}: {script}.{key}={value!r} has the wrong type"
            )
            assert getattr(args, key) == value
        if "deepspeed_config" in section:
            assert (ROOT / section["deepspeed_config"]).is_file()
    generation.parse_schedule(raw["generate"]["schedule"])
    # a recipe supplies defaults; the command line wins
    args = parse_args_with_recipe(
        build_parser(SDVIT), SDVIT, ["--recipe", str(recipe), *REQUIRED[SDVIT], "--lr", "0.5"]
    )
    assert args.lr == 0.5


def test_bad_recipes_are_refused_with_the_offending_key(tmp_path, capsys):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"sdvit": {"learning_rate": 1e-5}}))
    with pytest.raises(SystemExit):
        parse_args_with_recipe(build_parser(SDVIT), SDVIT, ["--recipe", str(bad), *REQUIRED[SDVIT]])
    assert "sdvit.learning_rate is not an option of sdvit" in capsys.readouterr().err
    bad.write_text(json.dumps({"sdvit": {"dtype": "fp8"}, "extra": 1}))
    with pytest.raises(SystemExit):
        parse_args_with_recipe(build_parser(SDVIT), SDVIT, ["--recipe", str(bad), *REQUIRED[SDVIT]])
    err = capsys.readouterr().err
    assert "sdvit.dtype='fp8': not one of" in err and "unknown top-level key 'extra'" in err
    bad.write_text(json.dumps({"sdvit": {"max_steps": 12.5}}))
    with pytest.raises(SystemExit):
        parse_args_with_recipe(build_parser(SDVIT), SDVIT, ["--recipe", str(bad), *REQUIRED[SDVIT]])
    assert "sdvit.max_steps=12.5: invalid literal for int()" in capsys.readouterr().err
    bad.write_text(json.dumps({"sdvit": {"drafter": "x"}}))  # paths come from the command line only
    with pytest.raises(SystemExit):
        parse_args_with_recipe(build_parser(SDVIT), SDVIT, ["--recipe", str(bad), *REQUIRED[SDVIT]])
    assert "sdvit.drafter is not an option" in capsys.readouterr().err


def test_configs_are_valid_deepspeed_json():
    from massv_vllm.training.trainer import deepspeed_config

    stages = {}
    for p in sorted((ROOT / "train" / "configs").glob("zero*.json")):
        cfg = deepspeed_config(str(p), micro=2, accum=2, world=1, bf16=False, grad_clip=1.0)
        stages[p.stem] = cfg["zero_optimization"]["stage"]
    assert stages == {"zero0": 0, "zero1": 1, "zero2": 2, "zero3": 3}
