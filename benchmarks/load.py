"""Bounded load test of a vLLM OpenAI server, without and with MASSV (reliability + speed).

The workload is deterministic (``--seed``): chat requests with 0..``--max-images`` synthetic images
of varied sizes or text only, short and long prompts, streaming and non-streaming, greedy (T=0,
checked) plus a few sampled ones (not checked), and ``--cancel`` streaming requests that the client
closes after their first chunks. Everything is submitted at once; ``--concurrency`` bounds the
requests in flight. Each run reports requests/s, p50/p99 latency, output tokens/s, HTTP errors,
(with a drafter) MASSV's mean accepted length from ``/metrics``, and for servers it starts their
memory before and after the load (host RSS of the server's process tree; GPU memory from
``nvidia-smi``).

Checks (exit status 1 if any fails): no 5xx / dropped connection / in-stream error and no 4xx on
the valid workload; every completed greedy answer equals the reference (no-speculation) answer,
streaming ones concatenated (``--tie-tol``: a divergence is tolerated only where the reference's
top-2 logprob gap at the first differing token is below it and the MASSV token is the reference's
second choice; each one is printed. Exact equality holds in float32: vLLM's ``auto`` dtype serves
a float32 checkpoint in bfloat16 on a GPU, where two servers that batch differently round
differently, so pass ``--engine-arg dtype='"float32"'`` for the check); cancelled streams are
aborted by the server (vLLM counts only requests that finish in the engine: any that ran to
completion are reported; the check fails if none was aborted); afterwards the server drains to zero running/waiting requests, answers /health
and a good request with the reference answer.

    # both servers in sequence (reference, then MASSV), table + JSON
    python -m benchmarks.load --target T --drafter D --requests 200 --cancel 20 --out load.json
    # against servers you started yourself
    python -m benchmarks.load --url http://127.0.0.1:8000 --save-reference ref.json
    python -m benchmarks.load --url http://127.0.0.1:8001 --reference ref.json --out load.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import cli
from massv_vllm.engine import parse_engine_args
from massv_vllm.metrics import SpecCounters, percentile, prometheus_sum

IMAGE_SIZES = [(28, 28), (64, 48), (100, 60), (56, 300), (160, 224), (224, 160), (300, 200), (448, 448)]
QUESTIONS = [
    "Describe the image.",
    "How many triangles are there?",
    "What colour is the square in the bottom right?",
    "Where is the yellow triangle?",
    "Write a short story about the shapes.",
    "Hello! How are you today? Please answer the question.",
]
PARAGRAPH = (
    "There is a small red circle in the top left and a large blue square in the center. "
    "The picture shows a purple circle, an orange square and a green triangle. "
)


@dataclass
class LoadRequest:
    id: str
    messages: list[dict[str, Any]]
    stream: bool
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    cancel_after: int | None = None  # close the stream after this many content chunks
    logprobs: bool = True

    @property
    def checked(self) -> bool:
        """Greedy and run to completion: its answer must equal the reference's."""
        return self.temperature == 0.0 and self.cancel_after is None

    def body(self, model: str) -> dict[str, Any]:
        b: dict[str, Any] = {
            "model": model,
            "messages": self.messages,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": self.stream,
        }
        if self.seed is not None:
            b["seed"] = self.seed
        if self.logprobs and self.checked:
            b.update(logprobs=True, top_logprobs=2)
        if self.stream:
            b["stream_options"] = {"include_usage": True}
        if self.cancel_after is not None:
            b["ignore_eos"] = True  # vLLM extension: keep it running until the client leaves
        return b


@dataclass
class Result:
    id: str
    status: int = 0  # HTTP status; 0: no response (connection error)
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    top2: list[list[tuple[str, float]]] = field(default_factory=list)  # per token: [(tok, lp), ...]
    finish_reason: str | None = None
    completion_tokens: int = 0
    latency: float = 0.0
    ttft: float | None = None
    cancelled: bool = False
    error: str | None = None

    @property
    def server_error(self) -> bool:
        return self.status == 0 or self.status >= 500 or (self.status == 200 and self.error is not None)

    @property
    def client_error(self) -> bool:
        return 400 <= self.status < 500


