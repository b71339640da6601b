"""MASSV with vLLM's sampling features, at T=1 and T=0, and with prefix caching (tiny Qwen2.5-VL).

Two engines for the module, both on a *sharpened* copy of the tiny target (``lm_head`` x 40: the
same argmax, so the same greedy outputs, but at T=1 its next-token distribution spreads over a
handful of tokens, entropy ~1-3 nats, instead of being near-uniform over the 512-token
vocabulary): the target alone (the reference) and MASSV with a mirror drafter (the target's own
text stack). At T=0 the mirror's drafts are accepted (MAL ~ γ+1 on text); at T=1 its drafts are
still greedy (vLLM's default ``draft_sample_method``) while the target samples, so about half of
them are accepted and half rejected: both branches of vLLM's rejection sampler run. Prefix caching
is on and the batch budget is 160 tokens, so long prompts are prefilled in chunks.

1. T=1 is lossless in distribution: ``test_t1_samples_have_the_targets_distribution`` (the bound
   and its derivation are in ``tvd_bound``). The samples use ``n`` > 1 (parallel sampling) and the
   engine's seeded generator, not per-request seeds: vLLM 0.26's CPU backend crashes ("CPU
   Generator does not use offset") when the prefill of a request with its own seed is chunked,
   with or without speculation.
2. T=0 with logprobs (and prompt logprobs), repetition/presence/frequency penalties, n > 1
   (top_k=1), allowed_token_ids, bad_words and structured output (JSON schema): the same tokens
   as without MASSV. vLLM itself refuses ``logit_bias`` and ``min_p`` (T > 0) with speculative
   decoding, with a clear ValueError; ``n`` > 1 at T=0 is refused with or without it.
3. Prefix caching + chunked prefill with images: a repeated image prompt whose cached prefix ends
   inside the image (the rest of the image's embeddings come from vLLM's caches, not from a new
   prefill of the image) gives the same output, and the same drafts accepted, as the first time.
"""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams

from massv_vllm.metrics import SpecCounters
from tests.engine_checks import GAMMA, chat, chat_with, fast_loop_calls, sharpen_target

pytestmark = pytest.mark.engine

KW = dict(
    max_model_len=2048,
    max_num_batched_tokens=160,
    max_num_seqs=32,  # 32 x (1 + γ) draft-verify tokens fit the 160-token budget
    dtype="float32",
    enable_prefix_caching=True,
    # No free whitespace in structured output (vLLM 0.26 reads this from the engine config only,
    # not from the request, and only for a named backend): the random tiny target then completes
    # a JSON object in a few tokens instead of emitting whitespace.
    structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
)
SHARPEN = 40.0
N_SAMPLES = 8000
SAMPLE_TOKENS = 4
DELTA = 1e-4  # false-alarm probability of one comparison under "MASSV is lossless" (8 per run)
MIN_SHARE = 0.01  # tokens below this share of the pooled samples share one bin
TEXT = [{"role": "user", "content": "Hello! Please answer briefly."}]
IMAGE = chat([5], "What colours do you see?")


@pytest.fixture(scope="module")
def sharp(tiny_qwen, tmp_path_factory):
    """(sharpened target, its mirror drafter)."""
    from massv_vllm.testing.tiny import make_mirror_drafter

    root = tmp_path_factory.mktemp("sharp")
    target = sharpen_target(tiny_qwen.target, root / "target", SHARPEN)
    return target, make_mirror_drafter(target, tiny_qwen.tokenizer, root / "mirror")


@pytest.fixture(scope="module")
def ref_llm(sharp):
    from massv_vllm.engine import make_llm, shutdown

    llm = make_llm(str(sharp[0]), None, **KW)
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def mirror_llm(sharp):
    from massv_vllm.engine import make_llm, massv_spec, shutdown

    llm = make_llm(str(sharp[0]), massv_spec(str(sharp[1]), GAMMA), probe=True, **KW)
    yield llm
    shutdown(llm)


# ---- 1. T=1: the distribution -------------------------------------------------------------------


