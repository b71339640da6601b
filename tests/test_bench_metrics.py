"""Benchmark maths in massv_vllm.metrics: counters -> MAL, TVD, agreement, ceilings, percentiles."""

from __future__ import annotations

import math
import types

import pytest
import torch

from massv_vllm.metrics import (
    SpecCounters,
    distribution_summary,
    latency_summary,
    percentile,
    probs_from_logits,
    prometheus_sum,
    speedup,
    speedup_ceiling,
    sum_counters,
    top1_agreement,
    tvd,
)

# What a vLLM 0.26 server's /metrics shows after some speculative requests (two engines, labels,
# HELP/TYPE lines, the created-gauges prometheus_client adds, and unrelated series).
PROMETHEUS_TEXT = """\
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="qwen"} 40.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="qwen"} 10.0
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0",model_name="qwen"} 1.7e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="qwen"} 120.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="qwen"} 30.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="qwen"} 60.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="qwen"} 15.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="qwen",position="0"} 32.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="qwen",position="1"} 18.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="qwen",position="2"} 10.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="qwen",position="0"} 8.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="qwen",position="1"} 5.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="qwen",position="2"} 2.0
vllm:generation_tokens_total{engine="0",model_name="qwen"} 999.0
"""


def test_prometheus_parsing_sums_engines_and_positions():
    c = SpecCounters.from_prometheus(PROMETHEUS_TEXT)
    assert c == SpecCounters(
        num_drafts=50, num_draft_tokens=150, num_accepted_tokens=75, accepted_per_pos=(40, 23, 12)
    )
    assert c.mean_accepted_length == pytest.approx(1 + 75 / 50)
    assert c.acceptance_per_position == pytest.approx([0.8, 0.46, 0.24])
    assert c.draft_acceptance_rate == pytest.approx(0.5)


def test_prometheus_sum_filters_by_labels():
    assert prometheus_sum(PROMETHEUS_TEXT, "vllm:spec_decode_num_drafts_total") == 50.0
    assert prometheus_sum(PROMETHEUS_TEXT, "vllm:spec_decode_num_drafts_total", engine="1") == 10.0
    per_pos = "vllm:spec_decode_num_accepted_tokens_per_pos_total"
    assert prometheus_sum(PROMETHEUS_TEXT, per_pos, position="1") == 23.0
    assert prometheus_sum(PROMETHEUS_TEXT, "vllm:num_requests_running") == 0.0  # absent: nothing to sum


def test_mal_and_per_position_acceptance_come_from_snapshot_deltas():
    before = SpecCounters(
        num_drafts=10, num_draft_tokens=30, num_accepted_tokens=25, accepted_per_pos=(10, 9, 6)
    )
    after = SpecCounters(
        num_drafts=30, num_draft_tokens=90, num_accepted_tokens=45, accepted_per_pos=(22, 15, 8)
    )
    d = after - before
    assert d == SpecCounters(20, 60, 20, (12, 6, 2))
    assert d.mean_accepted_length == pytest.approx(2.0)  # 1 + 20/20
    assert d.acceptance_per_position == pytest.approx([0.6, 0.3, 0.1])
    # the accepted tokens are exactly the per-position counts summed (vLLM's invariant)
    assert sum(d.accepted_per_pos) == d.num_accepted_tokens
    # nothing drafted (no-spec engine, or no new work): MAL unknown, not 1
    assert SpecCounters().mean_accepted_length is None
    assert (after - after).acceptance_per_position == [0.0, 0.0, 0.0]


def test_counters_from_llm_get_metrics_objects():
    Counter = lambda name, value: types.SimpleNamespace(name=name, value=value)  # noqa: E731
    Vector = lambda name, values: types.SimpleNamespace(name=name, values=values)  # noqa: E731
    metrics = [
        Counter("vllm:spec_decode_num_drafts", 4),
        Counter("vllm:spec_decode_num_draft_tokens", 12),
        Counter("vllm:spec_decode_num_accepted_tokens", 6),
        Vector("vllm:spec_decode_num_accepted_tokens_per_pos", [3, 2, 1]),
        Counter("vllm:num_requests_running", 7),
    ]
    c = SpecCounters.from_metrics(metrics)
    assert c == SpecCounters(4, 12, 6, (3, 2, 1))
    assert c.mean_accepted_length == pytest.approx(2.5)


