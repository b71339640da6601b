"""vLLM engine + plugin + MASSV drafter on a tiny Gemma3 target (CPU backend in CI).

Gemma3 uses 1-D RoPE (no position fix needed), images of a fixed number of soft tokens with
begin/end markers that are not embeddings (``is_embed``), sliding-window layers (the plugin turns
the hybrid KV-cache manager off so the drafter's layers share one KV group) and bidirectional
attention over image tokens in the target only.
"""

from __future__ import annotations

import pytest
import torch

from tests.engine_checks import (
    GAMMA,
    assert_drafter_reads_images,
    assert_lossless,
    assert_mirror_accepts,
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
def aware(tiny_gemma, tmp_path_factory):
    return train_image_aware_drafter(tiny_gemma, tmp_path_factory.mktemp("aware") / "drafter")


@pytest.fixture(scope="module")
def llm(tiny_gemma, aware):
    yield from probed_engine(tiny_gemma, aware[0])


@pytest.fixture(scope="module")
def mirror_llm(tiny_gemma, tmp_path_factory):
    # This engine runs draft steps 2..γ with the one-graph step update (off by default; one graph
    # on GPUs, eager here); the Qwen2.5-VL tests keep vLLM's step kernel.
    env = {"MASSV_FAST_DRAFT_ONE_GRAPH": "1"}
    yield from mirror_engine(tiny_gemma, tmp_path_factory.mktemp("mirror") / "drafter", env=env)


def test_accepted_drafts_are_lossless(mirror_llm, gemma_reference):
    """The accepted-prefix path at T=0; with the mirror drafter's MAL floor this also checks that
    the one-graph step update advances positions, KV slots and lengths as vLLM's kernel does."""
    calls, one = fast_loop_calls(mirror_llm), fast_loop_calls(mirror_llm, "one_graph")
    assert_mirror_accepts(mirror_llm, gemma_reference)
    assert fast_loop_calls(mirror_llm, "one_graph") > one
    assert fast_loop_calls(mirror_llm, "one_graph") - one == fast_loop_calls(mirror_llm) - calls


def test_low_acceptance_drafter_is_lossless(llm, gemma_reference):
    outs, delta = counted_greedy(llm, engine_suite())
    assert_lossless(gemma_reference, outs)
    assert delta.num_drafts > 0 and 1.0 <= delta.mean_accepted_length <= GAMMA + 1
    assert len(delta.accepted_per_pos) == GAMMA


def test_drafter_receives_the_targets_image_features(llm, tiny_gemma):
    seeds = [911, 912]
    _, rec = run_probed(llm, chat(seeds, size=(150, 220)))
    want = target_image_features(tiny_gemma.target, seeds, (150, 220))
    got = projector_inputs(rec)
    assert got.shape == want.shape  # soft tokens only: <start_of_image>/<end_of_image> excluded
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_served_drafter_reads_the_image(llm, aware):
    """Trained on TargetEncoder features, served by vLLM: its first draft names the image colour,
    so vLLM hands it the same image features, at the right positions, as training did."""
    assert_drafter_reads_images(llm, aware[1], ["blue", "red", "red", "blue"], seed=30000)
