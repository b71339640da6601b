"""Parallel MASSV drafting (``"parallel_drafting": true``) on the tiny Qwen2.5-VL target (CPU).

vLLM 0.26's ``draft_model`` path proposes all γ tokens in one drafter forward: after each
request's tokens come the bonus token and γ-1 mask tokens (the id named by the drafter's
``pard_token``), so the draft layout puts request r at ``query_start[r] + r·γ`` instead of
``+ r``. The image mask must follow that layout. The drafter here is the target's mirror (its mask
row untrained), so the first draft of each step is accepted and the others mostly not.
"""

from __future__ import annotations

import json

import pytest
import torch

from massv_vllm.testing.lossless import greedy
from massv_vllm.testing.tiny import make_mirror_drafter, synthetic_image
from massv_vllm.training.target_features import TargetEncoder
from tests.engine_checks import (
    GAMMA,
    MAX_TOKENS,
    assert_lossless,
    chat,
    counted_greedy,
    engine_suite,
    fast_loop_calls,
    probed_engine,
    projector_inputs,
    run_probed,
    target_image_features,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def parallel_drafter(tiny_qwen, tmp_path_factory):
    folder = make_mirror_drafter(tiny_qwen.target, tiny_qwen.tokenizer, tmp_path_factory.mktemp("par") / "d")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["pard_token"] = cfg["vocab_size"] - 1  # the mirror has no padding rows: its last id
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


@pytest.fixture(scope="module")
def llm(tiny_qwen, parallel_drafter):
    yield from probed_engine(tiny_qwen, parallel_drafter, parallel_drafting=True)


def test_parallel_drafting_is_lossless_with_accepted_drafts(llm, qwen_reference):
    suite = engine_suite()
    assert_lossless(qwen_reference, greedy(llm, suite, MAX_TOKENS))
    delta = counted_greedy(llm, [r for r in suite if r.num_images == 0])[1]
    # The first draft of each step comes from the bonus slot, which the mirror gets right.
    assert delta.num_drafts > 0 and delta.acceptance_per_position[0] > 0.8, delta
    assert delta.mean_accepted_length > 1.8
    # by default MASSV's loop runs decode steps' draft pass (a full CUDA graph on GPUs, eager here)
    assert fast_loop_calls(llm, "first_pass") > 0


def test_image_rows_land_on_image_slots_in_the_parallel_layout(llm, tiny_qwen):
    """With γ slots per request, the remapped mask still selects exactly the image placeholders,
    one slot per embedding row, and the rows are the target's own image features."""
    seeds, size = [931, 932], (250, 130)
    _, rec = run_probed(llm, chat(seeds, size=size))
    image_id = TargetEncoder(tiny_qwen.target, load_vision=False).image_token_id
    assert rec["image_slots"], "the drafter received no image embeddings"
    for call in rec["image_slots"]:
        assert call["slot_tokens"] == [image_id] and call["slots"] == call["rows"], call
    want = target_image_features(tiny_qwen.target, seeds, size)
    torch.testing.assert_close(projector_inputs(rec), want, atol=1e-4, rtol=1e-4)


def test_served_parallel_drafts_equal_the_training_side_layout(llm, tiny_qwen, parallel_drafter):
    """The layout training builds (training/parallel.py: prefix, bonus token, γ-1 mask tokens,
    image features spliced in the prompt) is what vLLM runs: the transformers drafter's argmax at
    the bonus and mask positions equals the proposal vLLM made right after the prompt."""
    from massv_vllm.training.modeling import MassvDrafter
    from massv_vllm.training.parallel import parallel_sequence
    from tests.engine_checks import chat_with, first_draft_after_prefill

    image = synthetic_image(933, (200, 150))
    out, rec = run_probed(llm, chat_with(image, text="What is in the picture?"), max_tokens=2)
    bonus, served = first_draft_after_prefill(out, rec)
    drafter = MassvDrafter.from_pretrained(parallel_drafter)
    prompt = list(out.prompt_token_ids)
    ids, _, attention = parallel_sequence([*prompt, bonus], len(prompt), GAMMA, drafter.mask_token_id, 0)
    feats = torch.cat(TargetEncoder(tiny_qwen.target).image_features([image]))
    with torch.no_grad():
        logits = drafter(
            torch.tensor([ids]), image_embeds=feats, attention_mask=torch.tensor([attention])
        ).logits
    expected = logits[0, len(prompt) : len(prompt) + GAMMA].argmax(-1).tolist()
    assert served == expected, (served, expected)


@pytest.fixture(scope="module")
def vllm_pass_llm(tiny_qwen, parallel_drafter):
    """The same engine with decode steps' single draft pass left to vLLM's own code
    (``MASSV_FAST_DRAFT_FIRST_PASS=0``). Used by the module's last test only: with two engines in
    one process, vLLM's metrics no longer tell them apart."""
    env = {"MASSV_FAST_DRAFT_FIRST_PASS": "0"}
    yield from probed_engine(tiny_qwen, parallel_drafter, env=env, parallel_drafting=True)


def test_massvs_parallel_pass_drafts_what_vllms_pass_does(llm, vllm_pass_llm, qwen_reference):
    suite = engine_suite()
    assert_lossless(qwen_reference, greedy(vllm_pass_llm, suite, MAX_TOKENS))
    # Accepted drafts, as in the first test. The newest engine owns vLLM's metrics registry (a
    # new engine's stat logger unregisters the older one's), so these counters are vllm_pass_llm's.
    delta = counted_greedy(vllm_pass_llm, [r for r in suite if r.num_images == 0])[1]
    assert delta.num_drafts > 0 and delta.acceptance_per_position[0] > 0.8, delta
    assert delta.mean_accepted_length > 1.8
    assert fast_loop_calls(vllm_pass_llm) == 0  # switched off: vLLM drafted every step (loop idle)
    # Step by step, MASSV's pass proposes what vLLM's own pass does, on a text-only and an image
    # request.
    for messages in (chat([], "Count from one to twenty."), chat([941], "Describe the picture.")):
        before = fast_loop_calls(llm, "first_pass")
        out, ours = run_probed(llm, messages, max_tokens=12)
        assert fast_loop_calls(llm, "first_pass") > before  # MASSV's loop drafted
        ref, theirs = run_probed(vllm_pass_llm, messages, max_tokens=12)
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        drafts = [list(d.values()) for d in ours["drafts"]]
        assert len(drafts) > 2 and drafts == [list(d.values()) for d in theirs["drafts"]]
