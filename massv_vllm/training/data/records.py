"""Readers for image-conversation data: LLaVA-style JSON/JSONL and Hugging Face ``datasets``.

Both produce ``Record``s: an id, the images (paths checked to stay inside the declared image root,
or in-memory PIL images from a dataset), the conversation turns, and an optional task label.
Training (captions for phase 1, instructions for generation/SDViT) and the benchmarks (eval sets)
read data only through here.

LLaVA format (a JSON list, or JSONL with one object per line)::

    {"id": "0001", "image": "imgs/0001.png",            # or "images": [...], or absent
     "task": "vqa",                                     # optional
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "It is red."}]}
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_MARK = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(ValueError):
    """A data file or sample is malformed (the message names the file and sample).

    ``reason`` is the short label a skipped sample is counted under in ``ReadStats``."""

    def __init__(self, message: str, reason: str = "malformed"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Record:
    id: str
    images: list[Any]  # Path (inside the image root) or PIL.Image.Image
    turns: list[tuple[str, str]]  # (role, text); user text may hold "<image>" markers
    task: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        """The first user turn (the instruction)."""
        return next(t for r, t in self.turns if r == "user")

    @property
    def response(self) -> str | None:
        """The first assistant turn, if any (caption / reference answer)."""
        return next((t for r, t in self.turns if r == "assistant"), None)


@dataclass
class ReadStats:
    """Samples skipped while reading or preparing data, by reason (reported at the end of a run),
    and samples kept but cut short (``cut``: a response truncated before a token it may not hold)."""

    seen: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    cut: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1

    def note_cut(self, reason: str) -> None:
        self.cut[reason] += 1

    def summary(self) -> str:
        parts = ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())) or "none"
        out = f"{self.kept}/{self.seen} samples kept; skipped: {parts}"
        if self.cut:
            out += "; cut: " + ", ".join(f"{n} {r}" for r, n in sorted(self.cut.items()))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "kept": self.kept, "skipped": dict(self.skipped), "cut": dict(self.cut)}


OUTSIDE_ROOT = "path outside image root"  # the skip reason of every path that leaves its root


def _check_path_string(rel: Any) -> str:
    if not isinstance(rel, str) or not rel:
        raise DataError(f"image path must be a non-empty string, got {rel!r}", "malformed image path")
    if "\x00" in rel:
        raise DataError(f"image path {rel!r} contains a NUL byte", "malformed image path")
    return rel


def _inside(root: Path, p: Path, shown: str) -> Path:
    """``p`` (absolute) resolved; DataError unless it lies inside ``root`` (symlinks followed)."""
    try:
        root_r = root.resolve()
        full = p.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a symlink loop, a name too long
        raise DataError(f"image path {shown!r} cannot be resolved: {e}", "malformed image path") from e
    if full != root_r and root_r not in full.parents:
        raise DataError(f"image path {shown!r} escapes the image root {root}", OUTSIDE_ROOT)
    return full


def safe_join(root: Path, rel: str) -> Path:
    """``root / rel``, refusing absolute paths and anything resolving outside ``root``."""
    rel = _check_path_string(rel)
    p = Path(rel)
    if p.is_absolute():
        raise DataError(
            f"image path {rel!r} is absolute; paths must be relative to the image root", OUTSIDE_ROOT
        )
    return _inside(root, root.resolve() / p, rel)


def confine(root: Path, path: str) -> Path:
    """``path`` resolved against ``root``; an absolute path is accepted only when it lies inside
    ``root`` (``datasets`` image folders record absolute paths of their own files)."""
    path = _check_path_string(path)
    if Path(path).is_absolute():
        return _inside(root, Path(path), path)
    return safe_join(root, path)


def load_image(src: Any):
    """Open an image as RGB; raises DataError (``reason``: missing, unreadable, empty or too large
    image) for one that cannot be used.

    ``src``: a path, a PIL image, a file-like object, or an undecoded ``datasets`` image
    (``{"bytes": ..., "path": ...}``; the readers confine its path to the image root first).
    An image whose header claims more than PIL's ``Image.MAX_IMAGE_PIXELS`` pixels is refused
    before it is decoded (a decompression bomb)."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(src, dict):
        if isinstance(src.get("bytes"), (bytes, bytearray)) and src["bytes"]:
            return load_image(io.BytesIO(src["bytes"]))
        if isinstance(src.get("path"), (str, Path)) and src["path"]:
            return load_image(src["path"])
        raise DataError("image entry has neither bytes nor a path", "unreadable image")
    if isinstance(src, Image.Image):
        img = src
    else:
        try:
            with Image.open(src) as im:
                limit = Image.MAX_IMAGE_PIXELS
                if limit and im.width * im.height > limit:
                    raise DataError(
                        f"image {src} is too large: {im.width}x{im.height} pixels (more than {limit})",
                        "image too large",
                    )
                im.load()
                img = im.copy()
        except DataError:
            raise
        except FileNotFoundError as e:
            raise DataError(f"image not found: {src}", "missing image") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # warning: -W error
            raise DataError(f"image {src} is too large: {e}", "image too large") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
            raise DataError(f"unreadable image {src}: {e}", "unreadable image") from e
    if img.width == 0 or img.height == 0:
        raise DataError(f"image {src} has zero size", "empty image")
    return img.convert("RGB")


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = path.read_text()
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i + 1}: invalid JSON: {e}") from e
        return
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of samples")
    yield from enumerate(data)