def test_sum_counters_pads_positions():
    total = sum_counters([SpecCounters(2, 6, 3, (2, 1, 0)), SpecCounters(1, 3, 1, (1,)), SpecCounters()])
    assert total == SpecCounters(3, 9, 4, (3, 1, 0))
    assert total.mean_accepted_length == pytest.approx(1 + 4 / 3)
    assert sum_counters([]) == SpecCounters()


def test_tvd_known_distributions():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]])
    q = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    # disjoint supports -> 1; identical -> 0; point mass vs uniform(4) -> 0.5*(0.75 + 3*0.25) = 0.75
    assert tvd(p, q).tolist() == pytest.approx([1.0, 0.0, 0.75])
    assert tvd(q, p).tolist() == pytest.approx([1.0, 0.0, 0.75])  # symmetric
    with pytest.raises(ValueError, match="different shapes"):
        tvd(p, q[:, :3])


def test_tvd_from_logits_with_masked_vocab():
    # A drafter's padded vocab rows are -inf: probability exactly 0, not NaN.
    drafter = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    pd, pt = probs_from_logits(drafter), probs_from_logits(target)
    assert pd.tolist() == [[0.5, 0.5, 0.0, 0.0]]
    assert tvd(pd, pt).item() == pytest.approx(0.5)  # 0.5 * (0.25 + 0.25 + 0.25 + 0.25)
    assert torch.allclose(
        probs_from_logits(torch.tensor([[2.0, 0.0]]), temperature=2.0),
        torch.softmax(torch.tensor([[1.0, 0.0]]), -1),
    )
    with pytest.raises(ValueError):
        probs_from_logits(target, temperature=0)


def test_top1_agreement():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1]])
    q = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.3, 0.2], [0.2, 0.7, 0.1]])
    assert top1_agreement(p, q).tolist() == [True, False, True]


def test_speedup_ceiling_formula():
    # tau / (gamma * c + 1)
    assert speedup_ceiling(3.2, 5, 0.1) == pytest.approx(3.2 / 1.5)
    assert speedup_ceiling(2.46, 5, 0.0) == pytest.approx(2.46)  # free drafter: speed-up = MAL
    assert speedup_ceiling(6.0, 5, 0.2) == pytest.approx(3.0)  # 100% acceptance at γ=5
    assert speedup_ceiling(1.0, 5, 0.2) < 1.0  # nothing accepted: drafting only costs
    for bad in [(0.5, 5, 0.1), (2.0, -1, 0.1), (2.0, 5, -0.1)]:
        with pytest.raises(ValueError):
            speedup_ceiling(*bad)


def test_speedup_ratio():
    assert speedup(2.0, 1.0) == pytest.approx(2.0)
    assert speedup(None, 1.0) is None and speedup(1.0, 0.0) is None


def test_percentiles_interpolate_like_numpy():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 0) == 1.0 and percentile(xs, 100) == 4.0
    assert percentile(xs, 50) == pytest.approx(2.5)  # mean of the middle two
    assert percentile(xs, 90) == pytest.approx(3.7)  # numpy.percentile([1,2,3,4], 90)
    assert percentile([7.0], 90) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile(xs, 101)


def test_latency_and_distribution_summaries():
    lat = latency_summary([0.1, 0.2, 0.3, 0.4, 1.0])
    assert lat == pytest.approx({"mean": 0.4, "p50": 0.3, "p90": 0.76})
    assert latency_summary([]) is None
    d = distribution_summary([float(i) for i in range(11)])  # 0..10
    assert d == pytest.approx({"mean": 5.0, "median": 5.0, "p10": 1.0, "p25": 2.5, "p75": 7.5, "p90": 9.0})
    assert distribution_summary([]) is None
    assert not any(math.isnan(v) for v in d.values())
