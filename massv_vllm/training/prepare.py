"""From data files to training samples: records become token layouts (``data.samples``) and every
image gets the target's image features, read from the feature cache or computed by the target on
a miss (on several GPUs each rank computes its share)."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from massv_vllm.training.data.feature_cache import FeatureCache, FeatureCacheError, image_key
from massv_vllm.training.data.records import DataError, ReadStats, Record, load_image, read_sources
from massv_vllm.training.data.samples import (
    RESPONSE_TEXT,
    RESPONSE_TOKEN_IDS,
    Sample,
    SampleBuilder,
    sample_digest,
)
from massv_vllm.training.distributed import Dist, barrier, say
from massv_vllm.training.generation import META as GENERATION_META
from massv_vllm.training.recipes import PRETRAIN, TrainingError


def _target_dtype(target: Path) -> torch.dtype:
    raw = json.loads((target / "config.json").read_text())
    name = raw.get("dtype") or raw.get("torch_dtype") or raw.get("text_config", {}).get("dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


class FeatureSource:
    """Target image features for training: from the cache, computed by the target on a miss.

    During data preparation ``add`` queues every image whose features are missing (on several GPUs
    each rank computes its share of keys); ``get`` serves training and recomputes an entry whose
    shard proved corrupt, when its image file is still at hand.
    """

    def __init__(
        self,
        cache: FeatureCache,
        target: Path,
        device: torch.device,
        dtype: torch.dtype,
        batch_size: int,
        dist: Dist,
    ):
        self.cache = cache
        self.target = target
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self.dist = dist
        self._encoder = None
        self._queue: dict[str, Any] = {}
        self._paths: dict[str, Any] = {}
        self._shared = cache.dir is not None  # ranks split the work only through a disk cache

    def _enc(self):
        if self._encoder is None:
            from massv_vllm.training.target_features import TargetEncoder

            self._encoder = TargetEncoder(self.target, device=self.device, dtype=self.dtype)
        return self._encoder

    def _mine(self, key: str) -> bool:
        return (
            not self._shared or self.dist.world == 1 or int(key[:8], 16) % self.dist.world == self.dist.rank
        )

    def add(self, key: str, image: Any, src: Any) -> None:
        if isinstance(src, (str, Path)):
            self._paths[key] = src
        if key in self.cache or key in self._queue or not self._mine(key):
            return
        self._queue[key] = image
        if len(self._queue) >= self.batch_size:
            self._compute()

    def _compute(self) -> None:
        if not self._queue:
            return
        keys = list(self._queue)
        feats = self._enc().image_features([self._queue[k] for k in keys])
        try:
            for k, f in zip(keys, feats):
                self.cache.put(k, f.to(self.dtype))
        except OSError as e:
            raise FeatureCacheError(f"cannot write the feature cache in {self.cache.dir}: {e}") from e
        self._queue.clear()

    def finish(self, keys: set[str]) -> None:
        """Compute what is queued, publish it and check every needed key is available."""
        self._compute()
        try:
            self.cache.flush()
        except OSError as e:
            raise FeatureCacheError(f"cannot write the feature cache in {self.cache.dir}: {e}") from e
        barrier(self.dist)
        if self.dist.world > 1:
            self.cache.reload()
        missing = [k for k in keys if k not in self.cache]
        if missing:
            raise FeatureCacheError(
                f"{len(missing)} image features missing from {self.cache.dir} after preparation"
            )
        self.release_encoder()

    def release_encoder(self) -> None:
        if self._encoder is not None:
            self._encoder = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def get(self, key: str) -> torch.Tensor:
        t = self.cache.get(key)
        if t is not None:
            return t
        src = self._paths.get(key)
        if src is None:
            raise FeatureCacheError(
                f"cached features of image {key[:12]} were corrupt and removed, and the image is not a file "
                "that can be re-read now; restart the run with --resume to rebuild them"
            )
        image = load_image(src)
        if image_key(image) != key:
            raise FeatureCacheError(f"image {src} changed on disk since data preparation")
        feats = self._enc().image_features([image])[0].to(self.dtype)
        self.cache.put(key, feats)
        self.cache.flush()
        return feats


def default_image_root(data: Path, image_root: str | None) -> str | None:
    """``--image-root``, else the root recorded by generate.py beside the data, else None.

    The recorded root is data, not a command-line choice: it is used only when it lies inside the
    data file's folder (where generate.py keeps the images of ``datasets`` inputs). A root
    elsewhere (generate.py read LLaVA images from another folder, or the file was tampered with:
    ``"/"``) is refused with the ``--image-root`` to pass instead."""
    if image_root is not None:
        return image_root
    meta = data.parent / GENERATION_META
    if data.suffix not in (".json", ".jsonl") or not meta.is_file():
        return None
    try:
        raw = json.loads(meta.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{meta}: cannot read it ({e}); pass --image-root") from e
    root = raw.get("image_root") if isinstance(raw, dict) else None
    if root is None or root == "":
        return None
    folder = data.parent.resolve()
    try:
        if not isinstance(root, str) or "\x00" in root:
            raise ValueError(f"not a path: {root!r:.100}")
        resolved = (folder / root).resolve()
    except (OSError, ValueError, RuntimeError) as e:
        raise DataError(f"{meta}: bad image_root ({e}); pass --image-root") from e
    if resolved != folder and folder not in resolved.parents:
        raise DataError(
            f"{meta} names the image root {resolved}, outside the data's folder {folder}; data cannot "
            f"choose where images are read from: pass --image-root {resolved} if that is where "
            "generate.py read them"
        )
    return str(resolved)


def iter_records(args: argparse.Namespace, stats: ReadStats) -> Iterator[Record]:
    hf = dict(
        image_column=args.image_column,
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        id_column=args.id_column,
        split=args.split,
    )
    for rec, _ in read_sources(args.data, lambda p: default_image_root(p, args.image_root), stats, **hf):
        yield rec


def prepare_samples(
    records: Iterator[Record],
    builder: SampleBuilder,
    features: FeatureSource | None,
    *,
    max_samples: int | None = None,
    progress: bool = False,
) -> list[Sample]:
    """Build every sample (skip-and-count) and queue missing image features for computation."""
    from tqdm import tqdm

    samples: list[Sample] = []
    keys: set[str] = set()
    bar = tqdm(desc="preparing data", unit="rec", disable=not progress, mininterval=2)
    for index, rec in enumerate(records):
        if max_samples is not None and index >= max_samples:
            break
        bar.update()
        built = builder.build(index, rec)
        if built is None:
            continue
        sample, images = built
        if features is not None:
            for key, img, src in zip(sample.image_keys, images, rec.images):
                features.add(key, img, src)
                keys.add(key)
        samples.append(sample)
    bar.close()
    if features is not None:
        features.finish(keys)
    return samples


@dataclass
class PreparedData:
    samples: list[Sample]
    stats: ReadStats
    digest: str
    features: FeatureSource | None
    cache_dir: Path | None
    pad_id: int


def prepare_data(args: argparse.Namespace, phase: str, model: Any, dist: Dist, out: Path) -> PreparedData:
    from massv_vllm.training.target_features import TargetEncoder

    target = Path(args.target)
    # Features as vLLM computes them: in the target's dtype on GPU (fp32 on CPU).
    feature_dtype = _target_dtype(target) if dist.device.type == "cuda" else torch.float32
    encoder = TargetEncoder(target, dtype=feature_dtype, load_vision=False)
    read_stats, build_stats = ReadStats(), ReadStats()
    response = RESPONSE_TEXT if phase == PRETRAIN else RESPONSE_TOKEN_IDS
    builder = SampleBuilder(encoder, max_len=args.max_len, response=response, stats=build_stats)
    progress = dist.main and not args.no_progress
    features, cache_dir = None, None
    if model.projector is not None:  # text-only drafters never look at image features
        cache_dir = (
            None if args.no_feature_cache else Path(args.feature_cache or _default_cache(args, out, dist))
        )
        cache = FeatureCache(cache_dir, encoder.fingerprint(), writer=f"r{dist.rank}-{os.getpid()}")
        features = FeatureSource(cache, target, dist.device, feature_dtype, args.feature_batch_size, dist)
    samples = prepare_samples(
        iter_records(args, read_stats), builder, features, max_samples=args.max_samples, progress=progress
    )
    stats = ReadStats(
        seen=read_stats.seen,
        kept=len(samples),
        skipped=read_stats.skipped + build_stats.skipped,
        cut=read_stats.cut + build_stats.cut,
    )
    say(dist, f"data: {stats.summary()}")
    if features is not None:
        say(dist, features.cache.stats.summary() + (f" ({cache_dir})" if cache_dir else " (in memory)"))
    if not samples:
        hint = (
            ""
            if phase == PRETRAIN
            else " (phase 2 needs generate.py output: records with response_token_ids)"
        )
        raise TrainingError(f"no usable samples in {args.data}: {stats.summary()}{hint}")
    pad = encoder.tokenizer.pad_token_id
    return PreparedData(
        samples, stats, sample_digest(samples), features, cache_dir, 0 if pad is None else pad
    )


def _default_cache(args: argparse.Namespace, out: Path, dist: Dist | None = None) -> Path:
    """Phase 2 reuses the cache phase 1 recorded in its drafter's provenance (same target).

    ``provenance.json`` is data: it may only *select* phase 1's default cache, the
    ``feature-cache`` folder beside the ``--drafter`` folder (``<phase 1 out>/feature-cache``),
    never name a folder to write to. A cache recorded anywhere else is not used (say so: pass
    ``--feature-cache`` to reuse it); the run's own ``<out>/feature-cache`` is used instead."""
    drafter = Path(args.drafter)
    prov = drafter / "provenance.json"
    recorded = None
    if prov.is_file():
        try:
            raw = json.loads(prov.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raw = None
        recorded = raw.get("feature_cache") if isinstance(raw, dict) else None
    if isinstance(recorded, str) and recorded and "\x00" not in recorded:
        beside = drafter.resolve().parent / "feature-cache"
        try:
            same = Path(recorded).resolve() == beside and not beside.is_symlink() and beside.is_dir()
        except (OSError, RuntimeError):
            same = False
        if same:
            return beside
        if dist is not None:
            say(
                dist,
                f"note: {prov} records the feature cache {recorded!r:.300}; only {beside} (beside the "
                f"drafter) is reused by default; pass --feature-cache to reuse another one",
            )
    return out / "feature-cache"
