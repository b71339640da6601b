"""Self-distilled data for SDViT: the target answers instruction prompts through vLLM.

Each prompt gets ``--responses-per-prompt`` responses; response ``s`` of record ``r`` is sampled
with the schedule entry ``schedule[(h(r) + s) % len(schedule)]`` (``h`` a stable hash of the record
id, so even one response per prompt covers the whole schedule across the data set) and a per-request
seed, so a run is reproducible and a resumed run samples exactly what the first would have.

Output (``--out``)::

    shard-000000.jsonl ...   LLaVA-style records, one per response, written atomically (tmp + rename)
    index.json               done-index: shard -> keys (record id, sample index); rebuilt from shards
    generated.jsonl          all shards merged (what ``read_llava`` / sdvit.py read)
    generation.json          settings, image root and statistics (sdvit.py takes the image root
                             from here only when it lies inside this folder: pass --image-root
                             otherwise)
    images/                  only for HF-dataset inputs: their images, saved so SDViT can reload them

Each record keeps the prompt turns, the response text *and* its token ids exactly as the target
produced them (``response_token_ids``; ends with the stop token when the target stopped by
itself), the prompt token ids vLLM ran (``prompt_token_ids``: SDViT checks its own prompt
layout against them), the sampling parameters and image paths relative to the image root.
A killed run resumes where it stopped: done keys are skipped, nothing is duplicated.

A response in which the target sampled an image/video placeholder token (image pad, vision
start/end, Gemma's image soft token / start or end of image) is cut before that token (its
``finish_reason`` becomes ``"placeholder"``, ``cut`` records where and what vLLM said) and counted
in the statistics: SDViT would otherwise find more image positions than images in the sample. One
whose very first token is a placeholder is skipped and counted. Images that cannot be used
(missing, unreadable, empty, or claiming more pixels than PIL's decompression-bomb limit) skip
their prompt and are counted.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from massv_vllm.training.data.records import (
    DataError,
    ReadStats,
    Record,
    load_image,
    openai_messages,
    read_sources,
)
from massv_vllm.training.data.samples import (
    PLACEHOLDER_CUT,
    PLACEHOLDER_ONLY,
    first_placeholder,
    placeholder_token_ids,
    skip_reason,
    strip_images,
)

DEFAULT_SCHEDULE = "0.0:1.0,0.3:0.9,0.7:0.95,1.0:1.0"
OUTPUT = "generated.jsonl"
META = "generation.json"
INDEX = "index.json"
_BACK_ROLES = {"user": "human", "assistant": "gpt", "system": "system"}  # inverse of records.ROLES


class GenerationError(RuntimeError):
    """The generation run cannot start or continue; the message says why."""


def parse_schedule(spec: str | list[Any]) -> list[tuple[float, float]]:
    """``"T:P,T:P,..."`` (or a JSON list of [T, P] pairs) -> [(temperature, top_p), ...]."""
    pairs: list[Any]
    if isinstance(spec, str):
        try:
            pairs = [tuple(float(x) for x in item.split(":")) for item in spec.split(",") if item.strip()]
        except ValueError as e:
            raise GenerationError(f"--schedule {spec!r}: expected 'temperature:top_p,...' ({e})") from e
    else:
        pairs = [tuple(float(x) for x in item) for item in spec]
    out = []
    for pair in pairs:
        if len(pair) != 2:
            raise GenerationError(f"--schedule entry {pair!r}: expected temperature:top_p")
        t, p = pair
        if t < 0 or not 0 < p <= 1:
            raise GenerationError(f"--schedule entry {t}:{p}: need temperature >= 0 and 0 < top_p <= 1")
        out.append((t, p))
    if not out:
        raise GenerationError("--schedule is empty")
    return out


def _stable_int(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()[:8], "big")


def sampling_for(
    record_id: str, s: int, schedule: list[tuple[float, float]], seed: int
) -> tuple[float, float, int]:
    """(temperature, top_p, seed) of response ``s`` of ``record_id``."""
    t, p = schedule[(_stable_int("schedule", record_id) + s) % len(schedule)]
    return t, p, _stable_int(seed, record_id, s) & 0x7FFFFFFF


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate.py",
        description="Self-distilled SDViT data: the target answers instruction prompts (vLLM).",
    )
    p.add_argument("--recipe", help="JSON recipe (train/recipes/) supplying defaults for these options")
    p.add_argument("--target", required=True, help="target VLM folder (or anything vLLM loads)")
    p.add_argument(
        "--data", nargs="+", required=True, help="instruction data: LLaVA JSON/JSONL or HF datasets"
    )
    p.add_argument("--out", required=True, help="output folder (shards, generated.jsonl)")
    p.add_argument("--image-root", help="root of LLaVA image paths (default: beside the data file)")
    p.add_argument("--image-column", default="image", help="HF datasets: image column")
    p.add_argument("--prompt-column", default="prompt", help="HF datasets: instruction column")
    p.add_argument("--id-column", default=None, help="HF datasets: id column")
    p.add_argument("--split", default="train", help="HF datasets: split")
    p.add_argument("--schedule", default=DEFAULT_SCHEDULE, help="sampling schedule 'temperature:top_p,...'")
    p.add_argument("--responses-per-prompt", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=512, help="max response tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--text-only", action="store_true", help="drop the images from the prompts (text-only data)"
    )
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--shard-size", type=int, default=512, help="responses per shard (and per LLM.chat call)")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--max-images", type=int, default=4, help="images per prompt vLLM accepts")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--min-free-gb", type=float, default=1.0, help="free disk required at start")
    p.add_argument("--no-progress", action="store_true")
    return p


@dataclass
class GenerationResult:
    out: Path
    written: int  # responses written by this call
    total: int  # responses in generated.jsonl
    stats: ReadStats


class ShardStore:
    """Atomic JSONL shards + a done-index of (record id, sample index) keys."""

    def __init__(self, out: Path):
        self.out = out
        for tmp in out.glob("*.tmp"):
            tmp.unlink()  # a kill mid-write; the shard was never published
        idx = out / INDEX
        self.index: dict[str, list[list[Any]]] = json.loads(idx.read_text()) if idx.is_file() else {}
        for shard in self.shards():
            if shard.name not in self.index:  # killed between shard rename and index update
                self.index[shard.name] = [[r["source_id"], r["sample_index"]] for r in _read_jsonl(shard)]
        self.index = {k: v for k, v in self.index.items() if (out / k).is_file()}
        self.done = {(str(a), int(b)) for keys in self.index.values() for a, b in keys}

    def shards(self) -> list[Path]:
        return sorted(self.out.glob("shard-*.jsonl"))

    def write(self, rows: list[dict[str, Any]]) -> None:
        seq = 1 + max((int(p.stem.split("-")[1]) for p in self.shards()), default=-1)
        name = f"shard-{seq:06d}.jsonl"
        _atomic_write(self.out / name, "".join(json.dumps(r) + "\n" for r in rows))
        self.index[name] = [[r["source_id"], r["sample_index"]] for r in rows]
        _atomic_write(self.out / INDEX, json.dumps(self.index))
        self.done.update((r["source_id"], r["sample_index"]) for r in rows)

    def merge(self) -> int:
        """Concatenate the shards into generated.jsonl (atomically); returns the record count."""
        tmp = self.out / (OUTPUT + ".tmp")
        n = 0
        with open(tmp, "w") as f:
            for shard in self.shards():
                for line in shard.read_text().splitlines():
                    if line.strip():
                        f.write(line + "\n")
                        n += 1
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.out / OUTPUT)
        return n


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text().splitlines():
        if line.strip():
            yield json.loads(line)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _check_out(out: Path, min_free_gb: float) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise GenerationError(f"output folder {out} is not writable: {e}") from e
    free = shutil.disk_usage(out).free
    if free < min_free_gb * 1e9:
        raise GenerationError(
            f"not enough free disk space in {out}: {free / 1e9:.2f} GB free, --min-free-gb {min_free_gb} required"
        )


def _prompt_turns(record: Record) -> list[tuple[str, str]]:
    first = next((i for i, (r, _) in enumerate(record.turns) if r == "assistant"), len(record.turns))
    return record.turns[:first]


def _image_paths(record: Record, images: list[Any], image_root: Path, out: Path) -> list[str]:
    """Image paths relative to the generated data's image root (HF images are saved under out/images)."""
    from massv_vllm.training.data.feature_cache import image_key

    paths = []
    for src, img in zip(record.images, images):
        if isinstance(src, (str, Path)):
            paths.append(Path(src).resolve().relative_to(image_root.resolve()).as_posix())
            continue
        key = image_key(img)
        rel = Path("images") / key[:2] / f"{key}.png"
        if not (out / rel).is_file():
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            tmp = out / rel.with_suffix(".png.tmp")
            img.save(tmp, format="PNG")
            tmp.replace(out / rel)
        paths.append(rel.as_posix())
    return paths


