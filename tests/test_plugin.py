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
    originals = {w: _method(w) for w in first}
    register()
    assert patches.apply_all() == first  # second application is a no-op...
    assert {w: _method(w) for w in first} == originals  # ...and wrapped nothing a second time
    for where, method in originals.items():
        assert not getattr(method.__massv_original__, "__massv_patch__", False), where
    assert {
        "vllm.engine.arg_utils.EngineArgs.create_speculative_config",
        "vllm.config.speculative.SpeculativeConfig.compute_hash",
        "vllm.v1.spec_decode.draft_model.DraftModelProposer.__init__",
        "vllm.v1.spec_decode.draft_model.DraftModelProposer.load_model",
        "vllm.v1.spec_decode.draft_model.DraftModelProposer.propose",
        "vllm.v1.spec_decode.draft_model.DraftModelProposer._warn_if_multimodal",
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._gather_mm_embeddings",
        "vllm.v1.worker.gpu_model_runner.GPUModelRunner._capture_cudagraphs",
        "vllm.multimodal.media.image.ImageMediaIO.load_bytes",
    } <= set(first)
    assert patches.is_patched(EngineArgs, "create_speculative_config")
    assert patches.is_patched(DraftModelProposer, "propose")
    assert patches.is_patched(GPUModelRunner, "_gather_mm_embeddings")
    archs = ModelRegistry.get_supported_archs()
    for fam in FAMILIES.values():
        assert fam.drafter_architecture in archs


def _method(where: str):
    import importlib

    module, cls, name = where.rsplit(".", 2)
    return vars(getattr(importlib.import_module(module), cls))[name]


def _fresh_process(code: str, env: dict[str, str] | None = None) -> str:
    import os
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_switched_off_patches_leave_vllm_alone():
    """MASSV_FAST_DRAFT=0 / MASSV_PATCH_DRAFT_IMAGES=0: those methods stay vLLM's own."""
    code = """
from massv_vllm.serving.plugin import register
import massv_vllm.patches as p
register()
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.spec_decode.draft_model import DraftModelProposer
print(p.is_patched(GPUModelRunner, "_capture_cudagraphs"), p.is_patched(GPUModelRunner, "_gather_mm_embeddings"),
      p.is_patched(DraftModelProposer, "propose"))
"""
    assert (
        _fresh_process(code, {"MASSV_FAST_DRAFT": "0", "MASSV_PATCH_DRAFT_IMAGES": "0"}) == "False False True"
    )
    off = {
        "MASSV_FAST_DRAFT": "0",
        "MASSV_PATCH_DRAFT_IMAGES": "0",
        "MASSV_PATCH_DRAFT_POSITIONS": "0",
        "MASSV_PATCH_DRAFT_WINDOWS": "0",
    }
    assert _fresh_process(code, off) == "False False False"


def test_bad_switch_values_are_refused(monkeypatch):
    from massv_vllm.patches.envs import switch

    monkeypatch.setenv("MASSV_FAST_DRAFT", "yes please")
    with pytest.raises(patches.PatchError, match=r"MASSV_FAST_DRAFT='yes please': expected one of 0, 1"):
        switch("MASSV_FAST_DRAFT").enabled()
    monkeypatch.setenv("MASSV_FAST_DRAFT", "always")  # only the request-handling fixes widen
    with pytest.raises(patches.PatchError):
        switch("MASSV_FAST_DRAFT").enabled()


def test_request_patches_act_for_massv_servers_only(monkeypatch):
    from massv_vllm.patches.envs import ACTIVE_ENV, request_patch_applies

    env = "MASSV_PATCH_IMAGE_ERRORS"
    monkeypatch.delenv(env, raising=False)
    monkeypatch.delenv(ACTIVE_ENV, raising=False)
    assert not request_patch_applies(env)  # a plain vLLM server in the same environment
    monkeypatch.setenv(ACTIVE_ENV, "1")
    assert request_patch_applies(env)
    monkeypatch.setenv(env, "0")
    assert not request_patch_applies(env)
    monkeypatch.delenv(ACTIVE_ENV)
    monkeypatch.setenv(env, "always")
    assert request_patch_applies(env)


