"""Checking that speculative decoding is lossless: T=0 outputs with a drafter == without one.

``prompt_suite`` builds chat requests mixing text-only prompts, 1..N images of varied sizes and
long prompts (several prefill chunks); ``greedy`` runs them through an engine; ``divergences``
compares two runs token by token and, where they differ, reports the reference's top-2 logprob
gap at the first differing token: a divergence is only excusable (bf16, batching) when that gap
is tiny, i.e. the reference itself was a near-tie.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from massv_vllm.testing.tiny import synthetic_image

TEXTS = [
    "Describe the image.",
    "What colours do you see?",
    "How many shapes are there?",
    "Write a short story about this picture.",
    "Hello! Please answer briefly.",
]


@dataclass
class Request:
    messages: list[dict[str, Any]]
    num_images: int
    long: bool


def prompt_suite(
    n: int, seed: int = 0, max_images: int = 2, long_every: int = 7, long_words: int = 400
) -> list[Request]:
    """``n`` chat requests: image counts cycle 0..max_images, every ``long_every``-th is long."""
    from vllm.multimodal.utils import encode_image_url

    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        k = i % (max_images + 1)
        content: list[dict[str, Any]] = []
        for j in range(k):
            size = (rng.randint(56, 448), rng.randint(56, 448))
            img = synthetic_image(seed * 100003 + i * 17 + j, size)
            content.append({"type": "image_url", "image_url": {"url": encode_image_url(img)}})
        text = TEXTS[i % len(TEXTS)]
        long = long_every > 0 and i % long_every == long_every - 1
        if long:
            words = " ".join(
                rng.choice(["red", "blue", "circle", "square", "left", "top", "the", "a"])
                for _ in range(long_words)
            )
            text = f"{words}\n{text}"
        content.append({"type": "text", "text": text})
        reqs.append(Request(messages=[{"role": "user", "content": content}], num_images=k, long=long))
    return reqs


@dataclass
class Output:
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None  # per generated token: {token id: logprob} (top-k)
    prompt_len: int


def greedy(
    llm: Any, requests: list[Request], max_tokens: int = 16, logprobs: int | None = None
) -> list[Output]:
    """T=0 generation of every request in one batch (vLLM schedules them together)."""
    from vllm import SamplingParams

    # Token ids only: detokenizing logprobs of padded-vocab ids (random tiny models rank them) fails.
    sp = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs, detokenize=False
    )
    outs = llm.chat([r.messages for r in requests], sp, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        lps = None
        if c.logprobs is not None:
            lps = [{tid: lp.logprob for tid, lp in step.items()} for step in c.logprobs]
        result.append(Output(token_ids=list(c.token_ids), logprobs=lps, prompt_len=len(o.prompt_token_ids)))
    return result


@dataclass
class Divergence:
    request: int
    position: int  # index of the first differing generated token
    reference_token: int
    candidate_token: int
    top2_gap: float | None  # reference logprob(top1) - logprob(top2) at that position

    def __str__(self) -> str:
        gap = "n/a" if self.top2_gap is None else f"{self.top2_gap:.3g}"
        return (
            f"request {self.request}: token {self.position} differs "
            f"({self.reference_token} vs {self.candidate_token}); reference top-2 logprob gap {gap}"
        )


def divergences(reference: list[Output], candidate: list[Output]) -> list[Divergence]:
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs vs {len(candidate)} candidate outputs")
    found = []
    for i, (r, c) in enumerate(zip(reference, candidate)):
        if r.token_ids == c.token_ids:
            continue
        pos = next(
            (j for j, (a, b) in enumerate(zip(r.token_ids, c.token_ids)) if a != b),
            min(len(r.token_ids), len(c.token_ids)),
        )
        gap = None
        if r.logprobs is not None and pos < len(r.logprobs):
            top = sorted(r.logprobs[pos].values(), reverse=True)
            gap = top[0] - top[1] if len(top) > 1 else None
        ref_tok = r.token_ids[pos] if pos < len(r.token_ids) else -1
        cand_tok = c.token_ids[pos] if pos < len(c.token_ids) else -1
        found.append(Divergence(i, pos, ref_tok, cand_tok, gap))
    return found