def _iter_records(args: argparse.Namespace, stats: ReadStats) -> Iterator[tuple[Record, Path | None]]:
    hf = dict(
        image_column=args.image_column,
        prompt_column=args.prompt_column,
        response_column=None,
        id_column=args.id_column,
        split=args.split,
    )
    return read_sources(args.data, lambda p: args.image_root, stats, **hf)


def generate(args: argparse.Namespace, llm: Any = None) -> GenerationResult:
    """Generate (or continue generating) the SDViT data set; ``llm`` may be an existing vLLM ``LLM``."""
    out = Path(args.out)
    _check_out(out, args.min_free_gb)
    schedule = parse_schedule(args.schedule)
    if args.responses_per_prompt < 1:
        raise GenerationError("--responses-per-prompt must be >= 1")
    with open(out / ".lock", "w") as lock:  # one writer per output folder
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise GenerationError(f"another generate.py is writing to {out}") from e
        return _generate(args, llm, out, schedule)


def _generate(
    args: argparse.Namespace, llm: Any, out: Path, schedule: list[tuple[float, float]]
) -> GenerationResult:
    from tqdm import tqdm
    from vllm import SamplingParams

    from massv_vllm.provenance import file_hash, write_provenance

    store = ShardStore(out)
    read_stats, stats = ReadStats(), ReadStats()
    seen_ids: set[str] = set()
    work: list[tuple[Record, Path | None, int]] = []
    image_roots: set[str] = set()
    for n, (rec, root) in enumerate(_iter_records(args, read_stats)):
        if args.limit is not None and n >= args.limit:
            break
        if rec.id in seen_ids:  # keys are (record id, sample index): ids must be unique
            stats.skip("duplicate id")
            continue
        seen_ids.add(rec.id)
        if args.text_only:
            rec = strip_images(rec)
        elif rec.images:
            image_roots.add(str(root.resolve()) if root is not None else str(out.resolve()))
        for s in range(args.responses_per_prompt):
            if (rec.id, s) not in store.done:
                work.append((rec, root, s))
    if len(image_roots) > 1:
        raise GenerationError(f"data with different image roots in one run: {sorted(image_roots)}")
    image_root = Path(next(iter(image_roots))) if image_roots else out
    total_jobs = len(seen_ids) * args.responses_per_prompt
    print(
        f"[massv] generate: {total_jobs} responses for {len(seen_ids)} prompts; {total_jobs - len(work)} already "
        f"done, {len(work)} to go",
        file=sys.stderr,
    )

    if work and llm is None:
        from massv_vllm.engine import make_llm

        kw = {"tensor_parallel_size": args.tensor_parallel_size} if args.tensor_parallel_size > 1 else {}
        llm = make_llm(args.target, max_model_len=args.max_model_len, max_images=args.max_images, **kw)

    placeholders, tokenizer = _placeholders(llm) if work else (frozenset(), None)
    written = 0
    bar = tqdm(total=len(work), desc="generating", unit="resp", disable=args.no_progress)
    for lo in range(0, len(work), args.shard_size):
        chunk = work[lo : lo + args.shard_size]
        jobs, msgs, params = [], [], []
        loaded: dict[str, list[Any] | None] = {}
        for rec, _root, s in chunk:
            if rec.id not in loaded:
                try:
                    loaded[rec.id] = [load_image(src) for src in rec.images]
                except DataError as e:
                    stats.skip(skip_reason(e))
                    loaded[rec.id] = None
            images = loaded[rec.id]
            if images is None:
                continue
            t, p, seed = sampling_for(rec.id, s, schedule, args.seed)
            jobs.append((rec, images, s, t, p, seed))
            msgs.append(openai_messages(rec, images))
            params.append(SamplingParams(temperature=t, top_p=p, seed=seed, max_tokens=args.max_tokens))
        outputs = _chat(llm, msgs, params, stats)
        rows = []
        for (rec, images, s, t, p, seed), o in zip(jobs, outputs):
            if o is None:
                continue
            c = o.outputs[0]
            ids, text, finish, cut = list(c.token_ids), c.text, c.finish_reason, None
            k = first_placeholder(ids, placeholders)
            if k == 0:
                stats.skip(PLACEHOLDER_ONLY)
                continue
            if k is not None:
                cut = {"at": k, "token_id": ids[k], "vllm_finish_reason": finish}
                ids, finish = ids[:k], "placeholder"
                text = tokenizer.decode(ids, skip_special_tokens=True)
                stats.note_cut(PLACEHOLDER_CUT)
            row: dict[str, Any] = {
                "id": f"{rec.id}#{s}",
                "source_id": rec.id,
                "sample_index": s,
                "conversations": [{"from": _BACK_ROLES[r], "value": v} for r, v in _prompt_turns(rec)]
                + [{"from": "gpt", "value": text}],
                "response_token_ids": ids,
                "prompt_token_ids": list(o.prompt_token_ids),
                "finish_reason": finish,
                "sampling": {"temperature": t, "top_p": p, "seed": seed, "max_tokens": args.max_tokens},
            }
            if cut is not None:
                row["cut"] = cut
            if images:
                row["images"] = _image_paths(rec, images, image_root, out)
            if rec.task is not None:
                row["task"] = rec.task
            rows.append(row)
        if rows:
            store.write(rows)
            written += len(rows)
        bar.update(len(chunk))
    bar.close()

    total = store.merge()
    answered = {str(k[0]) for keys in store.index.values() for k in keys} & seen_ids
    stats.skipped.update(read_stats.skipped)
    stats.seen = len(seen_ids) + sum(read_stats.skipped.values()) + stats.skipped["duplicate id"]
    stats.kept = len(answered)
    meta = {
        "target": str(args.target),
        "image_root": os.path.relpath(image_root.resolve(), out.resolve()),
        "schedule": schedule,
        "responses_per_prompt": args.responses_per_prompt,
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "text_only": args.text_only,
        "responses": total,
        "stats": stats.to_dict(),
    }
    _atomic_write(out / META, json.dumps(meta, indent=2) + "\n")
    data_files = sorted(
        f for d in args.data for f in ([Path(d)] if Path(d).is_file() else Path(d).rglob("*")) if f.is_file()
    )
    write_provenance(
        out,
        kind="generate",
        inputs={"target": str(args.target), "data": [str(d) for d in args.data]},
        extra={"data_hash": file_hash(data_files), **meta},
    )
    print(
        f"[massv] generate: wrote {written} responses; {total} in {out / OUTPUT}; {stats.summary()}",
        file=sys.stderr,
    )
    root_r, out_r = image_root.resolve(), out.resolve()
    if root_r != out_r and out_r not in root_r.parents:
        print(
            f"[massv] generate: the images stay in {root_r}; give sdvit.py --image-root {root_r} "
            "(it does not take an image root outside the data's folder from generation.json)",
            file=sys.stderr,
        )
    return GenerationResult(out, written, total, stats)


def _placeholders(llm: Any) -> tuple[frozenset[int], Any]:
    """The target's placeholder token ids (responses are cut before them) and its tokenizer."""
    tokenizer = llm.get_tokenizer()
    return placeholder_token_ids(llm.model_config.hf_config, tokenizer), tokenizer


def _chat(llm: Any, msgs: list[Any], params: list[Any], stats: ReadStats) -> list[Any]:
    """``LLM.chat`` on a batch; if vLLM rejects the batch (a prompt too long, say), retry one by
    one so a single bad prompt is skipped and counted instead of failing the run."""
    if not msgs:
        return []
    try:
        return llm.chat(msgs, params, use_tqdm=False)
    except ValueError:
        pass
    outs = []
    for m, sp in zip(msgs, params):
        try:
            outs.append(llm.chat([m], sp, use_tqdm=False)[0])
        except ValueError:
            stats.skip("rejected by vLLM (prompt too long?)")
            outs.append(None)
    return outs


def main(argv: list[str] | None = None) -> None:
    from massv_vllm.training.recipes import TrainingError, parse_args_with_recipe

    args = parse_args_with_recipe(build_parser(), "generate", argv)
    try:
        generate(args)
    except (GenerationError, DataError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