def test_patch_scope_follows_the_drafter_architecture():
    ns = types.SimpleNamespace

    def cfg(method, arch):
        draft = ns(hf_config=ns(architectures=[arch]))
        return ns(speculative_config=ns(method=method, draft_model_config=draft))

    assert patches.is_massv_engine(cfg("draft_model", "MassvQwen2DrafterForCausalLM"))
    assert patches.is_massv_engine(cfg("draft_model", "MassvGemma3DrafterForCausalLM"))
    assert not patches.is_massv_engine(cfg("draft_model", "Qwen2ForCausalLM"))
    assert not patches.is_massv_engine(cfg("eagle", "MassvQwen2DrafterForCausalLM"))
    assert not patches.is_massv_engine(ns(speculative_config=None))


def test_changed_signatures_are_refused():
    class Stand:
        def propose(self, a, b):
            return a + b

    with pytest.raises(
        patches.PatchError, match=r"has parameters \('self', 'a', 'b'\), but .* \('self', 'a'\)"
    ):
        patches.replace_method(Stand, "propose", lambda orig: orig, expect=("self", "a"))
    assert not patches.is_patched(Stand, "propose")
    assert patches.bind(Stand.propose, "s", 1, b=2) == {"self": "s", "a": 1, "b": 2}


def test_massv_drafters_get_their_own_compile_cache():
    """Two drafters of the same target must not share a torch.compile cache directory (their
    compiled graphs differ: input_ids vs inputs_embeds); other draft models keep vLLM's key."""
    from vllm.config.speculative import SpeculativeConfig

    patches.apply_all()
    ns = types.SimpleNamespace

    def spec(arch, draft_hash):
        draft = ns(hf_config=ns(architectures=[arch]), compute_hash=lambda: draft_hash)
        return ns(method="draft_model", draft_model_config=draft)

    h = SpeculativeConfig.compute_hash
    vllm_key = h.__massv_original__(spec("Qwen2ForCausalLM", "x"))
    assert h(spec("Qwen2ForCausalLM", "a")) == h(spec("Qwen2ForCausalLM", "b")) == vllm_key
    massv_a = h(spec("MassvQwen2DrafterForCausalLM", "a"))
    massv_b = h(spec("MassvQwen2DrafterForCausalLM", "b"))
    assert len({vllm_key, massv_a, massv_b}) == 3
    assert massv_a == h(spec("MassvQwen2DrafterForCausalLM", "a"))


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


def test_one_graph_step_update_matches_vllms_kernel():
    """MASSV_FAST_DRAFT_ONE_GRAPH's device-side step update against vLLM's own step kernel (its
    CPU implementation): positions, slots and sequence lengths of the real requests, including one
    that runs past max_model_len; padded requests (>= the batch size on the device) only get the
    padding slot, as the GPU kernel's contract says, and keep their lengths and positions."""
    from vllm.platforms import current_platform
    from vllm.v1.spec_decode.utils import PADDING_SLOT_ID

    current_platform.import_kernels()  # vLLM's C++ ops (the CPU build's kernels)
    if not hasattr(torch.ops._C, "eagle_step_slot_mapping_metadata_kernel_impl"):
        pytest.skip("vLLM's CPU build has the C++ step kernel; the GPU tests cover the GPU's")

    from massv_vllm.patches._draft_loop import DraftDecodeLoop

    b, n, block_size, max_model_len = 3, 4, 4, 30
    positions = torch.tensor([5, 16, 29, 7])  # the third one exceeds max_model_len after +1
    table = torch.randint(1, 100, (n, 8), dtype=torch.int32)
    seq_lens = torch.tensor([6, 17, 30, 0], dtype=torch.int32)

    ref_pos, ref_seq = torch.zeros(b, dtype=torch.int64), seq_lens[:b].clone()
    ref_slot = torch.full((b,), -7, dtype=torch.int64)
    torch.ops._C.eagle_step_slot_mapping_metadata_kernel_impl(
        positions[:b].clone(),
        table[:b],
        ref_seq,
        ref_pos,
        ref_slot,
        block_size,
        max_model_len,
        PADDING_SLOT_ID,
    )

    loop = DraftDecodeLoop.__new__(DraftDecodeLoop)
    loop.p = types.SimpleNamespace(
        positions=positions.clone(),
        max_model_len=max_model_len,
        block_size=block_size,
        _slot_mapping_buffer=torch.full((n,), -7, dtype=torch.int64),
    )
    loop.seq_lens = seq_lens.clone()
    loop.num_valid = torch.tensor([b], dtype=torch.int32)
    loop.req_index = torch.arange(n, dtype=torch.int32)
    loop._step_update(n, table)

    assert ref_pos.tolist() == [6, 17, 0] and ref_slot[2] == PADDING_SLOT_ID  # the case is covered
    assert loop.p.positions[:b].tolist() == ref_pos.tolist()
    assert loop.p._slot_mapping_buffer[:b].tolist() == ref_slot.tolist()
    assert loop.seq_lens[:b].tolist() == ref_seq.tolist()
    assert loop.p._slot_mapping_buffer[b:].tolist() == [PADDING_SLOT_ID]
    assert loop.seq_lens[b:].tolist() == [0] and loop.p.positions[b:].tolist() == [7]


