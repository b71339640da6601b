"""On-disk cache of the frozen target's image features, shared by every epoch and both phases.

Features are what ``TargetEncoder.image_features`` returns for one image ([n_tokens, embed_dim]),
keyed by the image's *content* (sha256 of its RGB pixels and size), so the same picture reached
through two data sets, two paths or an HF dataset row is computed once. Layout::

    <root>/<target fingerprint>/shard-<writer>-<uid>.safetensors   # tensors named by image key
    <root>/<target fingerprint>/shard-<writer>-<uid>.json          # index: size + sha256 per key

A shard counts only once its JSON index exists (written last, atomically), so a killed writer
leaves nothing half-valid. A different target (``TargetEncoder.fingerprint()``) reads and writes
another subfolder: changing the target invalidates the cache without touching other targets'.
Corruption is detected at open (missing/resized shard, unreadable header, key set mismatch: the
shard is deleted and its features recomputed) and on the first read of each entry in a process
(per-tensor sha256: the entries that still verify move to a new shard, the bad ones are
recomputed). A cache is used by one thread at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CACHE_VERSION = 1
STALE_TMP_S = 3600  # leftovers of a killed writer older than this are removed at open


class FeatureCacheError(RuntimeError):
    """The cache cannot serve a feature (the message says why and what to do)."""


def image_key(image: Any) -> str:
    """Content key of a PIL image: sha256 over its size and RGB bytes."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    computed: int = 0
    corrupt_shards: int = 0

    def summary(self) -> str:
        return (
            f"feature cache: {self.hits} hits, {self.computed} computed, "
            f"{self.corrupt_shards} corrupt shards rebuilt"
        )