def parse_llava(obj: Any, image_root: Path, where: str) -> Record:
    """One LLaVA sample as a ``Record``; DataError (with the ``reason`` it is counted under) for
    anything of the wrong shape or type, and for image paths leaving ``image_root``."""
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
        raise DataError(f"{where}: sample needs a 'conversations' list")
    if not obj["conversations"]:
        raise DataError(f"{where}: 'conversations' is empty", "empty conversation")
    imgs = obj.get("images", obj.get("image"))
    if imgs is None:
        rels = []
    elif isinstance(imgs, str):
        rels = [imgs]
    elif isinstance(imgs, list):
        rels = imgs
    else:
        raise DataError(
            f"{where}: 'image'/'images' must be a path or a list of paths, got {type(imgs).__name__}",
            "malformed image field",
        )
    turns = []
    for t in obj["conversations"]:
        role = ROLES.get(t.get("from") or t.get("role")) if isinstance(t, dict) else None
        text = t.get("value", t.get("content")) if isinstance(t, dict) else None
        if role is None or not isinstance(text, str):
            raise DataError(f"{where}: bad turn {t!r:.200}", "malformed turn")
        turns.append((role, text))
    if not any(r == "user" for r, _ in turns):
        raise DataError(f"{where}: no user turn", "no user turn")
    sample_id = obj.get("id", where)
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise DataError(
            f"{where}: 'id' must be a string or an integer, got {sample_id!r:.100}", "malformed id"
        )
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise DataError(f"{where}: 'task' must be a string, got {task!r:.100}", "malformed task")
    images = [safe_join(image_root, r) for r in rels]  # type and NUL checks, confinement
    marks = sum(text.count(IMAGE_MARK) for _, text in turns)
    if rels and marks == 0:  # LLaVA convention: image before the first instruction
        first = next(i for i, (r, _) in enumerate(turns) if r == "user")
        role, text = turns[first]
        turns[first] = (role, IMAGE_MARK + "\n" + text)
    elif marks != len(rels):
        raise DataError(f"{where}: {marks} '<image>' markers for {len(rels)} images", "image markers")
    return Record(
        id=str(sample_id),
        images=images,
        turns=turns,
        task=task,
        meta={k: v for k, v in obj.items() if k not in ("id", "image", "images", "conversations", "task")},
    )


def read_llava(
    path: str | Path, image_root: str | Path | None = None, stats: ReadStats | None = None
) -> Iterator[Record]:
    """Records of a LLaVA-style JSON/JSONL file; ``image_root`` defaults to the file's folder.

    Malformed samples and image paths escaping the root are skipped and counted in ``stats``
    under the reason of their ``DataError``.
    """
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    stats = stats if stats is not None else ReadStats()
    for i, obj in _iter_json(path):
        stats.seen += 1
        try:
            rec = parse_llava(obj, root, f"{path.name}[{i}]")
        except DataError as e:
            stats.skip(e.reason)
            continue
        stats.kept += 1
        yield rec


def read_hf_dataset(
    path: str | Path,
    *,
    image_column: str = "image",
    prompt_column: str = "prompt",
    response_column: str | None = "response",
    task_column: str | None = None,
    id_column: str | None = None,
    split: str = "train",
    stats: ReadStats | None = None,
    image_root: str | Path | None = None,
) -> Iterator[Record]:
    """Records of a ``datasets`` dataset: a ``save_to_disk`` folder, a parquet file/folder, or an
    imagefolder. Column names come from the command line.

    Images stored as bytes are used as they are; an image given by path (an image folder, a path
    column, an image struct without bytes) must lie inside ``image_root`` (default: the dataset's
    folder, or the parquet file's), like the paths of LLaVA files. Rows with a path outside it, or
    with values of the wrong type, are skipped and counted."""
    p = Path(path)
    root = Path(image_root) if image_root is not None else (p if p.is_dir() else p.parent)
    ds = _undecoded_images(_open_dataset(p, split), image_column)
    stats = stats if stats is not None else ReadStats()
    missing = [
        c
        for c in (image_column, prompt_column, response_column, task_column, id_column)
        if c and c not in ds.column_names
    ]
    if missing:
        raise DataError(f"{path}: columns {missing} not in dataset (has {ds.column_names})")
    for i, row in enumerate(ds):
        stats.seen += 1
        img = row[image_column]
        prompt = row[prompt_column]
        task = row.get(task_column) if task_column else None
        try:
            entries = [] if img is None else img if isinstance(img, list) else [img]
            imgs = [_hf_image(x, root) for x in entries]
            if not isinstance(prompt, str):
                raise DataError(f"{path}[{i}]: prompt is not a string")
            if task is not None and not isinstance(task, str):
                raise DataError(f"{path}[{i}]: task is not a string", "malformed task")
        except DataError as e:
            stats.skip(e.reason)
            continue
        if imgs and IMAGE_MARK not in prompt:
            prompt = IMAGE_MARK * len(imgs) + "\n" + prompt
        turns = [("user", prompt)]
        if response_column and isinstance(row.get(response_column), str):
            turns.append(("assistant", row[response_column]))
        stats.kept += 1
        yield Record(
            id=str(row[id_column]) if id_column else f"{p.name}[{i}]",
            images=imgs,
            turns=turns,
            task=task,
        )


