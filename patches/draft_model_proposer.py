"""DraftModelProposer (vllm/v1/spec_decode/draft_model.py, vLLM 0.26.0): positions, image mask,
and the fast draft loop.

Two bugs of the stock ``draft_model`` path are fixed here (see docs/vllm-integration-notes.md):

1. M-RoPE targets (Qwen2.5-VL). The runner hands the proposer the target's (3, N) M-RoPE
   positions; ``copy_and_expand_eagle_inputs_kernel`` reads row 0 of them as the first position
   of each request. After an image, row 0 is ``token_index + mrope_position_delta`` (delta < 0),
   so every later prefill chunk and every decode step gets compressed positions, which drive the
   drafter's RoPE *and* its KV slot mapping (KV written to wrong slots). The fix feeds the
   runner's 1-D absolute positions (``runner.positions``, always filled) instead. This applies
   to every draft model of an M-RoPE target, the text-only baseline included.
2. Image mask layout. ``GPUModelRunner._gather_mm_embeddings`` builds ``is_mm_embed`` in the
   target's token layout (after the companion patch in gpu_model_runner.py; stock: shifted by
   one, EAGLE-style). The draft_model input layout puts request r's tokens at
   ``query_start[r] + r`` (each request gains one bonus slot), so the mask is re-laid out on the
   CPU (no device sync) before the drafter's ``embed_input_ids`` sees it. MASSV drafters only.

3. Drafter sliding windows (Gemma3). With the hybrid KV-cache manager off (needed for Gemma3
   drafters) the drafter's layers share one KV-cache group of per-layer specs, and
   ``initialize_attn_backend`` makes one attention-metadata group per *backend*, with the first
   draft layer's spec. FlashAttention takes the window from that metadata, not from the layer
   (vLLM 0.26; upstream fixed the backend in vllm-project/vllm#51756), so every drafter layer got
   one layer's window: Gemma3-1B's full layers attended to 512 tokens, or its sliding layers to
   all, once a sequence outgrew 512 tokens, unlike the drafter trained in transformers. The patch
   splits the groups by layer spec, as vLLM's Gemma4 proposer does. MASSV drafters only.

And for MASSV drafters, draft steps 2..γ run as full CUDA graphs (``MASSV_FAST_DRAFT``,
patches/_draft_loop.py). Switches and scopes: patches/envs.py.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("vllm.massv_vllm.patches")


def to_draft_layout(
    is_mm_embed: torch.Tensor, query_start_loc_cpu: torch.Tensor, extra_slots_per_request: int
) -> torch.Tensor:
    """Map a target-layout mask [N] to the draft_model layout [N + B * extra_slots].

    Target token i of request r sits at draft index ``i + r * extra_slots``: each request's
    valid tokens are copied in order and its extra (bonus) slots follow them. Image tokens are
    always valid tokens (rejected draft tokens are never image placeholders).
    """
    num_reqs = query_start_loc_cpu.numel() - 1
    lens = (query_start_loc_cpu[1:] - query_start_loc_cpu[:-1]).to(torch.int64)
    n = int(query_start_loc_cpu[-1])
    if is_mm_embed.numel() != n:
        raise ValueError(f"multimodal mask has {is_mm_embed.numel()} entries for {n} target tokens")
    req_of_token = torch.repeat_interleave(torch.arange(num_reqs), lens, output_size=n)
    out = torch.zeros(n + num_reqs * extra_slots_per_request, dtype=torch.bool)
    out[torch.arange(n) + req_of_token * extra_slots_per_request] = is_mm_embed
    return out.pin_memory() if is_mm_embed.is_pinned() else out


def split_by_layer_spec(groups: list, layer_specs: dict, make_group) -> list:
    """Attention groups with one KV-cache spec each: the layers of each group in ``groups`` whose
    spec (``layer_specs[name]``) differs from the group's own go to new groups,
    ``make_group(group, spec, names)``, in order of first appearance."""
    out = []
    for group in groups:
        by_spec: dict = {}
        for name in group.layer_names:
            by_spec.setdefault(layer_specs[name], []).append(name)
        for spec, names in by_spec.items():
            if spec == group.kv_cache_spec:
                group.layer_names = names
                out.append(group)
            else:
                out.append(make_group(group, spec, names))
    return out


VLLM_MODULE = "vllm.v1.spec_decode.draft_model"  # applied when this vLLM module is imported
SWITCHES = (
    "MASSV_PATCH_DRAFT_POSITIONS",
    "MASSV_PATCH_DRAFT_IMAGES",
    "MASSV_PATCH_DRAFT_WINDOWS",
    "MASSV_FAST_DRAFT",
)
PROPOSE_PARAMS = (
    "self",
    "num_speculative_tokens",
    "target_token_ids",
    "target_positions",
    "target_hidden_states",
    "next_token_ids",
    "token_indices_to_sample",
    "common_attn_metadata",
    "sampling_metadata",
    "mm_embed_inputs",
    "num_rejected_tokens_gpu",
    "slot_mappings",
)


def fast_propose(self, loop, kw: dict, fast_first_pass: bool) -> torch.Tensor:
    """vLLM's ``propose`` for a draft model, with steps 2..γ run by ``loop`` (patches/_draft_loop.py).

    The first pass is vLLM's own code, method for method (llm_base_proposer.propose, vLLM 0.26.0);
    with ``fast_first_pass`` (``MASSV_FAST_DRAFT_FIRST_PASS``, decode-shaped batches) its forward
    runs in ``loop`` too. With parallel drafting the first pass is the whole proposal, and this is
    called only with ``fast_first_pass``."""
    from vllm.forward_context import set_forward_context

    cad = kw["common_attn_metadata"]
    num_rejected = kw["num_rejected_tokens_gpu"]
    batch_size = cad.batch_size()
    self.num_speculative_tokens = kw["num_speculative_tokens"]
    self._last_draft_probs = None
    num_tokens, token_indices_to_sample, cad = self.set_inputs_first_pass(
        target_token_ids=kw["target_token_ids"],
        next_token_ids=kw["next_token_ids"],
        target_positions=kw["target_positions"],
        target_hidden_states=kw["target_hidden_states"],
        token_indices_to_sample=kw["token_indices_to_sample"],
        cad=cad,
        num_rejected_tokens_gpu=num_rejected,
    )
    if fast_first_pass:
        # decode-shaped in (b·(γ+1) tokens), so vLLM's layout has γ+1+e slots per request
        assert num_tokens == batch_size * loop.fp_q, (num_tokens, batch_size, loop.fp_q)
        first, positions = loop.first_pass(cad, token_indices_to_sample)
        if loop.parallel:
            return first.view(-1, self.num_speculative_tokens)
    else:
        _, per_layer = self.build_per_group_and_layer_attn_metadata(cad)
        mode, num_input_tokens, across_dp = self._determine_batch_execution_and_padding(num_tokens)
        model_kwargs, slot_mapping_size = self.build_model_inputs_first_pass(
            num_tokens, num_input_tokens, kw["mm_embed_inputs"]
        )
        with set_forward_context(
            per_layer,
            self.vllm_config,
            num_tokens=num_input_tokens,
            num_tokens_across_dp=across_dp,
            cudagraph_runtime_mode=mode,
            slot_mapping=self._get_slot_mapping(slot_mapping_size, cad.slot_mapping),
        ):
            hidden_states = self.model(**model_kwargs)
        first = self._greedy_sample(hidden_states[token_indices_to_sample])
        positions = self.positions[token_indices_to_sample]
    seq_lens = cad.seq_lens if num_rejected is None else cad.seq_lens - num_rejected
    return loop.draft(
        first, positions, seq_lens, cad.block_table_tensor, cad.max_seq_len, self.num_speculative_tokens
    )


def apply() -> None:
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs
    from vllm.v1.spec_decode.draft_model import DraftModelProposer
    from vllm.v1.worker.utils import AttentionGroup

    from massv_vllm.patches import bind, is_massv_engine, replace_method
    from massv_vllm.patches._draft_loop import DraftDecodeLoop
    from massv_vllm.patches.envs import switch

    fix_positions = switch("MASSV_PATCH_DRAFT_POSITIONS").enabled()
    pass_images = switch("MASSV_PATCH_DRAFT_IMAGES").enabled()
    fast_draft = switch("MASSV_FAST_DRAFT").enabled()
    draft_windows = switch("MASSV_PATCH_DRAFT_WINDOWS").enabled()

    def make_init(original):
        def __init__(self, vllm_config, device, runner=None):
            original(self, vllm_config, device, runner)
            self._massv = is_massv_engine(vllm_config)
            # The base class does not keep the runner; the position fix needs its buffers.
            self._massv_runner = runner
            # Scope: any draft model of an M-RoPE target (the text-only baseline needs it too).
            self._massv_fix_positions = bool(
                fix_positions and vllm_config.model_config.uses_mrope and not self.uses_mrope
            )
            self._massv_images = pass_images and self._massv
            self._massv_loop = None  # set by load_model
            if self._massv_fix_positions and runner is None:
                raise RuntimeError("massv-vllm: DraftModelProposer needs the runner for M-RoPE targets")

        return __init__

    def make_load_model(original):
        def load_model(self, target_model):
            original(self, target_model)
            if fast_draft and self._massv:
                self._massv_loop = DraftDecodeLoop(self)

        return load_model

    def make_propose(original):
        def propose(self, *args, **kwargs):
            kw = bind(original, self, *args, **kwargs)
            del kw["self"]
            if self._massv_fix_positions:
                n = kw["target_token_ids"].shape[0]
                kw["target_positions"] = self._massv_runner.positions[:n]
            mm = kw["mm_embed_inputs"]
            if self._massv_images and mm is not None and len(mm[0]) > 0:
                cad = kw["common_attn_metadata"]
                mask = to_draft_layout(mm[1], cad.query_start_loc_cpu, self.extra_slots_per_request)
                kw["mm_embed_inputs"] = (mm[0], mask)
            loop = self._massv_loop
            batch_size = kw["common_attn_metadata"].batch_size()
            if loop is not None and loop.handles(
                kw["num_speculative_tokens"], batch_size, kw["sampling_metadata"]
            ):
                first = loop.handles_first_pass(
                    kw["common_attn_metadata"], kw["mm_embed_inputs"], kw["num_speculative_tokens"]
                )
                # parallel drafting: one pass, MASSV's graph or vLLM's own
                if first or not self.parallel_drafting:
                    return fast_propose(self, loop, kw, first)
            return original(self, **kw)

        return propose

    def make_warn(original):
        def _warn_if_multimodal(self):
            if not is_massv_engine(self.vllm_config):
                return original(self)
            # Stock text says "Proceeding with text-only speculative decoding", which is not true
            # for MASSV drafters: images reach them.
            if self.supports_mm_inputs:
                logger.info(
                    "massv-vllm: MASSV drafter with a multimodal target; the target's image "
                    "embeddings are passed to the drafter"
                )

        return _warn_if_multimodal

    def make_init_attn(original):
        def initialize_attn_backend(self, kv_cache_config, kernel_block_sizes=None):
            original(self, kv_cache_config, kernel_block_sizes)
            group_spec = kv_cache_config.kv_cache_groups[self.kv_cache_gid].kv_cache_spec
            if not (draft_windows and self._massv and isinstance(group_spec, UniformTypeKVCacheSpecs)):
                return
            block = None
            if kernel_block_sizes is not None and self.kv_cache_gid < len(kernel_block_sizes):
                block = kernel_block_sizes[self.kv_cache_gid]

            def make_group(like, spec, names):
                group = AttentionGroup(
                    backend=like.backend,
                    layer_names=names,
                    kv_cache_spec=spec,
                    kv_cache_group_id=like.kv_cache_group_id,
                )
                group.create_metadata_builders(self.vllm_config, self.device, kernel_block_size=block)
                return group

            self.draft_attn_groups = split_by_layer_spec(
                self.draft_attn_groups, group_spec.kv_cache_specs, make_group
            )

        return initialize_attn_backend

    replace_method(
        DraftModelProposer, "__init__", make_init, expect=("self", "vllm_config", "device", "runner")
    )
    replace_method(
        DraftModelProposer,
        "initialize_attn_backend",
        make_init_attn,
        expect=("self", "kv_cache_config", "kernel_block_sizes"),
    )
    replace_method(DraftModelProposer, "load_model", make_load_model, expect=("self", "target_model"))
    replace_method(DraftModelProposer, "propose", make_propose, expect=PROPOSE_PARAMS)
    replace_method(DraftModelProposer, "_warn_if_multimodal", make_warn, expect=("self",))
