"""Speculative-decoding acceptance metrics from vLLM's counters.

vLLM exports cumulative counters (``vllm:spec_decode_num_drafts``, ``..._num_draft_tokens``,
``..._num_accepted_tokens`` and the per-position vector ``..._num_accepted_tokens_per_pos``;
on ``/metrics`` each name carries a ``_total`` suffix). Counters include warm-up, so every figure
here is computed from the *difference* of two snapshots taken around the measured work:

    MAL (mean accepted length) = 1 + Δaccepted / Δdrafts
    acceptance at draft position i = Δaccepted_per_pos[i] / Δdrafts

exactly the formula vLLM logs itself (vllm/v1/spec_decode/metrics.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

PREFIX = "vllm:spec_decode_"


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
        """From a vLLM server's ``/metrics`` text (names end in ``_total``)."""
        vals: dict[str, float] = {}
        per_pos: dict[int, float] = {}
        for line in text.splitlines():
            if not line.startswith(PREFIX):
                continue
            m = re.match(r"^vllm:spec_decode_(\w+?)_total(\{[^}]*\})?\s+([0-9.eE+-]+)$", line)
            if not m:
                continue
            key, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            if key == "num_accepted_tokens_per_pos":
                pos = int(re.search(r'position="(\d+)"', labels).group(1))
                per_pos[pos] = per_pos.get(pos, 0) + value
            else:
                vals[key] = vals.get(key, 0) + value
        return cls(
            num_drafts=int(vals.get("num_drafts", 0)),
            num_draft_tokens=int(vals.get("num_draft_tokens", 0)),
            num_accepted_tokens=int(vals.get("num_accepted_tokens", 0)),
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