def tvd_bound(n: int, k: int, delta: float = DELTA) -> float:
    """Largest total variation distance (TVD) between the empirical distributions of two
    independent samples of size ``n`` from the *same* distribution over ``k`` bins, except with
    probability ``delta``: sqrt(k / 2n) + sqrt(ln(1/delta) / n).

    Derivation. Let p be the distribution, p^ and q^ the two empirical distributions. For each bin
    E|p^_i - q^_i| <= sqrt(Var(p^_i - q^_i)) = sqrt(2 p_i (1 - p_i) / n), so
    E[TVD] = 1/2 sum_i E|p^_i - q^_i| <= 1/2 sqrt(2/n) sum_i sqrt(p_i) <= sqrt(k / 2n)
    (Cauchy-Schwarz: sum_i sqrt(p_i) <= sqrt(k)). Changing one of the 2n samples moves the TVD
    by at most 1/n, so McDiarmid's inequality gives P(TVD >= E[TVD] + t) <= exp(-2t^2 / (2n/n^2))
    = exp(-n t^2); t = sqrt(ln(1/delta) / n) makes that delta.

    Here n = 8000, delta = 1e-4 (8 comparisons per run: a false alarm with probability <= 1e-3)
    and k = 6-19 bins: bounds of 0.053-0.069, while the measured TVDs are 0.010-0.025. A sampler that skipped the rejection step for greedy drafts, or that resampled from the
    target's distribution (instead of the residual max(0, p - q)) after a rejection, would move the
    share of the drafted (argmax) token by about p_a (1 - p_a) ~ 0.2: over three times the bound.
    """
    return math.sqrt(k / (2 * n)) + math.sqrt(math.log(1 / delta) / n)


def binned_tvd(a: list[int], b: list[int], min_share: float = MIN_SHARE) -> tuple[float, int]:
    """(TVD, number of bins) between two equal-size samples of token ids; a bin per token with at
    least ``min_share`` of the pooled samples, one bin for all the others."""
    n = len(a)
    assert len(b) == n
    ca, cb = Counter(a), Counter(b)
    keep = [t for t, c in (ca + cb).items() if c >= min_share * 2 * n]
    rest_a, rest_b = n - sum(ca[t] for t in keep), n - sum(cb[t] for t in keep)
    diff = sum(abs(ca[t] - cb[t]) for t in keep) + abs(rest_a - rest_b)
    return diff / (2 * n), len(keep) + 1


def _sample(llm, messages) -> tuple[list[list[int]], SpecCounters]:
    sp = SamplingParams(
        n=N_SAMPLES, temperature=1.0, max_tokens=SAMPLE_TOKENS, ignore_eos=True, detokenize=False
    )
    before = SpecCounters.from_llm(llm)
    out = llm.chat([messages], sp, use_tqdm=False)[0]
    return [list(c.token_ids) for c in out.outputs], SpecCounters.from_llm(llm) - before


@pytest.mark.parametrize("prompt", ["text", "image"])
def test_t1_samples_have_the_targets_distribution(ref_llm, mirror_llm, prompt):
    """N_SAMPLES samples of the first SAMPLE_TOKENS tokens at T=1, with and without MASSV: at every
    position the two token distributions agree within ``tvd_bound`` (position 1 comes from the
    prefill, before any draft: a control). The reference distributions are not degenerate."""
    messages = TEXT if prompt == "text" else IMAGE
    calls = fast_loop_calls(mirror_llm)
    ref, _ = _sample(ref_llm, messages)
    spec, counters = _sample(mirror_llm, messages)
    assert len(ref) == len(spec) == N_SAMPLES
    assert all(len(s) == SAMPLE_TOKENS for s in ref + spec)
    # Drafts were made, and both accepted and rejected in large numbers (acceptance ~0.5).
    rate = counters.draft_acceptance_rate
    print(f"\n[{prompt}] T=1 MAL {counters.mean_accepted_length:.3f}, draft acceptance {rate:.3f}")
    assert counters.num_drafts > N_SAMPLES // 2 and 0.15 < rate < 0.85
    assert fast_loop_calls(mirror_llm) > calls  # MASSV's own draft loop drafted
    for pos in range(SAMPLE_TOKENS):
        a, b = [s[pos] for s in ref], [s[pos] for s in spec]
        shares = [c / N_SAMPLES for c in Counter(a).values()]
        entropy = -sum(p * math.log(p) for p in shares)
        tvd, k = binned_tvd(a, b)
        bound = tvd_bound(N_SAMPLES, k)
        print(
            f"  token {pos + 1}: reference entropy {entropy:.2f} nats, top share {max(shares):.3f}; "
            f"TVD {tvd:.4f} over {k} bins, bound {bound:.4f}"
        )
        assert entropy > 0.5 and max(shares) < 0.8 and k >= 4  # a spread, not a near-greedy choice
        assert tvd <= bound, (pos, tvd, bound)


# ---- 2. T=0: sampling features ------------------------------------------------------------------

FEATURE_PROMPTS = {
    "text": [{"role": "user", "content": "Describe the image."}],  # a text-only prompt, as in the suite
    "hello": TEXT,
    "image": IMAGE,
}
JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "blue", "green"]},
        "shape": {"enum": ["circle", "square", "triangle"]},
        "big": {"type": "boolean"},
    },
    "required": ["colour", "shape", "big"],
    "additionalProperties": False,
}


