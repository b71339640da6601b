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
MASSV drafters only.

It also captures the MASSV draft decode graphs (patches/_draft_loop.py) during vLLM's own CUDA
graph capture.
"""

from __future__ import annotations

VLLM_MODULE = "vllm.v1.worker.gpu_model_runner"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_DRAFT_IMAGES", "MASSV_FAST_DRAFT")


def apply() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from massv_vllm.patches import replace_method
    from massv_vllm.patches.envs import switch

    def make_gather(original):
        def _gather_mm_embeddings(self, scheduler_output, shift_computed_tokens=0):
            if shift_computed_tokens == 1 and getattr(getattr(self, "drafter", None), "_massv_images", False):
                shift_computed_tokens = 0
            return original(self, scheduler_output, shift_computed_tokens)

        return _gather_mm_embeddings

    def make_capture(original):
        def _capture_cudagraphs(self, batch_descriptors, cudagraph_runtime_mode, profiler=None):
            result = original(self, batch_descriptors, cudagraph_runtime_mode, profiler)
            # Inside vLLM's capture phase (gc frozen, graph stream, capture allowed): the first
            # call also captures the MASSV draft decode graphs, once.
            loop = getattr(getattr(self, "drafter", None), "_massv_loop", None)
            if loop is not None and loop.use_graphs and not loop.captured:
                drafter = self.drafter
                table = self.input_batch.block_table[drafter.kv_cache_gid]
                loop.capture(table.get_device_tensor(self.input_batch.max_num_reqs))
            return result

        return _capture_cudagraphs

    if switch("MASSV_PATCH_DRAFT_IMAGES").enabled():
        replace_method(
            GPUModelRunner,
            "_gather_mm_embeddings",
            make_gather,
            expect=("self", "scheduler_output", "shift_computed_tokens"),
        )
    if switch("MASSV_FAST_DRAFT").enabled():
        replace_method(
            GPUModelRunner,
            "_capture_cudagraphs",
            make_capture,
            expect=("self", "batch_descriptors", "cudagraph_runtime_mode", "profiler"),
        )
