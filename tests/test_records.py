"""Image paths in data files stay inside the declared image root (security), sources chain, and
malformed records or images are counted skips."""

from __future__ import annotations

import json

import pytest

from massv_vllm.testing.synthetic import png_header_only
from massv_vllm.training.data.records import (
    DataError,
    ReadStats,
    load_image,
    read_llava,
    read_records,
    read_sources,
    safe_join,
)


def test_safe_join_refuses_every_way_out(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    assert safe_join(root, "sub/a.png") == (root / "sub/a.png").resolve()
    for bad, why in [
        ("../secret.png", "escapes the image root"),
        ("sub/../../secret.png", "escapes the image root"),
        ("link.png", "escapes the image root"),  # a symlink pointing outside
        (str(tmp_path / "secret.png"), "is absolute"),
        ("", "non-empty string"),
    ]:
        with pytest.raises(DataError, match=why):
            safe_join(root, bad)


def test_read_sources_chains_files_with_their_roots(tmp_path):
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]
    (tmp_path / "a.json").write_text(json.dumps([{"id": "a1", "image": "x.png", "conversations": conv}]))
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"id": "b1", "image": "../x.png", "conversations": conv}) + "\n"
    )
    stats = ReadStats()
    got = list(read_sources([tmp_path / "a.json", tmp_path / "b.jsonl"], lambda p: None, stats))
    assert [(r.id, root) for r, root in got] == [("a1", tmp_path)]
    assert stats.seen == 2 and stats.kept == 1 and dict(stats.skipped) == {"path outside image root": 1}
    with pytest.raises(DataError, match="does not exist"):
        list(read_sources([tmp_path / "missing.json"], lambda p: None, stats))


# over twice PIL's limit (an error in PIL), and over once (only a warning in PIL)
@pytest.mark.parametrize("size", [20_000, 10_000])
def test_decompression_bomb_is_a_counted_image_error(tmp_path, size):
    import io
    import warnings

    from PIL import Image

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(size, size))
    for src in (bomb, io.BytesIO(bomb.read_bytes()), {"bytes": bomb.read_bytes(), "path": None}):
        with pytest.raises(DataError, match="too large") as e, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            load_image(src)
        assert e.value.reason == "image too large"


CONV = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]


def test_wrong_types_in_llava_records_are_counted_skips(tmp_path):
    (tmp_path / "x.png").write_bytes(b"x")
    rows = [
        {"id": "ok", "image": "x.png", "conversations": CONV},
        {"id": "empty", "image": "x.png", "conversations": []},
        {"id": "str-turn", "image": "x.png", "conversations": ["<image>\nWhat colour?", CONV[1]]},
        {"id": "int-turn", "conversations": [3]},
        {"id": "none-value", "conversations": [{"from": "human", "value": None}]},
        {"id": "int-image", "image": 123, "conversations": CONV},
        {"id": "dict-image", "image": {"path": "x.png"}, "conversations": CONV},
        {"id": "int-in-list", "images": [123], "conversations": CONV},
        {"id": "nul", "image": "x.png\x00.txt", "conversations": CONV},
        {"id": "gpt-only", "conversations": [CONV[1]]},
        {"id": ["a"], "image": "x.png", "conversations": CONV},
        {"id": "task", "task": {"name": "vqa"}, "image": "x.png", "conversations": CONV},
        {"id": "marks", "images": ["x.png", "x.png"], "conversations": CONV},
        "not an object",
        {"id": "escape", "image": "../x.png", "conversations": CONV},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("d.json", "d.jsonl"):
        stats = ReadStats()
        got = [r.id for r in read_llava(tmp_path / name, stats=stats)]
        assert got == ["ok"]
        assert stats.seen == len(rows) and stats.kept == 1
        assert dict(stats.skipped) == {
            "empty conversation": 1,
            "malformed turn": 3,
            "malformed image field": 2,
            "malformed image path": 2,
            "no user turn": 1,
            "malformed id": 1,
            "malformed task": 1,
            "image markers": 1,
            "malformed": 1,
            "path outside image root": 1,
        }


def _hf_paths_dataset(folder, paths, monkeypatch):
    import datasets

    feats = datasets.Features({"image": datasets.Image(decode=False), "prompt": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": None, "path": p} for p in paths], "prompt": ["Describe."] * len(paths)},
        features=feats,
    )
    folder.mkdir(parents=True, exist_ok=True)
    with monkeypatch.context() as m:
        m.chdir(folder)  # to_parquet sizes the files of relative paths from the working folder
        ds.to_parquet(str(folder / "d.parquet"))  # and keeps path-only images as paths
    return folder / "d.parquet"


def test_datasets_image_paths_stay_inside_the_dataset_folder(tmp_path, monkeypatch):
    from massv_vllm.testing.tiny import synthetic_image

    synthetic_image(0, (8, 8)).save(tmp_path / "outside.png")
    data = tmp_path / "ds"
    (data / "imgs").mkdir(parents=True)
    synthetic_image(1, (8, 8)).save(data / "imgs" / "in.png")
    (data / "imgs" / "link.png").symlink_to(tmp_path / "outside.png")
    parquet = _hf_paths_dataset(
        data,
        [
            str(data / "imgs" / "in.png"),  # absolute, inside: an image folder's own files
            "imgs/in.png",  # relative to the dataset folder
            str(tmp_path / "outside.png"),  # absolute, outside
            "../outside.png",
            "imgs/link.png",  # a symlink out
            "/etc/hostname",
        ],
        monkeypatch,
    )
    stats = ReadStats()
    recs = list(read_records(parquet, stats=stats, response_column=None))
    assert [r.id for r in recs] == ["d.parquet[0]", "d.parquet[1]"]
    assert dict(stats.skipped) == {"path outside image root": 4}
    assert [load_image(r.images[0]).size for r in recs] == [(8, 8), (8, 8)]
    # an explicit --image-root is the only way to read images elsewhere
    stats = ReadStats()
    recs = list(read_records(parquet, tmp_path, stats=stats, response_column=None))
    assert [r.id for r in recs] == [f"d.parquet[{i}]" for i in (0, 1, 2, 4)]
    assert dict(stats.skipped) == {"path outside image root": 2}  # ../outside.png, /etc/hostname