def _feature_params(bad_word: str) -> dict[str, SamplingParams]:
    base = dict(temperature=0.0, max_tokens=16, ignore_eos=True, detokenize=False)
    return {
        "greedy": SamplingParams(**base),
        "logprobs": SamplingParams(**base, logprobs=3, prompt_logprobs=2),
        "repetition_penalty": SamplingParams(**base, repetition_penalty=1.8),
        "presence_penalty": SamplingParams(**base, presence_penalty=2.0),
        "frequency_penalty": SamplingParams(**base, frequency_penalty=2.0),
        "all_penalties": SamplingParams(
            **base, repetition_penalty=1.3, presence_penalty=1.5, frequency_penalty=1.5
        ),
        # n > 1 needs T > 0; top_k=1 makes every sample the argmax
        "n3_top_k1": SamplingParams(**(base | dict(temperature=1.0)), n=3, top_k=1),
        "allowed_token_ids": SamplingParams(**base, allowed_token_ids=list(range(100, 160))),
        "bad_words": SamplingParams(**base, bad_words=[bad_word]),
        "json_schema": SamplingParams(
            temperature=0.0,
            max_tokens=64,
            structured_outputs=StructuredOutputsParams(json=JSON_SCHEMA),
        ),
    }


def _run_features(llm, params: dict[str, SamplingParams]) -> dict[tuple[str, str], object]:
    keys = [(f, p) for f in params for p in FEATURE_PROMPTS]
    outs = llm.chat([FEATURE_PROMPTS[p] for _, p in keys], [params[f] for f, _ in keys], use_tqdm=False)
    return dict(zip(keys, outs))


@pytest.fixture(scope="module")
def features(ref_llm, mirror_llm, sharp):
    """Every feature x prompt in one batch per engine: (reference outputs, MASSV outputs, banned id)."""
    from transformers import AutoTokenizer

    # bad_words: the first token of the greedy answer to "hello" that is a word on its own
    # (vLLM bans the ids of the word as tokenized alone and, if also one token, after a space)
    tok = AutoTokenizer.from_pretrained(str(sharp[0]))
    first = _run_features(ref_llm, {"greedy": _feature_params("x")["greedy"]})
    banned, word = next(
        (t, w)
        for t in first[("greedy", "hello")].outputs[0].token_ids
        if (w := tok.decode([t]).strip()).isalpha() and tok.encode(w, add_special_tokens=False) == [t]
    )
    params = _feature_params(word)
    before = SpecCounters.from_llm(mirror_llm)
    spec = _run_features(mirror_llm, params)
    counters = SpecCounters.from_llm(mirror_llm) - before
    print(f"\nfeatures batch with MASSV: MAL {counters.mean_accepted_length:.3f}; bad word {word!r}")
    assert counters.num_drafts > 0
    return _run_features(ref_llm, params), spec, banned


def _ids(out) -> list[list[int]]:
    return [list(c.token_ids) for c in out.outputs]


@pytest.mark.parametrize(
    "feature",
    [
        "logprobs",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "all_penalties",
        "n3_top_k1",
        "allowed_token_ids",
        "bad_words",
        "json_schema",
    ],
)
def test_t0_sampling_feature_gives_the_targets_tokens(features, feature):
    ref, spec, banned = features
    for prompt in FEATURE_PROMPTS:
        r, s = ref[(feature, prompt)], spec[(feature, prompt)]
        assert _ids(s) == _ids(r), (feature, prompt)
    greedy = {p: _ids(ref[("greedy", p)])[0] for p in FEATURE_PROMPTS}
    changed = [p for p in FEATURE_PROMPTS if _ids(ref[(feature, p)])[0] != greedy[p]]
    if feature in ("logprobs", "n3_top_k1"):
        assert not changed  # neither changes the greedy choice
    else:
        assert changed, f"{feature} changed no output: the test would not see it misapplied"
    for prompt in FEATURE_PROMPTS:
        r, s = ref[(feature, prompt)], spec[(feature, prompt)]
        if feature == "logprobs":
            _assert_same_logprobs(r, s)
        elif feature == "n3_top_k1":
            assert _ids(s) == [greedy[prompt]] * 3
        elif feature == "allowed_token_ids":
            assert set(_ids(s)[0]) <= set(range(100, 160))
        elif feature == "bad_words":
            assert banned not in _ids(s)[0]
        elif feature == "json_schema":
            assert s.outputs[0].finish_reason == "stop", s.outputs[0].text
            doc = json.loads(s.outputs[0].text)
            props = JSON_SCHEMA["properties"]
            assert set(doc) == set(props) and isinstance(doc["big"], bool)
            assert doc["colour"] in props["colour"]["enum"] and doc["shape"] in props["shape"]["enum"]


