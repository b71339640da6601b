"""The text-only baseline drafter (a MASSV folder without projector) through the same plugin path.

It must be lossless, must not be handed image embeddings, and must get the M-RoPE position fix
too (otherwise the benchmarks' text-only baseline would be unfairly crippled). Its LM mirrors the
target's text stack, so its drafts are accepted on text-only prompts.
"""

from __future__ import annotations

import pytest

from tests.engine_checks import (
    ENGINE_KW,
    GAMMA,
    assert_mirror_accepts,
    assert_positions_are_absolute,
    chat,
    mirror_engine,
    run_probed,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(tiny_qwen, tmp_path_factory):
    folder = tmp_path_factory.mktemp("text-mirror") / "drafter"
    yield from mirror_engine(tiny_qwen, folder, text_only=True)


def test_text_only_drafter_is_lossless_with_accepted_drafts(llm, qwen_reference):
    # Image prompts: the drafter sees placeholders, not the image, so no floor there.
    assert_mirror_accepts(llm, qwen_reference, image_floor=None)


def test_text_only_drafter_gets_no_images_but_absolute_positions(llm):
    out, rec = run_probed(llm, chat([921, 922], "word " * 120 + "Describe.", size=(300, 200)), max_tokens=6)
    assert len(out.prompt_token_ids) > ENGINE_KW["max_num_batched_tokens"]
    assert rec["projector_inputs"] == [] and all(s["num_mm_embeds"] == 0 for s in rec["steps"])
    assert assert_positions_are_absolute(rec, GAMMA) >= 3