def image_url(seed: int, size: tuple[int, int]) -> str:
    from massv_vllm.testing.tiny import synthetic_image

    buf = io.BytesIO()
    synthetic_image(seed, size).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def build_requests(
    n: int,
    n_cancel: int,
    *,
    max_images: int = 2,
    max_tokens: int = 32,
    cancel_max_tokens: int = 512,
    sampled_fraction: float = 0.1,
    logprobs: bool = True,
    seed: int = 0,
) -> list[LoadRequest]:
    """The deterministic workload: ``n`` answered requests and ``n_cancel`` cancelled streams, shuffled."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n + n_cancel):
        cancel = i >= n
        n_img = rng.randint(0, max_images)
        text = rng.choice(QUESTIONS)
        if rng.random() < 0.15:  # long prompt: several prefill chunks on small token budgets
            text = PARAGRAPH * rng.randint(4, 12) + text
        content: list[dict[str, Any]] = [
            {
                "type": "image_url",
                "image_url": {"url": image_url(seed * 100_003 + i * 7 + j, rng.choice(IMAGE_SIZES))},
            }
            for j in range(n_img)
        ]
        content.append({"type": "text", "text": text})
        sampled = not cancel and rng.random() < sampled_fraction
        reqs.append(
            LoadRequest(
                id=f"{'cancel' if cancel else 'req'}-{i:04d}",
                messages=[{"role": "user", "content": content if n_img else text}],
                stream=cancel or rng.random() < 0.5,
                max_tokens=cancel_max_tokens if cancel else rng.randint(max(1, max_tokens // 4), max_tokens),
                temperature=0.8 if sampled else 0.0,
                seed=rng.randint(0, 2**31 - 1) if sampled else None,
                cancel_after=rng.randint(1, 3) if cancel else None,
                logprobs=logprobs,
            )
        )
    rng.shuffle(reqs)
    return reqs


def fingerprint(reqs: list[LoadRequest]) -> str:
    """Identity of the checked requests (what a reference file answers); --cancel may differ."""
    h = hashlib.sha256()
    for r in sorted((r for r in reqs if r.checked), key=lambda r: r.id):
        h.update(json.dumps(r.body("m"), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _top2(entry: dict[str, Any]) -> list[tuple[str, float]]:
    return [(t["token"], float(t["logprob"])) for t in entry.get("top_logprobs") or []]


async def run_one(session: aiohttp.ClientSession, url: str, model: str, req: LoadRequest) -> Result:
    res = Result(req.id)
    t0 = time.perf_counter()
    try:
        async with session.post(url + "/v1/chat/completions", json=req.body(model)) as resp:
            res.status = resp.status
            if resp.status != 200:
                res.error = (await resp.text())[:500]
            elif not req.stream:
                body = await resp.json()
                choice = body["choices"][0]
                res.text = choice["message"]["content"] or ""
                res.finish_reason = choice.get("finish_reason")
                for e in (choice.get("logprobs") or {}).get("content") or []:
                    res.tokens.append(e["token"])
                    res.top2.append(_top2(e))
                res.completion_tokens = (body.get("usage") or {}).get("completion_tokens", 0)
            else:
                await _read_stream(resp, req, res, t0)
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
        res.error = f"{type(e).__name__}: {e}"
    except (ValueError, KeyError, TypeError, IndexError) as e:  # malformed body or event
        res.error = f"malformed response: {type(e).__name__}: {e}"
    res.latency = time.perf_counter() - t0
    return res


async def _read_stream(resp: aiohttp.ClientResponse, req: LoadRequest, res: Result, t0: float) -> None:
    parts: list[str] = []
    chunks = 0
    done = False
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        ev = json.loads(data)
        if "error" in ev:  # vLLM reports failures after the 200 header as an in-stream error event
            res.error = json.dumps(ev["error"])[:500]
            return
        if ev.get("usage"):
            res.completion_tokens = ev["usage"].get("completion_tokens", 0)
        for choice in ev.get("choices") or []:
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                if res.ttft is None:
                    res.ttft = time.perf_counter() - t0
                parts.append(delta)
                chunks += 1
            for e in (choice.get("logprobs") or {}).get("content") or []:
                res.tokens.append(e["token"])
                res.top2.append(_top2(e))
            if choice.get("finish_reason"):
                res.finish_reason = choice["finish_reason"]
        if req.cancel_after is not None and chunks >= req.cancel_after and res.finish_reason is None:
            res.cancelled = True
            resp.close()  # drop the connection mid-stream: the server must abort the request
            break
    res.text = "".join(parts)
    if not done and not res.cancelled:
        res.error = "stream ended without [DONE]"


async def run_load(
    url: str, model: str, reqs: list[LoadRequest], concurrency: int, timeout: float
) -> tuple[list[Result], float]:
    """Submit every request at once, at most ``concurrency`` in flight; returns (results, wall seconds)."""
    sem = asyncio.Semaphore(concurrency)
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def bounded(r: LoadRequest) -> Result:
            async with sem:
                return await run_one(session, url, model, r)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(r) for r in reqs))
        return list(results), time.perf_counter() - t0


async def _get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    """(status, text); (0, "") when the server does not answer."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s,
            s.get(url) as r,
        ):
            return r.status, await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
        return 0, ""


