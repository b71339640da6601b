"""The text-only baseline drafter (same small LM, no projector) through the same plugin path.

It must be lossless, must not be handed image embeddings, and must get the M-RoPE position fix
too (otherwise the benchmarks' text-only baseline would be unfairly crippled).
"""

from __future__ import annotations

import pytest

from massv_vllm.testing.lossless import greedy, prompt_suite
from tests.engine_checks import (
    ENGINE_KW,
    GAMMA,
    MAX_TOKENS,
    SUITE_SIZE,
    assert_lossless,
    assert_positions_are_absolute,
    chat,
    probed_engine,
    run_probed,
)

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm(tiny_qwen):
    yield from probed_engine(tiny_qwen, tiny_qwen.text_drafter)


def test_text_only_drafter_is_lossless(llm, qwen_reference):
    assert_lossless(
        qwen_reference, greedy(llm, prompt_suite(SUITE_SIZE, max_images=2, long_words=150), MAX_TOKENS)
    )


def test_text_only_drafter_gets_no_images_but_absolute_positions(llm):
    out, rec = run_probed(llm, chat([921, 922], "word " * 120 + "Describe.", size=(300, 200)), max_tokens=6)
    assert len(out.prompt_token_ids) > ENGINE_KW["max_num_batched_tokens"]
    assert rec["projector_inputs"] == [] and all(s["num_mm_embeds"] == 0 for s in rec["steps"])
    assert assert_positions_are_absolute(rec, GAMMA) >= 3
