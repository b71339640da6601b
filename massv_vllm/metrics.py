"""Speculative-decoding acceptance metrics from vLLM's counters.

vLLM exports cumulative counters (``vllm:spec_decode_num_drafts``, ``..._num_draft_tokens``,
``..._num_accepted_tokens`` and the per-position vector ``..._num_accepted_tokens_per_pos``;
on ``/metrics`` each name carries a ``_total`` suffix). Counters include warm-up, so every figure
here is computed from the *difference* of two snapshots taken around the measured work:

    MAL (mean accepted length) = 1 + Δaccepted / Δdrafts
    acceptance at draft position i = Δaccepted_per_pos[i] / Δdrafts

exactly the formula vLLM logs itself (vllm/v1/spec_decode/metrics.py). Below them: the Prometheus
text parser (``/metrics``) and the benchmark maths (percentiles, summaries, speed-ups, TVD).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

PREFIX = "vllm:spec_decode_"
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def prometheus_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric ``name`` in Prometheus text format (``/metrics``)."""
    out = []
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})?\s+([0-9.eE+-]+)$", text, re.M):
        out.append((dict(_LABEL.findall(m.group(1) or "")), float(m.group(2))))
    return out


def prometheus_sum(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric ``name`` whose labels include ``labels`` (0.0 if none)."""
    samples = prometheus_samples(text, name)
    return sum((v for lab, v in samples if all(lab.get(k) == x for k, x in labels.items())), 0.0)


@dataclass(frozen=True)
class SpecCounters:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_metrics(cls, metrics: list[Any]) -> SpecCounters:
        """From ``LLM.get_metrics()`` (needs ``LLM(..., disable_log_stats=False)``); sums engines."""
        vals: dict[str, int] = {}
        per_pos: list[int] = []
        for m in metrics:
            if not m.name.startswith(PREFIX):
                continue
            key = m.name[len(PREFIX) :]
            if key == "num_accepted_tokens_per_pos":
                values = list(m.values)
                per_pos = [a + b for a, b in zip(per_pos + [0] * len(values), values)] if per_pos else values
            else:
                vals[key] = vals.get(key, 0) + int(m.value)
        return cls(
            num_drafts=vals.get("num_drafts", 0),
            num_draft_tokens=vals.get("num_draft_tokens", 0),
            num_accepted_tokens=vals.get("num_accepted_tokens", 0),
            accepted_per_pos=tuple(per_pos),
        )

    @classmethod
    def from_llm(cls, llm: Any) -> SpecCounters:
        return cls.from_metrics(llm.get_metrics())

    @classmethod
    def from_prometheus(cls, text: str) -> SpecCounters:
        """From a vLLM server's ``/metrics`` text (names end in ``_total``); sums engines."""
        per_pos: dict[int, float] = {}
        for labels, value in prometheus_samples(text, PREFIX + "num_accepted_tokens_per_pos_total"):
            pos = int(labels["position"])
            per_pos[pos] = per_pos.get(pos, 0) + value
        return cls(
            num_drafts=int(prometheus_sum(text, PREFIX + "num_drafts_total")),
            num_draft_tokens=int(prometheus_sum(text, PREFIX + "num_draft_tokens_total")),
            num_accepted_tokens=int(prometheus_sum(text, PREFIX + "num_accepted_tokens_total")),
            accepted_per_pos=tuple(int(per_pos[i]) for i in sorted(per_pos)),
        )

    def __sub__(self, before: SpecCounters) -> SpecCounters:
        n = max(len(self.accepted_per_pos), len(before.accepted_per_pos))
        a = list(self.accepted_per_pos) + [0] * (n - len(self.accepted_per_pos))
        b = list(before.accepted_per_pos) + [0] * (n - len(before.accepted_per_pos))
        return SpecCounters(
            num_drafts=self.num_drafts - before.num_drafts,
            num_draft_tokens=self.num_draft_tokens - before.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens - before.num_accepted_tokens,
            accepted_per_pos=tuple(x - y for x, y in zip(a, b)),
        )

    @property
    def mean_accepted_length(self) -> float | None:
        """1 + accepted/drafts; None when nothing was drafted."""
        if self.num_drafts <= 0:
            return None
        return 1.0 + self.num_accepted_tokens / self.num_drafts

    @property
    def acceptance_per_position(self) -> list[float]:
        if self.num_drafts <= 0:
            return [0.0] * len(self.accepted_per_pos)
        return [a / self.num_drafts for a in self.accepted_per_pos]

    @property
    def draft_acceptance_rate(self) -> float | None:
        if self.num_draft_tokens <= 0:
            return None
        return self.num_accepted_tokens / self.num_draft_tokens


# ---- benchmark maths ---------------------------------------------------------------------------
# Pure functions shared by benchmarks/ (acceptance, TVD, cost); no engine, no I/O.


def sum_counters(deltas: list[SpecCounters]) -> SpecCounters:
    """Sum of counter deltas (e.g. per-task deltas into an overall figure)."""
    n = max((len(d.accepted_per_pos) for d in deltas), default=0)
    per_pos = [0] * n
    for d in deltas:
        for i, v in enumerate(d.accepted_per_pos):
            per_pos[i] += v
    return SpecCounters(
        num_drafts=sum(d.num_drafts for d in deltas),
        num_draft_tokens=sum(d.num_draft_tokens for d in deltas),
        num_accepted_tokens=sum(d.num_accepted_tokens for d in deltas),
        accepted_per_pos=tuple(per_pos),
    )


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics
    (numpy's default "linear" method), so p50 of an even-sized list is the mean of the middle two."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(float(v) for v in values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_summary(values: list[float]) -> dict[str, float] | None:
    """Mean, p50 and p90 of per-request latencies (seconds); None for no requests."""
    if not values:
        return None
    return {
        "mean": sum(values) / len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
    }


def distribution_summary(values: list[float]) -> dict[str, float] | None:
    """Mean, median and p10/p25/p75/p90 of a sample (e.g. per-token TVD); None when empty."""
    if not values:
        return None
    out = {"mean": sum(values) / len(values), "median": percentile(values, 50)}
    out |= {f"p{q}": percentile(values, q) for q in (10, 25, 75, 90)}
    return out


def speedup(baseline_seconds: float | None, seconds: float | None) -> float | None:
    """How many times faster ``seconds`` is than ``baseline_seconds`` (same work); None if unknown."""
    if not baseline_seconds or not seconds or baseline_seconds <= 0 or seconds <= 0:
        return None
    return baseline_seconds / seconds


def speedup_ceiling(mal: float, gamma: int, cost_ratio: float) -> float:
    """Speed-up bound of speculative decoding: τ / (γ·c + 1).

    One verification step of the target yields τ (mean accepted length) tokens and costs one
    target step plus γ drafter steps, each ``c`` (= drafter step time / target step time) of a
    target step. Ignores verification's extra cost over a single-token step, so it is a ceiling.
    """
    if gamma < 0 or cost_ratio < 0 or mal < 1:
        raise ValueError(f"need mal >= 1, gamma >= 0, c >= 0 (got {mal}, {gamma}, {cost_ratio})")
    return mal / (gamma * cost_ratio + 1.0)


def tvd(p, q):
    """Total variation distance 0.5·Σ|p − q| over the last dimension of two probability tensors.

    ``p`` and ``q`` are [..., V] (torch) on the same vocabulary; computed in float32. Returns [...].
    """
    if p.shape != q.shape:
        raise ValueError(f"distributions have different shapes {tuple(p.shape)} and {tuple(q.shape)}")
    return 0.5 * (p.float() - q.float()).abs().sum(dim=-1)


def probs_from_logits(logits, temperature: float = 1.0):
    """softmax(logits / T) in float32; -inf logits (masked vocab rows) get probability 0."""
    import torch

    if temperature <= 0:
        raise ValueError("temperature must be > 0 for a distribution")
    return torch.softmax(logits.float() / temperature, dim=-1)


def top1_agreement(p, q):
    """Per position, whether the two distributions' most likely tokens are the same (bool [...])."""
    if p.shape != q.shape:
        raise ValueError(f"distributions have different shapes {tuple(p.shape)} and {tuple(q.shape)}")
    return p.argmax(dim=-1) == q.argmax(dim=-1)
