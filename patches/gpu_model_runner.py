"""GPUModelRunner (vllm/v1/worker/gpu_model_runner.py, vLLM 0.26.0): which image embeddings
the draft model gets.

``propose_draft_token_ids`` gathers the drafter's image embeddings with
``shift_computed_tokens=1``, the EAGLE layout (draft token i is target token i+1). A draft model
reads the *same* tokens as the target, so the window must not be shifted: with shift 1 the first
token of every prefill chunk is never covered (a chunk starting inside an image leaves one image
position with the plain placeholder embedding in the drafter's KV cache), and the look-ahead may
reach an image that is not encoded yet. With shift 0 the window equals the target's own window,
every item in it is already in the encoder cache, and the mask is in target layout; the
draft_model_proposer patch maps it to the draft layout. (CPUModelRunner inherits this method.)
"""

from __future__ import annotations

from massv_vllm.patches import replace_method

VLLM_MODULE = "vllm.v1.worker.gpu_model_runner"  # applied when this vLLM module is imported


def apply() -> None:
    from vllm.v1.spec_decode.draft_model import DraftModelProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        def _gather_mm_embeddings(self, scheduler_output, shift_computed_tokens=0):
            if shift_computed_tokens == 1 and isinstance(getattr(self, "drafter", None), DraftModelProposer):
                shift_computed_tokens = 0
            return original(self, scheduler_output, shift_computed_tokens)

        return _gather_mm_embeddings

    replace_method(GPUModelRunner, "_gather_mm_embeddings", make)