def _target(tiny, max_model_len: int = 2048, config_from=None):
    """What ``resolve_massv`` reads of vLLM's target ModelConfig."""
    from transformers import AutoConfig

    return types.SimpleNamespace(
        hf_config=AutoConfig.from_pretrained(config_from or tiny.target),
        tokenizer=str(tiny.target),
        model=str(tiny.target),
        max_model_len=max_model_len,
    )


def _args(spec, **kw):
    """What ``resolve_massv`` reads and rewrites of vLLM's EngineArgs."""
    base = dict(spec_method=None, spec_model=None, spec_tokens=None, disable_hybrid_kv_cache_manager=None)
    return types.SimpleNamespace(speculative_config=spec, **(base | kw))


def test_massv_alias_resolves_to_draft_model(tiny_qwen):
    """The alias rewrites the user's dict (process 0); non-MASSV configs pass through untouched."""
    from massv_vllm.patches.engine_args import resolve_massv
    from massv_vllm.serving.config import MassvConfigError

    target, args = _target(tiny_qwen), _args
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
            _target(tiny_qwen, config_from=tiny_qwen.small_lm),
        )


def test_gemma3_targets_get_one_kv_cache_group(tiny_gemma):
    """Gemma3 drafters mix sliding and full layers; the hybrid KV manager would split them."""
    from massv_vllm.patches.engine_args import resolve_massv

    target = _target(tiny_gemma, 512)
    spec = {"method": "massv", "model": str(tiny_gemma.drafter)}
    a = _args(spec)
    resolve_massv(a, target)
    assert a.disable_hybrid_kv_cache_manager is True
    b = _args(dict(spec), disable_hybrid_kv_cache_manager=False)
    resolve_massv(b, target)
    assert b.disable_hybrid_kv_cache_manager is False  # an explicit user choice is kept


def test_startup_line_names_drafter_target_gamma_projector_and_patches(tiny_qwen, monkeypatch):
    from massv_vllm.patches.engine_args import startup_line
    from massv_vllm.serving.checks import check_drafter

    monkeypatch.setenv("MASSV_FAST_DRAFT", "0")
    info = check_drafter(tiny_qwen.drafter)
    args = types.SimpleNamespace(speculative_config={"num_speculative_tokens": 4}, spec_tokens=None)
    line = startup_line(info, "D", "T", args)
    proj = info.massv.projector
    dims = f"{proj.input_dim}->{proj.hidden_dim}->{info.base_config.hidden_size} ({proj.activation})"
    assert line.startswith(f"massv-vllm: drafter D | target T | γ=4 | projector {dims} | patches on: ")
    on, off = line.split(" | off: ")
    assert "MASSV_PATCH_ALIAS" in on and "MASSV_FAST_DRAFT," not in on
    assert off.split(", ")[0] == "MASSV_FAST_DRAFT"
    text = startup_line(check_drafter(tiny_qwen.text_drafter), "D", "T", args)
    assert "projector none (text-only drafter)" in text