def _hf_image(entry: Any, root: Path) -> Any:
    """One image of a ``datasets`` row, as ``load_image`` takes it: a PIL image, ``{"bytes": ...}``,
    or ``{"path": <confined path>}`` (a dict, not a path: its file is not under a LLaVA image root,
    so generate.py saves such images beside its output like in-memory ones)."""
    from PIL import Image

    if isinstance(entry, Image.Image):
        return entry
    if isinstance(entry, dict):
        data, path = entry.get("bytes"), entry.get("path")
        if isinstance(data, (bytes, bytearray)) and data:
            return {"bytes": bytes(data)}
        if not data and path is not None:
            return {"path": str(confine(root, path))}
    elif isinstance(entry, str):
        return {"path": str(confine(root, entry))}
    raise DataError(f"image entry {entry!r:.100} is neither image bytes nor a path", "malformed image field")


def _undecoded_images(ds, column: str):
    """Keep images as raw bytes/paths: ``datasets`` would otherwise decode them inside the
    iterator, where one corrupt image aborts the whole read instead of being skipped."""
    import datasets

    feature = ds.features.get(column)
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    if isinstance(feature, (list, datasets.Sequence)):
        inner = feature[0] if isinstance(feature, list) else feature.feature
        if isinstance(inner, datasets.Image):
            return ds.cast_column(column, datasets.Sequence(datasets.Image(decode=False)))
    return ds


def _open_dataset(path: Path, split: str):
    import datasets

    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(path))
    elif path.suffix == ".parquet" or any(path.glob("*.parquet")):
        files = [str(path)] if path.is_file() else sorted(str(p) for p in path.glob("*.parquet"))
        ds = datasets.load_dataset("parquet", data_files=files)
    elif path.is_dir():
        ds = datasets.load_dataset("imagefolder", data_dir=str(path))
    else:
        raise DataError(f"{path}: not a saved dataset, parquet file/folder or image folder")
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r} (has {list(ds)})")
        ds = ds[split]
    return ds


def read_records(
    path: str | Path, image_root: str | Path | None = None, stats: ReadStats | None = None, **hf_columns: Any
) -> Iterator[Record]:
    """LLaVA JSON/JSONL by suffix, otherwise a ``datasets`` source."""
    p = Path(path)
    if p.suffix in (".json", ".jsonl"):
        return read_llava(p, image_root, stats)
    return read_hf_dataset(p, stats=stats, image_root=image_root, **hf_columns)


def read_sources(
    paths: list[str | Path],
    image_root_for: Any,
    stats: ReadStats,
    **hf_columns: Any,
) -> Iterator[tuple[Record, Path | None]]:
    """Records of every data source in order, each with the image root its LLaVA file resolved
    against (None for ``datasets`` sources). ``image_root_for(path)`` gives a source's root
    (None: the file's folder)."""
    for path in paths:
        p = Path(path)
        if not p.exists():
            raise DataError(f"data {p} does not exist")
        root = image_root_for(p)
        resolved = Path(root) if root else p.parent
        llava = p.suffix in (".json", ".jsonl")
        for rec in read_records(p, root, stats, **hf_columns):
            yield rec, resolved if llava else None


def hf_messages(record: Record, with_response: bool = False) -> list[dict[str, Any]]:
    """HF chat-template messages: "<image>" markers become {"type": "image"} items, in place."""
    out = []
    turns = record.turns
    if not with_response:  # the prompt: everything before the first assistant turn
        first = next((i for i, (r, _) in enumerate(turns) if r == "assistant"), len(turns))
        turns = turns[:first]
    for role, text in turns:
        if role == "user" and IMAGE_MARK in text:
            content: list[dict[str, Any]] = []
            for i, piece in enumerate(text.split(IMAGE_MARK)):
                if i:
                    content.append({"type": "image"})
                if piece.strip():
                    content.append({"type": "text", "text": piece.strip("\n")})
            out.append({"role": role, "content": content})
        else:
            out.append({"role": role, "content": [{"type": "text", "text": text}]})
    return out


def openai_messages(record: Record, images: list[Any]) -> list[dict[str, Any]]:
    """OpenAI-style messages for ``LLM.chat`` / ``vllm serve``: images as base64 data URLs, placed
    where the markers are, so vLLM builds the same prompt as ``hf_messages`` + the template."""
    from vllm.multimodal.utils import encode_image_url

    msgs = hf_messages(record)
    it = iter(images)
    for m in msgs:
        m["content"] = [
            {"type": "image_url", "image_url": {"url": encode_image_url(next(it))}}
            if c["type"] == "image"
            else c
            for c in m["content"]
        ]
    return msgs
