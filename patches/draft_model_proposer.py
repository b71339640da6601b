"""DraftModelProposer (vllm/v1/spec_decode/draft_model.py, vLLM 0.26.0): positions and image mask.

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
   CPU (no device sync) before the drafter's ``embed_input_ids`` sees it.
"""

from __future__ import annotations

import logging

import torch

from massv_vllm.patches import replace_method

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


VLLM_MODULE = "vllm.v1.spec_decode.draft_model"  # applied when this vLLM module is imported


def apply() -> None:
    from vllm.v1.spec_decode.draft_model import DraftModelProposer

    def make_init(original):
        def __init__(self, vllm_config, device, runner=None):
            original(self, vllm_config, device, runner)
            # The base class does not keep the runner; the position fix needs its buffers.
            self._massv_runner = runner
            self._massv_fix_positions = bool(vllm_config.model_config.uses_mrope and not self.uses_mrope)
            if self._massv_fix_positions and runner is None:
                raise RuntimeError("massv-vllm: DraftModelProposer needs the runner for M-RoPE targets")

        return __init__

    def make_propose(original):
        def propose(self, *args, **kwargs):
            if args:  # the runner passes keywords; accept positional calls too
                names = (
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
                kwargs.update(zip(names, args))
            if self._massv_fix_positions:
                n = kwargs["target_token_ids"].shape[0]
                kwargs["target_positions"] = self._massv_runner.positions[:n]
            mm = kwargs.get("mm_embed_inputs")
            if mm is not None and len(mm[0]) > 0:
                kwargs["mm_embed_inputs"] = (
                    mm[0],
                    to_draft_layout(
                        mm[1],
                        kwargs["common_attn_metadata"].query_start_loc_cpu,
                        self.extra_slots_per_request,
                    ),
                )
            return original(self, **kwargs)

        return propose

    def make_warn(original):
        def _warn_if_multimodal(self):
            # Stock text says "Proceeding with text-only speculative decoding", which is no longer
            # true: images reach drafters that accept them.
            if self.supports_mm_inputs:
                logger.info(
                    "massv-vllm: draft model with a multimodal target; image embeddings are "
                    "passed to drafters that accept them (MASSV)"
                )

        return _warn_if_multimodal

    replace_method(DraftModelProposer, "__init__", make_init)
    replace_method(DraftModelProposer, "propose", make_propose)
    replace_method(DraftModelProposer, "_warn_if_multimodal", make_warn)