def test_parallel_drafting_needs_a_drafter_trained_for_it(tiny_qwen, tmp_path):
    """Refused in the calling process (before any engine): no mask id, or a bad one."""
    import json
    import shutil

    from massv_vllm.patches.engine_args import resolve_massv
    from massv_vllm.serving.config import MassvConfigError

    target = _target(tiny_qwen)

    def args(drafter):
        return _args({"method": "massv", "model": str(drafter), "parallel_drafting": True})

    with pytest.raises(MassvConfigError, match="not trained for parallel drafting .*no pard_token"):
        resolve_massv(args(tiny_qwen.drafter), target)
    folder = tmp_path / "d"
    shutil.copytree(tiny_qwen.drafter, folder)
    cfg = json.loads((folder / "config.json").read_text())
    image_id = cfg["massv"]["target"]["image_token_id"]
    for bad, why in ((image_id, "is the target's image token id"), (10**9, "outside the vocabulary")):
        (folder / "config.json").write_text(json.dumps(cfg | {"pard_token": bad}))
        with pytest.raises(MassvConfigError, match=why):
            resolve_massv(args(folder), target)
    (folder / "config.json").write_text(json.dumps(cfg | {"pard_token": cfg["massv"]["base_vocab_size"]}))
    a = args(folder)
    resolve_massv(a, target)
    assert a.speculative_config["method"] == "draft_model" and a.speculative_config["parallel_drafting"]


def test_a_massv_folder_given_as_spec_model_is_served_as_massv(tiny_qwen):
    """``--spec-model DRAFTER`` alone (vLLM would infer the method) and ``--spec-method
    draft_model``: checked and served as MASSV, with the γ the folder records."""
    import json

    from massv_vllm.patches.engine_args import resolve_massv

    gamma = json.loads((tiny_qwen.drafter / "config.json").read_text())["speculators_config"]
    gamma = gamma["proposal_methods"][0]["speculative_tokens"]
    a = _args(None, spec_model=str(tiny_qwen.drafter))
    resolve_massv(a, _target(tiny_qwen))
    assert (a.spec_method, a.spec_tokens, a.speculative_config) == ("draft_model", gamma, None)
    b = _args(None, spec_method="draft_model", spec_model=str(tiny_qwen.drafter), spec_tokens=2)
    resolve_massv(b, _target(tiny_qwen))
    assert (b.spec_method, b.spec_tokens) == ("draft_model", 2)  # the user's γ wins
    c = _args({"model": str(tiny_qwen.drafter)})
    resolve_massv(c, _target(tiny_qwen))
    assert c.speculative_config == {"model": str(tiny_qwen.drafter), "method": "draft_model",
                                    "num_speculative_tokens": gamma}  # fmt: skip
    d = _args(None, spec_model=str(tiny_qwen.small_lm))  # a plain LM: vLLM's business
    resolve_massv(d, _target(tiny_qwen))
    assert (d.spec_method, d.spec_tokens) == (None, None)


def test_speculators_folder_names_its_target(tiny_qwen, tmp_path):
    """``vllm serve DRAFTER``: the target comes from the folder; relative paths are read from the
    drafter folder, a missing target is one clear error, a hub id is left to vLLM."""
    import json
    import shutil

    from massv_vllm.patches.engine_args import massv_speculators_override
    from massv_vllm.serving.config import MassvConfigError

    target, spec = massv_speculators_override(str(tiny_qwen.drafter), None)
    assert target == str(tiny_qwen.target.resolve())
    assert spec == {"method": "massv", "model": str(tiny_qwen.drafter), "num_speculative_tokens": 5}
    _, spec = massv_speculators_override(str(tiny_qwen.drafter), {"num_speculative_tokens": 2, "model": "x"})
    assert spec["num_speculative_tokens"] == 2 and spec["model"] == str(tiny_qwen.drafter)
    assert massv_speculators_override(str(tiny_qwen.small_lm), None) is None  # not a MASSV folder
    assert massv_speculators_override("Qwen/Qwen2.5-VL-7B-Instruct", None) is None

    moved = tmp_path / "bundle"
    shutil.copytree(tiny_qwen.drafter, moved / "drafter")
    cfg_path = moved / "drafter" / "config.json"
    cfg = json.loads(cfg_path.read_text())

    def name(value):
        cfg["speculators_config"]["verifier"]["name_or_path"] = value
        cfg_path.write_text(json.dumps(cfg))
        return massv_speculators_override(str(moved / "drafter"), None)

    shutil.copytree(tiny_qwen.target, moved / "target")
    assert name("../target")[0] == str((moved / "target").resolve())
    assert name("Qwen/Qwen2.5-VL-7B-Instruct")[0] == "Qwen/Qwen2.5-VL-7B-Instruct"
    with pytest.raises(MassvConfigError, match=r"names the target .*'/nowhere/target'.*vllm serve TARGET"):
        name("/nowhere/target")
    with pytest.raises(MassvConfigError, match="not a folder"):
        name("../missing")
