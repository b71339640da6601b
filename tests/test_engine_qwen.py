"""vLLM engine + plugin + MASSV drafter on a tiny Qwen2.5-VL target (CPU backend in CI).

Two MASSV engines for the module: a "mirror" drafter (the target's own text stack) whose drafts
are accepted, and a drafter trained only to name image colours, whose drafts are mostly rejected
(the low-acceptance case, and the image-reading checks). The no-speculation reference comes from
the session fixture.
"""

from __future__ import annotations

import pytest
import torch

from massv_vllm.training.target_features import TargetEncoder
from tests.engine_checks import (
    ENGINE_KW,
    GAMMA,
    assert_drafter_reads_images,
    assert_lossless,
    assert_mirror_accepts,
    assert_positions_are_absolute,
    chat,
    counted_greedy,
    engine_suite,
    fast_loop_calls,
    mirror_engine,
    probed_engine,
    projector_inputs,
    run_probed,
    target_image_features,
    train_image_aware_drafter,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def aware(tiny_qwen, tmp_path_factory):
    """A drafter trained (transformers side) to name the colour of the image it is shown."""
    return train_image_aware_drafter(tiny_qwen, tmp_path_factory.mktemp("aware") / "drafter")


@pytest.fixture(scope="module")
def llm(tiny_qwen, aware):
    yield from probed_engine(tiny_qwen, aware[0])


@pytest.fixture(scope="module")
def mirror_llm(tiny_qwen, tmp_path_factory):
    yield from mirror_engine(tiny_qwen, tmp_path_factory.mktemp("mirror") / "drafter")


def test_accepted_drafts_are_lossless(mirror_llm, qwen_reference):
    """The accepted-prefix path (accepted tokens, drafter KV reuse, bonus token) at T=0."""
    calls, first = fast_loop_calls(mirror_llm), fast_loop_calls(mirror_llm, "first_pass")
    assert_mirror_accepts(mirror_llm, qwen_reference)
    # MASSV's own draft loop drafted (patches/_draft_loop.py), first passes included (the default)
    assert fast_loop_calls(mirror_llm) > calls
    assert fast_loop_calls(mirror_llm, "first_pass") > first


@pytest.fixture(scope="module")
def suite_run(llm):
    return counted_greedy(llm, engine_suite())


def test_low_acceptance_drafter_is_lossless(suite_run, qwen_reference):
    outs, _ = suite_run
    assert any(o.prompt_len > ENGINE_KW["max_num_batched_tokens"] for o in outs)  # chunked prefills happened
    assert_lossless(qwen_reference, outs)


def test_spec_decode_counters_are_populated(suite_run):
    _, delta = suite_run
    assert delta.num_drafts > 0
    assert delta.num_draft_tokens == GAMMA * delta.num_drafts
    assert 1.0 <= delta.mean_accepted_length <= GAMMA + 1
    assert len(delta.accepted_per_pos) == GAMMA


def test_drafter_receives_the_targets_image_features(llm, tiny_qwen):
    """What vLLM feeds the projector == TargetEncoder (the training-side features), per token."""
    seeds = [901, 902]
    _, rec = run_probed(llm, chat(seeds, size=(250, 130)))
    got = projector_inputs(rec)
    want = target_image_features(tiny_qwen.target, seeds, (250, 130))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_prompt_ids_match_the_training_side(llm, tiny_qwen):
    from massv_vllm.testing.tiny import synthetic_image

    out, _ = run_probed(llm, chat([903], "How many shapes are there?"))
    enc = TargetEncoder(tiny_qwen.target, load_vision=False)
    text = enc.chat_prompt(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "How many shapes are there?"}],
            }
        ]
    )
    assert enc.prompt_ids(text, [synthetic_image(903, (168, 112))]).input_ids == list(out.prompt_token_ids)


def test_served_drafter_reads_the_image(llm, aware):
    """Trained on TargetEncoder features, served by vLLM: its first draft names the image colour,
    so vLLM hands it the same image features, at the right positions, as training did."""
    assert_drafter_reads_images(llm, aware[1], ["red", "blue", "blue", "red"], seed=20000)


def test_draft_positions_are_absolute_after_images(llm):
    """The M-RoPE fix: chunks after an image start at the absolute position (KV slots too)."""
    messages = chat([904, 905], "word " * 120 + "Describe.", size=(300, 200))
    out, rec = run_probed(llm, messages, max_tokens=6)
    assert len(out.prompt_token_ids) > ENGINE_KW["max_num_batched_tokens"]
    assert assert_positions_are_absolute(rec, GAMMA) >= 3


def test_seeded_sampling_survives_chunked_prefill(mirror_llm):
    """vLLM's CPU runner died on a seeded request prefilled in several chunks ("CPU Generator does
    not use offset"; patches/cpu_model_runner.py). Runs last: before the fix it killed the engine."""
    from vllm import SamplingParams

    long = next(r for r in engine_suite() if r.long)
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    outs = mirror_llm.chat([long.messages] * 2, [params, params], use_tqdm=False)
    assert len(outs[0].prompt_token_ids) > ENGINE_KW["max_num_batched_tokens"]  # chunked
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids  # same seed, same draws
