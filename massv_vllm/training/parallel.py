"""Parallel drafting (PARD-style): training a MASSV drafter to propose γ tokens in one forward.

vLLM 0.26 serves such a drafter through ``draft_model`` with ``"parallel_drafting": true``: per
request it feeds the verified tokens, the bonus token x_t, then γ-1 *mask* tokens at positions
t+1 .. t+γ-1, all causal; the output at x_t drafts x_{t+1} and the output at mask k (k = 1..γ-1)
drafts x_{t+1+k} (``llm_base_proposer.set_inputs_first_pass`` and ``copy_and_expand_eagle_inputs``).

Training builds exactly those sequences. For a few *anchors* t per sample (positions in the
response), the prefix x_0..x_t (images and chat layout as in every other sample) is followed by
γ-1 mask tokens, and mask k is taught x_{t+1+k}; the usual next-token loss over the whole sample is
kept, so the drafter still drafts sequentially too. The mask token is a row of the vocabulary
*padding* (``families.parallel_mask_token_id``: no new vocabulary; never the image token) whose
embedding is a trainable vector (``MassvDrafter.mask_embed``), written into that row on save; its
id goes into config.json as ``pard_token``, the key vLLM reads.

Anchors are drawn from a generator seeded by (seed, sample index, stream position), so a resumed
run draws the same ones.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from massv_vllm.training.data.samples import IGNORE, Batch, Sample


def choose_anchors(length: int, prompt_len: int, count: int, rng: random.Random) -> list[int]:
    """Up to ``count`` anchor positions t, sorted: the last real token before the masks.

    t runs over the response (t >= prompt_len - 1: the whole prompt, images included, is in every
    prefix) and leaves at least one mask target (t + 2 <= length - 1)."""
    candidates = list(range(max(prompt_len - 1, 0), length - 2))
    if len(candidates) <= count:
        return candidates
    return sorted(rng.sample(candidates, count))


def parallel_sequence(
    ids: Sequence[int], t: int, gamma: int, mask_id: int, pad_id: int
) -> tuple[list[int], list[int], list[int]]:
    """(input ids, labels, attention mask) for anchor ``t``: x_0..x_t, γ-1 masks, one trailing slot.

    Labels follow the next-token convention of ``causal_lm_loss`` (logits at i predict labels[i+1]):
    mask k sits at t+k and its target x_{t+1+k} is labels[t+1+k]; the trailing slot only carries
    the last mask's target (it is not attended to: it comes after every position that is read)."""
    n = len(ids)
    inputs = [*ids[: t + 1], *([mask_id] * (gamma - 1)), pad_id]
    labels = [IGNORE] * (t + 2) + [int(ids[j]) if j < n else IGNORE for j in range(t + 2, t + gamma + 1)]
    attention = [1] * (t + gamma) + [0]
    return inputs, labels, attention


def parallel_batch(
    samples: Sequence[Sample],
    features: Sequence[Sequence[torch.Tensor]] | None,
    *,
    pad_id: int,
    mask_id: int,
    gamma: int,
    anchors: int,
    seed: int,
    position: int,
) -> Batch | None:
    """The masked sequences of ``samples`` (``anchors`` per sample), right-padded into one batch;
    None when no sample has a response long enough."""
    rows: list[tuple[list[int], list[int], list[int]]] = []
    feats: list[torch.Tensor] = []
    for i, s in enumerate(samples):
        rng = random.Random(f"pard|{seed}|{s.index}|{position}")
        ids = s.input_ids.tolist()
        for t in choose_anchors(len(ids), s.prompt_len, anchors, rng):
            rows.append(parallel_sequence(ids, t, gamma, mask_id, pad_id))
            if features is not None:
                feats.extend(features[i])
    if not rows:
        return None
    width = max(len(r[0]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (x, y, a) in enumerate(rows):
        input_ids[r, : len(x)] = torch.tensor(x)
        labels[r, : len(y)] = torch.tensor(y)
        attention[r, : len(a)] = torch.tensor(a)
    embeds = torch.cat(feats) if feats else None
    return Batch(input_ids, attention, labels, embeds, int(attention.sum()))