class FeatureCache:
    """Image features by content key; ``root=None`` keeps them in memory only (``--no-feature-cache``)."""

    def __init__(
        self,
        root: str | Path | None,
        fingerprint: str,
        *,
        writer: str = "0",
        shard_bytes: int = 256 << 20,
        max_open: int = 64,
    ):
        self.fingerprint = fingerprint
        self.dir = None if root is None else Path(root) / fingerprint
        self.writer = writer
        self.shard_bytes = shard_bytes
        self.stats = CacheStats()
        self._entries: dict[str, tuple[str, str]] = {}  # key -> (shard file name, sha256)
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._verified: set[str] = set()
        self._handles: OrderedDict[str, Any] = OrderedDict()  # LRU of open safetensors files
        self._max_open = max_open
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write_json(self.dir / "cache.json", {"version": CACHE_VERSION, "fingerprint": fingerprint})
            self.reload()

    # ---- index -------------------------------------------------------------------------------
    def reload(self) -> None:
        """(Re)read every shard index in the folder, dropping corrupt shards (other writers' too)."""
        if self.dir is None:
            return
        self._close_all()
        self._entries.clear()
        now = time.time()
        for p in self.dir.glob("*.tmp"):
            if now - _mtime(p) > STALE_TMP_S:
                p.unlink(missing_ok=True)
        indexed = set()
        for idx in sorted(self.dir.glob("shard-*.json")):
            shard = idx.with_suffix(".safetensors")
            indexed.add(shard.name)
            keys = self._check_shard(idx, shard)
            if keys is None:
                self._drop_shard(shard.name)
                continue
            for k, digest in keys.items():
                self._entries[k] = (shard.name, digest)
        for shard in self.dir.glob("shard-*.safetensors"):
            # A shard without an index is a writer killed between the two renames.
            if shard.name not in indexed and now - _mtime(shard) > STALE_TMP_S:
                shard.unlink(missing_ok=True)

    def _check_shard(self, idx: Path, shard: Path) -> dict[str, str] | None:
        from safetensors import safe_open

        try:
            meta = json.loads(idx.read_text())
            if meta.get("fingerprint") != self.fingerprint or meta.get("version") != CACHE_VERSION:
                return None
            if not shard.is_file() or shard.stat().st_size != meta["size"]:
                return None
            with safe_open(str(shard), "pt") as f:
                if set(f.keys()) != set(meta["keys"]):
                    return None
            return dict(meta["keys"])
        except Exception:  # any failure to parse means the shard cannot be trusted
            return None

    def _drop_shard(self, name: str) -> None:
        """Forget and delete a corrupt shard; its keys become misses and are recomputed."""
        self.stats.corrupt_shards += 1
        self._handles.pop(name, None)
        self._verified -= {k for k, v in self._entries.items() if v[0] == name}
        self._entries = {k: v for k, v in self._entries.items() if v[0] != name}
        if self.dir is not None:
            (self.dir / name).unlink(missing_ok=True)
            (self.dir / name).with_suffix(".json").unlink(missing_ok=True)

    # ---- access ------------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        return key in self._pending or key in self._entries

    def __len__(self) -> int:
        return len(self._entries) + len(self._pending)

    def get(self, key: str) -> torch.Tensor | None:
        """The features of ``key``; None on a miss or when its shard proves corrupt (then dropped)."""
        if key in self._pending:
            return self._pending[key]
        entry = self._entries.get(key)
        if entry is None:
            return None
        name, digest = entry
        try:
            t = self._handle(name).get_tensor(key)
        except Exception:
            t = None
        if t is None or (key not in self._verified and tensor_digest(t) != digest):
            self._salvage(name)
            return None
        self._verified.add(key)  # hashed once per process: later epochs read at full speed
        self.stats.hits += 1
        return t

    def _salvage(self, name: str) -> None:
        """Replace a shard found corrupt on read by one holding its entries that still verify."""
        good = {}
        for key, (shard, digest) in list(self._entries.items()):
            if shard != name:
                continue
            try:
                t = self._handle(name).get_tensor(key)
            except Exception:
                continue
            if tensor_digest(t) == digest:
                good[key] = t.clone()
        self._drop_shard(name)
        for key, t in good.items():
            self._pending[key] = t
            self._pending_bytes += t.numel() * t.element_size()
        self.flush()

    def _handle(self, name: str):
        from safetensors import safe_open

        h = self._handles.get(name)
        if h is None:
            assert self.dir is not None
            h = safe_open(str(self.dir / name), "pt")
            self._handles[name] = h
            while len(self._handles) > self._max_open:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(name)
        return h

    def _close_all(self) -> None:
        self._handles.clear()

    def put(self, key: str, features: torch.Tensor) -> None:
        """Add features (buffered; written as a shard once ``shard_bytes`` accumulate or on flush)."""
        if key in self:
            return
        t = features.detach().contiguous().cpu()
        self._pending[key] = t
        self._pending_bytes += t.numel() * t.element_size()
        self.stats.computed += 1
        if self.dir is not None and self._pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write buffered features as one shard: tensors first, then the index (the commit point)."""
        if self.dir is None or not self._pending:
            return
        from safetensors.torch import save_file

        name = f"shard-{self.writer}-{uuid.uuid4().hex[:12]}"
        shard, idx = self.dir / f"{name}.safetensors", self.dir / f"{name}.json"
        tmp = self.dir / f"{name}.safetensors.tmp"
        save_file(self._pending, str(tmp))
        _fsync(tmp)
        tmp.replace(shard)
        keys = {k: tensor_digest(t) for k, t in self._pending.items()}
        meta = {
            "version": CACHE_VERSION,
            "fingerprint": self.fingerprint,
            "size": shard.stat().st_size,
            "keys": keys,
        }
        self._write_json(idx, meta)
        for k, d in keys.items():
            self._entries[k] = (shard.name, d)
        self._pending.clear()
        self._pending_bytes = 0

    @staticmethod
    def _write_json(path: Path, obj: Any) -> None:
        tmp = path.with_name(path.name + f".{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(obj))
        _fsync(tmp)
        tmp.replace(path)

    def disk_bytes(self) -> int:
        if self.dir is None:
            return 0
        return sum(p.stat().st_size for p in self.dir.glob("shard-*.safetensors"))


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return time.time()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
