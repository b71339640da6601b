"""Plugin registration, patch bookkeeping, the massv alias and the draft-layout mask remap."""

from __future__ import annotations

import types

import pytest
import torch

import massv_vllm.patches as patches
from massv_vllm.families import FAMILIES


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("massv") == "massv_vllm.serving.plugin:register"


def test_register_is_idempotent_and_patches_vllm():
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.spec_decode.draft_model import DraftModelProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from massv_vllm.serving.plugin import register

    register()
    first = patches.applied()
    register()
    assert patches.apply_all() == first  # second application is a no-op
    assert {
        "vllm.engine.arg_utils.EngineArgs.create_speculative_config",
        "vllm.v1.spec_decode.draft_model.DraftModelProposer.__init__",
        "vllm.v1.spec_decode.draft_model.DraftModelProposer.propose",
        "vllm.v1.spec_decode.draft_model.DraftModelProposer._warn_if_multimodal",
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._gather_mm_embeddings",
        "vllm.multimodal.media.image.ImageMediaIO.load_bytes",
    } <= set(first)
    assert patches.is_patched(EngineArgs, "create_speculative_config")
    assert patches.is_patched(DraftModelProposer, "propose")
    assert patches.is_patched(GPUModelRunner, "_gather_mm_embeddings")
    archs = ModelRegistry.get_supported_archs()
    for fam in FAMILIES.values():
        assert fam.drafter_architecture in archs


def test_worker_patches_wait_for_their_module(tmp_path):
    """In a fresh process, register() does not import worker modules; their first import patches."""
    import subprocess
    import sys

    code = """
import sys
from massv_vllm.serving.plugin import register
import massv_vllm.patches as p
register()
assert "vllm.v1.worker.gpu_model_runner" not in sys.modules, "worker module imported by register()"
assert "vllm.v1.worker.gpu_model_runner" in p.pending()
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.spec_decode.draft_model import DraftModelProposer
assert p.is_patched(GPUModelRunner, "_gather_mm_embeddings") and p.is_patched(DraftModelProposer, "propose")
assert "vllm.v1.worker.gpu_model_runner" not in p.pending()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_patching_twice_is_refused():
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    patches.apply_all()
    with pytest.raises(patches.PatchError, match="already patched by massv-vllm"):
        patches.replace_method(DraftModelProposer, "propose", lambda orig: orig)


def test_other_vllm_versions_are_refused(monkeypatch):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.27.0")
    with pytest.raises(
        patches.PatchError, match=r"patches vLLM 0.26.0 internals but vLLM 0.27.0 is installed"
    ):
        patches.check_vllm_version()


def test_mask_is_remapped_to_the_draft_layout():
    from massv_vllm.patches.draft_model_proposer import to_draft_layout

    # 3 requests with 4, 1 and 3 scheduled tokens; image tokens at target indices 1,2 and 5,6,7.
    qsl = torch.tensor([0, 4, 5, 8], dtype=torch.int32)
    mask = torch.tensor([0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    out = to_draft_layout(mask, qsl, extra_slots_per_request=1)
    # draft layout: r0 -> [0..3] + bonus 4; r1 -> [5] + bonus 6; r2 -> [7..9] + bonus 10
    assert out.tolist() == [0, 1, 1, 0, 0, 0, 0, 1, 1, 1, 0]
    assert out.sum() == mask.sum()
    with pytest.raises(ValueError, match="7 entries for 8 target tokens"):
        to_draft_layout(mask[:7], qsl, 1)


def test_massv_alias_resolves_to_draft_model(tiny_qwen):
    """The alias rewrites the user's dict (process 0); non-MASSV configs pass through untouched."""
    from transformers import AutoConfig

    from massv_vllm.patches.engine_args import resolve_massv
    from massv_vllm.serving.config import MassvConfigError

    target = types.SimpleNamespace(
        hf_config=AutoConfig.from_pretrained(tiny_qwen.target),
        tokenizer=str(tiny_qwen.target),
        model=str(tiny_qwen.target),
        max_model_len=2048,
    )

    def args(spec, **kw):
        base = dict(spec_method=None, spec_model=None, disable_hybrid_kv_cache_manager=None)
        return types.SimpleNamespace(speculative_config=spec, **(base | kw))

    a = args({"method": "massv", "model": str(tiny_qwen.drafter), "num_speculative_tokens": 3})
    resolve_massv(a, target)
    assert a.speculative_config["method"] == "draft_model"
    assert a.speculative_config["num_speculative_tokens"] == 3
    b = args(None, spec_method="massv", spec_model=str(tiny_qwen.drafter))
    resolve_massv(b, target)
    assert b.spec_method == "draft_model"
    c = args({"method": "ngram", "num_speculative_tokens": 3})
    resolve_massv(c, target)
    assert c.speculative_config["method"] == "ngram"
    with pytest.raises(MassvConfigError, match='needs "model"'):
        resolve_massv(args({"method": "massv"}), target)
    # "draft_model" pointed at a MASSV folder is validated too
    with pytest.raises(MassvConfigError, match="is not a vision-language model"):
        resolve_massv(
            args({"method": "draft_model", "model": str(tiny_qwen.drafter)}),
            types.SimpleNamespace(
                **(vars(target) | {"hf_config": AutoConfig.from_pretrained(tiny_qwen.small_lm)})
            ),
        )


def test_gemma3_targets_get_one_kv_cache_group(tiny_gemma):
    """Gemma3 drafters mix sliding and full layers; the hybrid KV manager would split them."""
    from transformers import AutoConfig

    from massv_vllm.patches.engine_args import resolve_massv

    target = types.SimpleNamespace(
        hf_config=AutoConfig.from_pretrained(tiny_gemma.target),
        tokenizer=str(tiny_gemma.target),
        model=str(tiny_gemma.target),
        max_model_len=512,
    )
    spec = {"method": "massv", "model": str(tiny_gemma.drafter)}
    a = types.SimpleNamespace(
        speculative_config=spec, spec_method=None, spec_model=None, disable_hybrid_kv_cache_manager=None
    )
    resolve_massv(a, target)
    assert a.disable_hybrid_kv_cache_manager is True
    b = types.SimpleNamespace(
        speculative_config=dict(spec),
        spec_method=None,
        spec_model=None,
        disable_hybrid_kv_cache_manager=False,
    )
    resolve_massv(b, target)
    assert b.disable_hybrid_kv_cache_manager is False  # an explicit user choice is kept
