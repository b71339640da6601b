"""Small synthetic LLaVA-style data sets (images + captions or instructions) for smoke runs and tests.

    python -m massv_vllm.testing.synthetic --out data/tiny --n 32

writes ``data/tiny/captions.json`` (phase 1), ``data/tiny/instructions.json`` (generation) and the
images under ``data/tiny/images/``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CAPTIONS = [
    "A red circle on a blue square.",
    "Two triangles and a green square.",
    "A purple circle, an orange square and a green triangle.",
    "A small red circle in the top left.",
    "Once upon a time a blue circle met a red square.",
    "The picture shows a large blue square in the center.",
]
INSTRUCTIONS = [
    "Describe the image.",
    "How many triangles are there?",
    "What colour is the square in the bottom right?",
    "Where is the yellow triangle?",
    "Write a short story about the shapes.",
]
SIZES = ((56, 56), (84, 56), (112, 84))


def write_llava_set(
    root: str | Path, n: int = 16, *, kind: str = "caption", seed: int = 0, name: str | None = None
) -> Path:
    """Write ``n`` images and a LLaVA JSON file of captions (``kind="caption"``) or instructions
    (``kind="instruction"``, no answers) under ``root``; returns the JSON path."""
    from massv_vllm.testing.tiny import synthetic_image

    if kind not in ("caption", "instruction"):
        raise ValueError(f"kind must be 'caption' or 'instruction', got {kind!r}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rel = f"images/{seed + i:05d}.png"
        if not (root / rel).is_file():
            synthetic_image(seed + i, SIZES[i % len(SIZES)]).save(root / rel)
        if kind == "caption":
            conv = [
                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                {"from": "gpt", "value": CAPTIONS[i % len(CAPTIONS)]},
            ]
        else:
            conv = [{"from": "human", "value": "<image>\n" + INSTRUCTIONS[i % len(INSTRUCTIONS)]}]
        rows.append({"id": f"{kind}-{seed + i:05d}", "image": rel, "conversations": conv})
    path = root / (name or ("captions.json" if kind == "caption" else "instructions.json"))
    path.write_text(json.dumps(rows, indent=1))
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=32)
    a = p.parse_args(argv)
    for kind in ("caption", "instruction"):
        print(write_llava_set(a.out, a.n, kind=kind))


if __name__ == "__main__":
    main()


def png_bytes(img) -> bytes:
    """``img`` (PIL) encoded as PNG."""
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with almost no data: a decompression bomb,
    or a zero-sized image (PIL cannot create either)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )
