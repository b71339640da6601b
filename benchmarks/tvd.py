"""TVD diagnostic: how far each drafter's next-token distribution is from the target's, per token.

    python -m benchmarks.tvd --target Qwen2.5-VL-7B-Instruct --eval heldout.json \\
        --drafters text=drafters/text phase1=drafters/massv-p1 massv=drafters/massv --out runs/tvd

Teacher-forced along target responses on held-out image prompts: prompt + response go through the
TARGET (transformers ``AutoModelForImageTextToText``, processor inputs built by ``TargetEncoder``)
and through every drafter (``MassvDrafter.forward`` with ``TargetEncoder.image_features`` as image
embeddings). At every response position (the positions that predict a response token; prompt and
image positions are not counted) it computes, at temperature 1,

    TVD = 0.5 * Σ_v |p_drafter(v) - p_target(v)|      and      top-1 agreement (argmax equal).

The drafter's vocab is padded to the target's text vocab (padded rows have probability 0).

Responses (``--responses``):
* ``reference``: the eval set's reference answer, tokenized, plus the end-of-turn token;
* ``token_ids``: the target's own tokens as ``generate.py`` wrote them (``response_token_ids`` of
  each record, e.g. ``--eval generated.jsonl``; or, with ``--responses-file generated.jsonl``,
  matched to the eval records by generate.py's ``source_id``);
* ``generate``: greedy generation with the transformers target (``--max-new-tokens``).

Writes ``tvd.json`` (summary per drafter, overall and per task: mean, median, p10/p25/p75/p90,
top-1 agreement, token count), ``tvd_hist.png`` and ``tokens.jsonl`` (per-record values; a rerun
with the same settings resumes after the last finished record).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks import cli
from benchmarks.evalset import EvalItem, add_eval_args, load_eval_set
from benchmarks.report import (
    META_SCHEMA,
    NUM,
    ListOf,
    MapOf,
    Opt,
    check_schema,
    fmt,
    format_table,
    histograms,
    run_metadata,
    write_json,
)
from massv_vllm.metrics import distribution_summary, probs_from_logits, top1_agreement, tvd
from massv_vllm.training.data.records import ReadStats, hf_messages

RESPONSE_SOURCES = ("reference", "token_ids", "generate")
RESULTS_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def compare_logits(
    target_logits: torch.Tensor, drafter_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position TVD and top-1 agreement of two [N, V] logit tensors (softmax at T=1, fp32)."""
    if target_logits.shape != drafter_logits.shape:
        raise ValueError(
            f"target logits {tuple(target_logits.shape)} and drafter logits {tuple(drafter_logits.shape)} "
            "differ: the drafter's vocab must be padded to the target's text vocab (massv-build-drafter does)"
        )
    p_t = probs_from_logits(target_logits)
    p_d = probs_from_logits(drafter_logits.to(target_logits.device))
    return tvd(p_d, p_t), top1_agreement(p_d, p_t)


def response_slice(prompt_len: int, response_len: int) -> slice:
    """Logit positions that predict the response tokens: position i predicts token i + 1."""
    if prompt_len < 1 or response_len < 1:
        raise ValueError("need a non-empty prompt and response")
    return slice(prompt_len - 1, prompt_len + response_len - 1)


class Scorer:
    """The target (transformers) plus drafters, scoring one record at a time."""

    def __init__(self, target: str | Path, drafters: dict[str, str], device: str, dtype: torch.dtype):
        from transformers import AutoModelForImageTextToText

        from massv_vllm.serving.checks import check_pair
        from massv_vllm.training.modeling import MassvDrafter
        from massv_vllm.training.target_features import TargetEncoder

        self.device = torch.device(device)
        # TargetEncoder without its own vision copy: its image_features run on the full target's
        # inner model (same tower + merger/projector), so the target is loaded once, not twice.
        self.encoder = TargetEncoder(target, device=self.device, dtype=dtype, load_vision=False)
        for name, path in drafters.items():
            try:
                check_pair(path, self.encoder.config, target)
            except ValueError as e:
                raise ValueError(f"drafter {name!r}: {e}") from e
        self.model = (
            AutoModelForImageTextToText.from_pretrained(str(target), dtype=dtype, trust_remote_code=False)
            .to(self.device)
            .eval()
        )
        self.encoder.vision = self.model.model
        self.drafters = {
            n: MassvDrafter.from_pretrained(p, dtype=dtype, device=self.device).eval()
            for n, p in drafters.items()
        }
        self._end_id: int | None = None

    @property
    def end_id(self) -> int:
        if self._end_id is None:
            from massv_vllm.training.data.samples import end_of_turn_id

            self._end_id = end_of_turn_id(self.encoder)
        return self._end_id

    def prompt_inputs(self, item: EvalItem) -> dict[str, torch.Tensor]:
        """Processor inputs of the templated prompt (placeholders expanded exactly as vLLM does)."""
        text = self.encoder.chat_prompt(hf_messages(item.record))
        proc = self.encoder.processor
        if item.images:
            out = proc(text=[text], images=[item.images], return_tensors="pt")
        else:
            out = proc(text=[text], return_tensors="pt")
        return {k: v.to(self.device) for k, v in out.items() if isinstance(v, torch.Tensor)}

    def reference_ids(self, item: EvalItem) -> list[int] | None:
        text = item.record.response
        if not text or not text.strip():
            return None
        return list(self.encoder.tokenizer(text, add_special_tokens=False).input_ids) + [self.end_id]

    @torch.no_grad()
    def generate_ids(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> list[int]:
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        return out[0, inputs["input_ids"].shape[1] :].tolist()

    @torch.no_grad()
    def score(
        self, item: EvalItem, inputs: dict[str, torch.Tensor], response: list[int]
    ) -> dict[str, dict[str, list]]:
        """Per drafter, per response token: TVD and top-1 agreement against the target."""
        p = inputs["input_ids"].shape[1]
        r = len(response)
        resp = torch.tensor([response], dtype=inputs["input_ids"].dtype, device=self.device)
        full = {}
        for k, v in inputs.items():
            # Every per-token [1, P] tensor grows by the response: ids, mask (1) and token-type
            # style masks (0: response tokens are text).
            if v.dim() == 2 and v.shape == (1, p):
                ext = resp if k == "input_ids" else torch.full_like(resp, 1 if k == "attention_mask" else 0)
                full[k] = torch.cat([v, ext.to(v.dtype)], dim=1)
            else:
                full[k] = v
        sl = response_slice(p, r)
        # Only the last r + 1 positions' logits are needed (the last one predicts past the response).
        target_logits = self.model(**full, logits_to_keep=r + 1).logits[0, :-1]
        embeds = self.encoder.image_features(item.images) if item.images else []
        image_embeds = torch.cat(embeds).to(self.device) if embeds else None
        out: dict[str, dict[str, list]] = {"tvd": {}, "top1": {}}
        for name, d in self.drafters.items():
            logits = d(
                full["input_ids"], image_embeds=image_embeds if d.projector is not None else None
            ).logits
            t, a = compare_logits(target_logits, logits[0, sl])
            out["tvd"][name] = t.tolist()
            out["top1"][name] = [bool(x) for x in a.tolist()]
        return out


# ---- summary, schema, report ----------------------------------------------------------------------


def summarise(lines: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per drafter, overall and per task: TVD distribution summary, top-1 agreement, token count."""
    groups: dict[str, list[dict[str, Any]]] = {"all": lines}
    for ln in lines:
        groups.setdefault(ln["task"], []).append(ln)
    out: dict[str, Any] = {}
    for name in names:
        per: dict[str, Any] = {}
        for g, ls in groups.items():
            vals = [v for ln in ls for v in ln["tvd"][name]]
            agree = [a for ln in ls for a in ln["top1"][name]]
            per[g] = {
                "num_tokens": len(vals),
                "tvd": distribution_summary(vals),
                "top1_agreement": sum(agree) / len(agree) if agree else None,
            }
        out[name] = per
    return out


def overall(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per drafter, the all-tasks figures of a ``tvd.json`` document: mean and median TVD, top-1
    agreement and the number of tokens scored."""
    return {
        n: {
            "mean": (v["all"]["tvd"] or {}).get("mean"),
            "median": (v["all"]["tvd"] or {}).get("median"),
            "top1_agreement": v["all"]["top1_agreement"],
            "num_tokens": v["all"]["num_tokens"],
        }
        for n, v in doc["summary"].items()
    }


STATS_SCHEMA = {"mean": NUM, "median": NUM, "p10": NUM, "p25": NUM, "p75": NUM, "p90": NUM}


SCHEMA = {
    "version": int,
    "meta": META_SCHEMA,
    "target": str,
    "eval": {"path": str, "tasks": MapOf(int), "read_stats": dict},
    "responses": str,
    "drafters": MapOf(str),
    "num_records": int,
    "summary": MapOf(MapOf({"num_tokens": int, "tvd": Opt(STATS_SCHEMA), "top1_agreement": Opt(NUM)})),
    "histogram": {"bins": int, "range": ListOf(NUM)},
    "plots": ListOf(str),
}


def format_report(doc: dict[str, Any]) -> str:
    rows = []
    for name, per in doc["summary"].items():
        s = per["all"]
        t = s["tvd"] or {}
        rows.append(
            [name, s["num_tokens"], fmt(t.get("mean"), 3), fmt(t.get("median"), 3), fmt(t.get("p10"), 3),
             fmt(t.get("p90"), 3), fmt(s["top1_agreement"], 3)]
        )  # fmt: skip
    return format_table(
        ["drafter", "tokens", "TVD mean", "median", "p10", "p90", "top-1 agree"],
        rows,
        f"TVD to the target ({doc['responses']} responses, {doc['num_records']} records)",
    )


# ---- the whole run ------------------------------------------------------------------------------


def _read_token_file(path: str | Path) -> dict[str, list[int]]:
    """``{record id: response_token_ids}`` from a generate.py JSONL (``generated.jsonl``).

    generate.py names its rows ``<source id>#<sample>`` and keeps ``source_id``: rows are matched to
    eval records by ``source_id`` (else ``id``), and of several samples of one prompt the one with
    the lowest ``sample_index`` is used.
    """
    out: dict[str, tuple[int, list[int]]] = {}
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i + 1}: invalid JSON: {e}") from e
        ids = obj.get("response_token_ids")
        key = obj.get("source_id", obj.get("id"))
        if key is None or not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError(
                f"{path}:{i + 1}: expected 'id' (or 'source_id') and a 'response_token_ids' list"
            )
        rank = int(obj.get("sample_index", 0))
        if str(key) not in out or rank < out[str(key)][0]:
            out[str(key)] = (rank, ids)
    return {k: v for k, (_, v) in out.items()}


def run_tvd(
    target: str | Path,
    eval_path: str | Path,
    drafters: dict[str, str],
    out_dir: str | Path,
    *,
    responses: str = "reference",
    responses_file: str | Path | None = None,
    max_new_tokens: int = 128,
    image_root: str | Path | None = None,
    limit: int | None = None,
    tasks: list[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    bins: int = 50,
    fresh: bool = False,
    hf_columns: dict[str, Any] | None = None,
    argv: list[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score every record with every drafter, write tvd.json + tvd_hist.png, return the summary."""
    from tqdm import tqdm

    if responses not in RESPONSE_SOURCES:
        raise ValueError(f"responses must be one of {RESPONSE_SOURCES}, got {responses!r}")
    if responses_file is not None and responses != "token_ids":
        raise ValueError("--responses-file only goes with --responses token_ids")
    if not drafters:
        raise ValueError("no drafters given")
    # TVD scores next-token distributions, which a parallel-drafting drafter has too.
    drafters = {n: str(p).removeprefix("parallel:") for n, p in drafters.items()}
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = ReadStats()
    task_items = load_eval_set(eval_path, image_root, limit, tasks, stats, **(hf_columns or {}))
    items = [it for v in task_items.values() for it in v]
    token_file = _read_token_file(responses_file) if responses_file else None
    settings = {
        "responses": responses,
        "responses_file": str(responses_file) if responses_file else None,
        "max_new_tokens": max_new_tokens,
        "dtype": dtype,
        "drafters": {k: str(Path(v).resolve()) for k, v in drafters.items()},
        "target": str(Path(target).resolve()),
        "ids": [it.record.id for it in items],
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    tokens_path, state_path = out / "tokens.jsonl", out / "tvd_state.json"
    done: dict[str, dict[str, Any]] = {}
    if not fresh and tokens_path.is_file() and state_path.is_file():
        if json.loads(state_path.read_text()).get("key") == key:
            for line in tokens_path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a killed run: redo that record
                    continue
                done[rec["id"]] = rec
                if "skipped" in rec:
                    stats.skip(rec["skipped"])
        else:
            print("[tvd] settings changed since the last run: starting over", file=sys.stderr)
    if not done:
        tokens_path.write_text("")
    else:
        # Rewrite without any torn tail so appends stay line-aligned.
        tokens_path.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    write_json(state_path, {"key": key, "settings": settings})

    todo = [it for it in items if it.record.id not in done]
    scorer = Scorer(target, drafters, device, DTYPES[dtype]) if todo else None
    with tokens_path.open("a") as f:
        for it in tqdm(todo, desc="tvd", unit="rec", disable=not progress):
            inputs = scorer.prompt_inputs(it)
            if responses == "reference":
                resp = scorer.reference_ids(it)
                reason = "no reference response"
            elif responses == "token_ids":
                raw = (
                    token_file.get(it.record.id)
                    if token_file is not None
                    else it.record.meta.get("response_token_ids")
                )
                resp = list(raw) if isinstance(raw, list) else None
                reason = "no generated token ids"
            else:
                resp = scorer.generate_ids(inputs, max_new_tokens)
                reason = "empty generation"
            if not resp:
                stats.skip(reason)
                rec = {"id": it.record.id, "task": it.task, "skipped": reason}
            else:
                scores = scorer.score(it, inputs, resp)
                rec = {"id": it.record.id, "task": it.task, "response_token_ids": resp, **scores}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            done[it.record.id] = rec
    lines = [done[it.record.id] for it in items if "skipped" not in done[it.record.id]]
    names = list(drafters)
    doc = {
        "version": RESULTS_VERSION,
        "meta": run_metadata(
            {**settings, "bins": bins, "device": str(device), "limit": limit, "tasks": tasks}, argv
        ),
        "target": str(target),
        "eval": {
            "path": str(eval_path),
            "tasks": {k: len(v) for k, v in task_items.items()},
            "read_stats": stats.to_dict(),
        },
        "responses": responses,
        "drafters": {k: str(v) for k, v in drafters.items()},
        "num_records": len(lines),
        "summary": summarise(lines, names),
        "histogram": {"bins": bins, "range": [0.0, 1.0]},
        "plots": [],
    }
    samples = {n: [v for ln in lines for v in ln["tvd"][n]] for n in names}
    hist = histograms(
        out / "tvd_hist.png",
        samples,
        bins=bins,
        xlabel="TVD(drafter, target) per token",
        title="TVD to the target",
    )
    doc["plots"] = [hist.name]
    problems = check_schema(doc, SCHEMA)
    if problems:
        raise AssertionError("tvd.json does not match its schema:\n" + "\n".join(problems))
    write_json(out / "tvd.json", doc)
    return doc


def parse_named_paths(items: list[str], what: str = "drafter") -> dict[str, str]:
    """``["name=path", ...]`` -> ordered dict; names unique, folders exist."""
    out: dict[str, str] = {}
    for it in items:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{what} {it!r}: expected NAME=FOLDER")
        if name in out:
            raise ValueError(f"{what} name {name!r} given twice")
        folder = path.removeprefix("parallel:")  # the acceptance benchmark's parallel-drafting mark
        if not Path(folder).is_dir():
            raise ValueError(f"{what} {name!r}: {folder} is not a folder")
        out[name] = path
    return out


def add_drafters_arg(p: argparse.ArgumentParser) -> None:
    """``--drafters NAME=FOLDER ...`` / repeated ``--drafter NAME=FOLDER`` (TVD and ablation)."""
    p.add_argument(
        "--drafters",
        "--drafter",
        dest="drafters",
        nargs="+",
        action="extend",
        required=True,
        metavar="NAME=FOLDER",
        help="drafters to compare (repeat --drafter, or list them after --drafters)",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = cli.parser(__doc__)
    add_eval_args(p)
    add_drafters_arg(p)
    p.add_argument("--responses", choices=RESPONSE_SOURCES, default="reference")
    p.add_argument("--responses-file", default=None, help="generate.py JSONL with response_token_ids per id")
    p.add_argument("--max-new-tokens", type=int, default=128, help="for --responses generate")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU"
    )
    p.add_argument("--bins", type=int, default=50)
    p.add_argument("--out", required=True)
    p.add_argument("--fresh", action="store_true", help="ignore finished records of an earlier run")
    a = p.parse_args(argv)
    return cli.run_eval_main(
        run_tvd,
        a,
        parse_named_paths(a.drafters),
        module="benchmarks.tvd",
        argv=argv,
        report=format_report,
        results="tvd.json",
    )


if __name__ == "__main__":
    main()