async def wait_idle(url: str, timeout: float = 60.0) -> bool:
    """True once the server reports no running or waiting request (cancelled streams were aborted)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, text = await _get(url + "/metrics")
        busy = sum(prometheus_sum(text, f"vllm:num_requests_{s}") for s in ("running", "waiting"))
        if status == 200 and busy == 0:
            return True
        await asyncio.sleep(0.5)
    return False


async def measure(
    url: str, model: str, reqs: list[LoadRequest], concurrency: int, timeout: float
) -> tuple[dict[str, Any], dict[str, Result]]:
    """Warm up, run the workload, then check drain/health. Returns (summary, results by id)."""
    warm = [r for r in reqs if r.checked and not r.stream][:2]
    await run_load(url, model, warm, concurrency, timeout)
    _, m0 = await _get(url + "/metrics")
    results, wall = await run_load(url, model, reqs, concurrency, timeout)
    idle = await wait_idle(url)
    _, m1 = await _get(url + "/metrics")
    spec = SpecCounters.from_prometheus(m1) - SpecCounters.from_prometheus(m0)

    def grown(name: str) -> float:
        return prometheus_sum(m1, name) - prometheus_sum(m0, name)

    generated = grown("vllm:generation_tokens_total")
    # vLLM counts only requests that finish in the engine; client aborts never reach the counter.
    finished = grown("vllm:request_success_total")
    health, _ = await _get(url + "/health")
    probe = next((r for r in reqs if r.checked and not r.stream), reqs[0])
    after, _ = await run_load(url, model, [probe], 1, timeout)

    done = [x for x in results if x.status == 200 and x.error is None and not x.cancelled]
    lat = [x.latency for x in done]
    ttft = [x.ttft for x in done if x.ttft is not None]
    by_id = {x.id: x for x in results}
    cancelled = [x for x in results if x.cancelled]
    after_cancel = generated - sum(x.completion_tokens for x in done)  # tokens made for cancelled streams
    summary = {
        "requests": len(reqs),
        "completed": len(done),
        "cancelled": len(cancelled),
        "tokens_per_cancelled": after_cancel / len(cancelled) if cancelled else None,
        # cancelled streams the server ran to completion instead of aborting them
        "cancelled_not_aborted": int(finished) - len(done),
        "server_errors": sum(x.server_error for x in results),
        "client_errors": sum(x.client_error for x in results),
        "errors": [asdict(x) | {"tokens": None, "top2": None} for x in results if x.error][:10],
        "wall_s": wall,
        "requests_per_s": len(done) / wall if wall > 0 else None,
        "latency_p50_s": percentile(lat, 50) if lat else None,
        "latency_p99_s": percentile(lat, 99) if lat else None,
        "ttft_p50_s": percentile(ttft, 50) if ttft else None,
        "output_tokens_per_s": sum(x.completion_tokens for x in done) / wall if wall > 0 else None,
        "drained": idle,
        "healthy_after": health == 200 and after[0].status == 200 and after[0].error is None,
        "probe_after": {"id": probe.id, "text": after[0].text},
        "spec": {
            "num_drafts": spec.num_drafts,
            "num_draft_tokens": spec.num_draft_tokens,
            "num_accepted_tokens": spec.num_accepted_tokens,
            "mean_accepted_length": spec.mean_accepted_length,
            "acceptance_per_position": spec.acceptance_per_position,
        },
    }
    return summary, by_id


def answers(reqs: list[LoadRequest], results: dict[str, Result]) -> dict[str, dict[str, Any]]:
    """The checked answers of a run (reference file format)."""
    out = {}
    for r in reqs:
        x = results.get(r.id)
        if r.checked and x is not None and x.status == 200 and x.error is None:
            out[r.id] = {"text": x.text, "tokens": x.tokens, "top2": x.top2, "finish_reason": x.finish_reason}
    return out


def compare(
    reference: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]], tie_tol: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(mismatches, tolerated near-tie divergences) of ``got`` against ``reference``."""
    mismatches, ties = [], []
    for rid, ref in reference.items():
        g = got.get(rid)
        if g is None:
            mismatches.append({"id": rid, "problem": "no answer in this run"})
            continue
        if g["text"] == ref["text"] and g["finish_reason"] == ref["finish_reason"]:
            continue
        item: dict[str, Any] = {"id": rid, "expected": ref["text"][:200], "got": g["text"][:200]}
        rt, gt = ref.get("tokens") or [], g.get("tokens") or []
        i = next((k for k, (a, b) in enumerate(zip(rt, gt)) if a != b), None)
        if i is not None and i < len(ref.get("top2") or []) and len(ref["top2"][i]) >= 2:
            (t1, lp1), (t2, lp2) = ref["top2"][i][:2]
            item.update(first_diff_token=i, ref_top2=[[t1, lp1], [t2, lp2]], got_token=gt[i], gap=lp1 - lp2)
            if lp1 - lp2 <= tie_tol and gt[i] == t2:
                ties.append(item)
                continue
        mismatches.append(item)
    return mismatches, ties


