"""vLLM engine + plugin + MASSV drafter on a tiny Gemma3 target (CPU backend in CI).

Gemma3 uses 1-D RoPE (no position fix needed), images of a fixed number of soft tokens with
begin/end markers that are not embeddings (``is_embed``), sliding-window layers (the plugin turns
the hybrid KV-cache manager off so the drafter's layers share one KV group) and bidirectional
attention over image tokens in the target only.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine_checks import (
    GAMMA,
    MAX_TOKENS,
    assert_draft_layers_keep_their_windows,
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
DRAFTER_WINDOW = 48  # the window_mirror drafter's; the tiny target's is 64


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
    # The mirror's layers have the target's shapes, so vLLM merged all four into one spec of
    # window 64 (full layers included) until MASSV_PATCH_KV_WINDOWS kept the windows apart.
    assert_draft_layers_keep_their_windows(mirror_llm, 64)
    calls, one = fast_loop_calls(mirror_llm), fast_loop_calls(mirror_llm, "one_graph")
    assert_mirror_accepts(mirror_llm, gemma_reference)
    assert fast_loop_calls(mirror_llm, "one_graph") > one
    assert fast_loop_calls(mirror_llm, "one_graph") - one == fast_loop_calls(mirror_llm) - calls


@pytest.fixture(scope="module")
def window_mirror(tiny_gemma, tmp_path_factory):
    """A mirror drafter whose sliding window (48) differs from the target's (64), as Gemma3-1B's
    (512) does from Gemma3-12B's (1024): vLLM 0.26 refused to start such a pair. Yields (engine,
    drafter folder)."""
    from massv_vllm.testing.tiny import make_mirror_drafter

    out = tmp_path_factory.mktemp("window") / "drafter"
    drafter = make_mirror_drafter(tiny_gemma.target, tiny_gemma.tokenizer, out, sliding_window=DRAFTER_WINDOW)
    for engine in probed_engine(tiny_gemma, drafter):
        yield engine, drafter


def test_drafter_with_another_sliding_window_starts_and_is_lossless(
    window_mirror, gemma_reference, tiny_gemma
):
    """Fails without ``patches/kv_cache_utils.py`` (the engine does not start). On sequences shorter
    than both windows the mirror computes what the target does, so its drafts are accepted there."""
    llm, drafter = window_mirror
    target_cfg = json.loads((tiny_gemma.target / "config.json").read_text())["text_config"]
    drafter_cfg = json.loads((drafter / "config.json").read_text())
    assert (target_cfg["sliding_window"], drafter_cfg["sliding_window"]) == (
        64,
        DRAFTER_WINDOW,
    )
    suite = engine_suite()
    assert_lossless(gemma_reference, counted_greedy(llm, suite)[0])
    short = [
        r
        for r, ref in zip(suite, gemma_reference, strict=True)
        if r.num_images == 0 and ref.prompt_len + MAX_TOKENS <= DRAFTER_WINDOW
    ]
    assert short
    delta = counted_greedy(llm, short)[1]
    assert delta.num_drafts > 0 and delta.mean_accepted_length >= GAMMA + 0.5, delta


def test_each_drafter_layer_gets_its_own_sliding_window(llm, window_mirror):
    """The tiny drafters have one sliding layer (window 64, or 48) and one full layer."""
    assert_draft_layers_keep_their_windows(llm, 64)
    assert_draft_layers_keep_their_windows(window_mirror[0], DRAFTER_WINDOW)


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
