"""Image paths in data files stay inside the declared image root (security), and sources chain."""

from __future__ import annotations

import json

import pytest

from massv_vllm.training.data.records import DataError, ReadStats, read_sources, safe_join


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