def checks(summary: dict[str, Any], mismatches: list[Any] | None, n_cancel: int) -> dict[str, bool]:
    c = {
        "no_server_errors": summary["server_errors"] == 0,
        "no_client_errors": summary["client_errors"] == 0,
        "drained_after_load": summary["drained"],
        "healthy_after_load": summary["healthy_after"],
        "cancelled_streams": summary["cancelled"] >= n_cancel,
    }
    if n_cancel:
        # Fails only if no cancelled stream was aborted (the cancel path is broken). One running to
        # completion is reported, not failed: on the loaded 2-core CPU box a disconnect took 25-130
        # tokens to reach the engine, and now and then longer than max_tokens (without MASSV too).
        c["cancelled_streams_aborted"] = summary["cancelled_not_aborted"] < summary["cancelled"]
    if mismatches is not None:
        c["answers_equal_reference"] = not mismatches
    return c


def fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    cols = [
        ("run", None),
        ("done", "completed"),
        ("cancel", "cancelled"),
        ("tok/cancel", "tokens_per_cancelled"),
        ("!aborted", "cancelled_not_aborted"),
        ("5xx", "server_errors"),
        ("4xx", "client_errors"),
        ("req/s", "requests_per_s"),
        ("p50 s", "latency_p50_s"),
        ("p99 s", "latency_p99_s"),
        ("tok/s", "output_tokens_per_s"),
        ("MAL", None),
    ]
    print(" ".join(f"{h:>10}" for h, _ in cols))
    for name, s in rows.items():
        cells = [name]
        for _, key in cols[1:-1]:
            v = s[key]
            cells.append(fmt(v) if v is None or isinstance(v, float) else str(v))
        cells.append(fmt(s["spec"]["mean_accepted_length"]))
        print(" ".join(f"{c:>10}" for c in cells))


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    src = ap.add_argument_group("server (either start them or point at one)")
    src.add_argument("--target", help="target model folder: start a no-speculation reference server")
    src.add_argument("--drafter", help="MASSV drafter folder: then start a MASSV server and compare")
    src.add_argument("--num-speculative-tokens", type=int, default=5)
    src.add_argument("--url", help="a running server (instead of --target)")
    src.add_argument("--model", help="served model name at --url (default: the server's only model)")
    src.add_argument("--reference", help="reference answers JSON to compare --url's answers with")
    src.add_argument("--save-reference", help="write --url's answers here (reference file)")
    src.add_argument("--max-model-len", type=int, default=4096)
    cli.add_engine_arg(
        src, help="extra engine argument for started servers (JSON value), e.g. max_num_seqs=256"
    )
    src.add_argument("--log-dir", default=None, help="server logs (default: temp files)")
    wl = ap.add_argument_group("workload")
    wl.add_argument("--requests", type=int, default=200)
    wl.add_argument("--cancel", type=int, default=20)
    wl.add_argument("--concurrency", type=int, default=256)
    wl.add_argument("--max-images", type=int, default=2)
    wl.add_argument("--max-tokens", type=int, default=32)
    wl.add_argument("--cancel-max-tokens", type=int, default=512)
    wl.add_argument("--sampled-fraction", type=float, default=0.1)
    wl.add_argument(
        "--no-logprobs", action="store_true", help="no top-2 logprobs (pure timing; exact match only)"
    )
    wl.add_argument(
        "--tie-tol",
        type=float,
        default=1e-4,
        help="tolerated reference top-2 logprob gap at a divergence (0: exact match required)",
    )
    wl.add_argument("--seed", type=int, default=0)
    wl.add_argument("--timeout", type=float, default=900.0, help="per-request timeout, seconds")
    ap.add_argument("--out", help="write the full results JSON here")
    args = ap.parse_args(argv)
    if bool(args.target) == bool(args.url):
        ap.error("give exactly one of --target (start servers) or --url (use a running server)")
    if args.drafter and not args.target:
        ap.error("--drafter needs --target")

    reqs = cli.forward(build_requests, args, args.requests, args.cancel, logprobs=not args.no_logprobs)
    fp = fingerprint(reqs)
    report: dict[str, Any] = {"config": vars(args), "fingerprint": fp, "runs": {}}
    all_checks: dict[str, bool] = {}
    mismatches: list[Any] = []
    ties: list[Any] = []

    if args.url:
        model = args.model or _served_model(args.url)
        summary, res = asyncio.run(measure(args.url, model, reqs, args.concurrency, args.timeout))
        got = answers(reqs, res)
        ref = None
        if args.reference:
            data = json.loads(Path(args.reference).read_text())
            if data["fingerprint"] != fp:
                raise SystemExit(
                    f"{args.reference} was made with another workload (fingerprint {data['fingerprint']} != "
                    f"{fp}); use the same --requests/--seed/--max-tokens/--sampled-fraction/... options"
                )
            ref = data["answers"]
            mismatches, ties = compare(ref, got, args.tie_tol)
        if args.save_reference:
            Path(args.save_reference).write_text(json.dumps({"fingerprint": fp, "answers": got}) + "\n")
        report["runs"]["server"] = summary
        all_checks = checks(summary, mismatches if ref is not None else None, args.cancel)
    else:
        from massv_vllm.engine import massv_spec

        engine_over = parse_engine_args(args.engine_arg)
        common = dict(max_model_len=args.max_model_len, max_images=args.max_images, **engine_over)
        ref_summary, ref_res = _with_server(args, None, "reference", reqs, common)
        report["runs"]["reference"] = ref_summary
        ref = answers(reqs, ref_res)
        all_checks.update({f"reference_{k}": v for k, v in checks(ref_summary, None, args.cancel).items()})
        if args.drafter:
            spec = massv_spec(args.drafter, args.num_speculative_tokens)
            summary, res = _with_server(args, spec, "massv", reqs, common)
            report["runs"]["massv"] = summary
            mismatches, ties = compare(ref, answers(reqs, res), args.tie_tol)
            all_checks.update(checks(summary, mismatches, args.cancel))
            probe = summary["probe_after"]
            all_checks["probe_after_load_equals_reference"] = probe["text"] == ref.get(probe["id"], {}).get(
                "text"
            )
            all_checks["massv_drafted"] = summary["spec"]["num_drafts"] > 0
    report.update(mismatches=mismatches, near_ties=ties, checks=all_checks, passed=all(all_checks.values()))
    report["provenance"] = _provenance()

    print_table(report["runs"])
    for t in ties:
        print(
            f"near-tie divergence {t['id']} at token {t['first_diff_token']}: reference top-2 "
            f"{t['ref_top2']} (gap {t['gap']:.2e}), got {t['got_token']!r}"
        )
    for m in mismatches[:10]:
        print(f"MISMATCH {json.dumps(m)[:400]}")
    for name, s in report["runs"].items():
        if "memory_before" in s:
            b, a = s["memory_before"], s["memory_after"]
            print(
                f"[{name}] server memory before -> after the load: host RSS {fmt(b['rss_mib'], '.0f')} -> "
                f"{fmt(a['rss_mib'], '.0f')} MiB, GPU {fmt(b['gpu_mib'], '.0f')} -> {fmt(a['gpu_mib'], '.0f')} MiB"
                f" ({a['gpu_scope'] or 'no nvidia-smi'})"
            )
        if s.get("cancelled_not_aborted"):
            print(
                f"[{name}] WARNING: {s['cancelled_not_aborted']} of {s['cancelled']} cancelled streams ran to completion"
            )
        for e in s["errors"][:5]:
            print(f"[{name}] error {e['id']} status={e['status']}: {e['error']}")
    for k, v in all_checks.items():
        print(f"{'PASS' if v else 'FAIL'} {k}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0 if report["passed"] else 1


def _with_server(
    args: argparse.Namespace, spec: dict[str, Any] | None, name: str, reqs: list[LoadRequest], common: dict
) -> tuple[dict[str, Any], dict[str, Result]]:
    from massv_vllm.testing.serve_utils import start_server

    log = Path(args.log_dir) / f"{name}.log" if args.log_dir else None
    t0 = time.perf_counter()
    with start_server(args.target, spec, log_path=log, served_model_name="target", **common) as server:
        print(
            f"[{name}] server up in {time.perf_counter() - t0:.0f} s at {server.url} (log {server.log_path})",
            flush=True,
        )
        before = server_memory(server.proc.pid)
        summary, res = asyncio.run(measure(server.url, server.model, reqs, args.concurrency, args.timeout))
        summary.update(
            server_log=str(server.log_path), memory_before=before, memory_after=server_memory(server.proc.pid)
        )
    return summary, res


def _nvidia_smi(query: str) -> list[list[str]]:
    """Rows of ``nvidia-smi --query-<query> --format=csv,noheader,nounits`` ([] without one)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]


def server_memory(pid: int) -> dict[str, Any]:
    """Memory of a server process and all its descendants (API server, engine core, workers):
    resident host memory and, where ``nvidia-smi`` answers, GPU memory, both in MiB. GPU memory is
    the server's processes' (``gpu_scope`` "processes"); inside a container nvidia-smi may list
    host PIDs that match none of them, and then it is all memory used on the visible GPUs
    ("device": those of ``CUDA_VISIBLE_DEVICES``), which while one server runs is that server's."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {"rss_mib": None, "gpu_mib": None, "gpu_scope": None}
    rss = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            rss += proc.memory_info().rss
    pids = {str(proc.pid) for proc in procs}
    mine = [float(r[1]) for r in _nvidia_smi("compute-apps=pid,used_memory") if len(r) == 2 and r[0] in pids]
    # nvidia-smi lists every GPU of the machine; count those this process may use (a numeric
    # CUDA_VISIBLE_DEVICES, as gpu_jobs' lanes set it), else all
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").replace(" ", "").split(",")
    wanted = set(visible) if all(v.isdigit() for v in visible) else None
    device = [
        float(r[1])
        for r in _nvidia_smi("gpu=index,memory.used")
        if len(r) == 2 and r[1].replace(".", "").isdigit() and (wanted is None or r[0] in wanted)
    ]
    gpu, scope = (sum(mine), "processes") if mine else (sum(device), "device") if device else (None, None)
    return {"rss_mib": rss / 2**20, "gpu_mib": gpu, "gpu_scope": scope}


def _served_model(url: str) -> str:
    status, text = asyncio.run(_get(url + "/v1/models"))
    if status != 200:
        raise SystemExit(f"GET {url}/v1/models returned {status}; is the server up?")
    return json.loads(text)["data"][0]["id"]


def _provenance() -> dict[str, Any]:
    from massv_vllm.provenance import git_commit, package_versions

    return {"command": sys.argv, "git_commit": git_commit(), "packages": package_versions()}


if __name__ == "__main__":
    sys.exit(main())