def _assert_same_logprobs(r, s) -> None:
    lr, ls = r.outputs[0].logprobs, s.outputs[0].logprobs
    assert lr is not None and ls is not None and len(lr) == len(ls) == 16
    for a, b in zip(lr, ls):
        assert a.keys() == b.keys()
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)
    assert r.prompt_logprobs is not None and s.prompt_logprobs is not None
    assert len(r.prompt_logprobs) == len(s.prompt_logprobs)
    for a, b in zip(r.prompt_logprobs, s.prompt_logprobs):
        if a is None:
            assert b is None
            continue
        assert a.keys() == b.keys()
        for t in a:
            assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)


@pytest.mark.parametrize(
    "extra",
    [dict(logit_bias={100: 5.0}), dict(min_p=0.1, temperature=1.0)],
    ids=["logit_bias", "min_p"],
)
def test_refused_with_speculative_decoding(ref_llm, mirror_llm, extra):
    """vLLM refuses these with any speculative decoding, before the request reaches the engine;
    the engine keeps serving. Without speculation they are accepted."""
    sp = SamplingParams(**(dict(temperature=0.0, max_tokens=2, detokenize=False) | extra))
    with pytest.raises(ValueError, match="not yet supported with speculative decoding"):
        mirror_llm.chat([TEXT], sp, use_tqdm=False)
    assert len(ref_llm.chat([TEXT], sp, use_tqdm=False)[0].outputs[0].token_ids) == 2
    ok = SamplingParams(temperature=0.0, max_tokens=2, detokenize=False)
    assert len(mirror_llm.chat([TEXT], ok, use_tqdm=False)[0].outputs[0].token_ids) == 2


# ---- 3. prefix caching + chunked prefill with an image ------------------------------------------


def _prefix_prompt(target):
    """A long text, then an image, then the template's tail: the longest prefix a repeat can take
    from the cache (whole 16-token blocks, at most all tokens but the last) ends inside the image."""
    from massv_vllm.testing.tiny import synthetic_image
    from massv_vllm.training.target_features import TargetEncoder

    enc = TargetEncoder(target, load_vision=False)
    image = synthetic_image(77, (196, 140))
    for words in range(150, 300):
        text = " ".join(["red"] * words) + " Describe the picture after this text."
        hf = [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image"}]}]
        ids = enc.prompt_ids(enc.chat_prompt(hf), [image]).input_ids
        img = [i for i, t in enumerate(ids) if t == enc.image_token_id]
        cached = (len(ids) - 1) // 16 * 16
        if img[0] < cached <= img[-1] - 2:  # at least 3 image tokens left to compute
            messages = chat_with(image, text=text)
            messages[0]["content"].reverse()  # the text first, then the image
            return messages, img, cached
    raise AssertionError("no prompt length puts the cache boundary inside the image")


def test_repeated_image_prompt_from_the_prefix_cache(ref_llm, mirror_llm, sharp):
    messages, img, cached = _prefix_prompt(sharp[0])
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, detokenize=False)
    runs = []
    for i in range(2):
        mirror_llm.collective_rpc("massv_probe_start")
        before = SpecCounters.from_llm(mirror_llm)
        out = mirror_llm.chat([messages], sp, use_tqdm=False)[0]
        counters = SpecCounters.from_llm(mirror_llm) - before
        rec = mirror_llm.collective_rpc("massv_probe_records")[0]
        runs.append((out, counters, rec))
        print(
            f"\nrun {i + 1}: prompt {len(out.prompt_token_ids)} tokens (image {img[0]}..{img[-1]}), "
            f"{out.num_cached_tokens} from the cache, MAL {counters.mean_accepted_length}"
        )
    (first, c1, _), (again, c2, rec) = runs
    prompt = list(first.prompt_token_ids)
    assert list(again.prompt_token_ids) == prompt
    assert [i for i, t in enumerate(prompt) if t == prompt[img[0]]] == img  # the layout predicted
    # The first run prefilled the uncached part in several chunks; the repeat took whole blocks up
    # to inside the image from the cache.
    assert len(prompt) - first.num_cached_tokens > KW["max_num_batched_tokens"]
    assert again.num_cached_tokens == cached and img[0] < cached <= img[-1]
    # Its one prefill step computed the rest, and the drafter got the embeddings of exactly the
    # image tokens left (from vLLM's caches: the image was not prefilled again).
    step = rec["steps"][0]
    assert step["num_computed"] == [cached]
    assert step["mm_mask_true"] == step["num_mm_embeds"] == img[-1] + 1 - cached
    # Same tokens (and the same as the target alone), the same drafts accepted.
    ref = ref_llm.chat([messages], sp, use_tqdm=False)[0]
    tokens = [list(o.outputs[0].token_ids) for o in (first, again, ref)]
    assert tokens[1] == tokens[0] and tokens[2] == tokens[0]
    assert (c2.num_drafts, c2.num_accepted_tokens) == (c1.num_drafts, c1.num_accepted_tokens)
    assert c1.mean_accepted_length > 2.0
