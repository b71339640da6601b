"""CPUModelRunner (vllm/v1/worker/cpu_model_runner.py, vLLM 0.26.0): speculative sampling on CPU.

Without Triton, ``_postprocess_triton`` swaps the rejection sampler's Triton kernels for C++
ones. Its ``expand_kernel`` (used by ``expand_batch_to_tokens`` to spread per-request
temperature, top-k and top-p over draft tokens) converts ``output`` and ``input`` to int64 and
never copies the result back: for the float32 temperatures (and int32 top-k) the expanded tensor
is left *uninitialised* (``new_empty``), and a value like 0.8 would be truncated to 0 anyway.
Whenever a batch holds a non-greedy request, every draft-token logit row, greedy rows included,
is divided by garbage, so speculative decoding on CPU changed greedy outputs (seen in
benchmarks/load.py: 17 of 19 greedy answers differed once 10% of the requests were sampled) and
sampled with wrong temperatures. The patch installs a dtype-preserving torch implementation
after the stock swap. GPU runs (Triton) never use this code.

Second, seeded requests (``SamplingParams(seed=...)``) whose prompt is prefilled in several chunks
killed the CPU engine ("CPU Generator does not use offset"): after a partial-prefill step,
``_bookkeeping_sync`` rewinds the request's generator with ``set_offset``, which only CUDA (Philox)
generators have. On CPU the patch skips that rewind (the generators of discarded rows are set
aside for the call): such a request then draws a little further into its seeded stream, so its
samples are still correct draws, only not identical to an unchunked run with the same seed.
"""

from __future__ import annotations

import torch

from massv_vllm.patches import is_massv_engine, replace_method
from massv_vllm.patches.envs import switch


def expand_kernel_impl(
    output: torch.Tensor,
    input_val: torch.Tensor,
    cu_num_tokens: torch.Tensor,
    replace_from: float,
    replace_to: float,
    MAX_NUM_TOKENS: int | None = None,  # the Triton kernel's keyword; unused
) -> None:
    """``output[cu[i-1]:cu[i]] = input_val[i]`` (``replace_from`` -> ``replace_to``), in output's dtype."""
    cu = cu_num_tokens.to(torch.int64)
    n = int(cu[-1]) if cu.numel() else 0
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    values = input_val.masked_fill(input_val == replace_from, replace_to)
    output[:n] = torch.repeat_interleave(values, counts, output_size=n).to(output.dtype)


VLLM_MODULE = "vllm.v1.worker.cpu_model_runner"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_CPU_REJECTION_SAMPLER", "MASSV_PATCH_CPU_SEEDED_CHUNKS")


def apply() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return  # the broken fallback is installed by the CPU runner only
    import vllm.utils.cpu_triton_utils as cpu_tl
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    def make(original):
        def _postprocess_triton(self):
            original(self)
            if not (
                switch(SWITCHES[0]).enabled()
                and (is_massv_engine(self.vllm_config) or switch(SWITCHES[0]).always())
            ):
                return
            import vllm.v1.sample.rejection_sampler as rejection_sampler

            # Only where the stock C++ fallback was installed (not with a Triton-CPU backend).
            if rejection_sampler.expand_kernel is cpu_tl.expand_kernel:
                rejection_sampler.expand_kernel = cpu_tl._FuncWrapper(expand_kernel_impl)

        return _postprocess_triton

    replace_method(CPUModelRunner, "_postprocess_triton", make, expect=("self",))

    def make_bookkeeping(original):
        def _bookkeeping_sync(self, *args, **kwargs):
            sw = switch(SWITCHES[1])
            if not (sw.enabled() and (is_massv_engine(self.vllm_config) or sw.always())):
                return original(self, *args, **kwargs)
            gens = self.input_batch.generators
            discarded = self.discard_request_mask.np[: self.input_batch.num_reqs].nonzero()[0]
            aside = {int(i): gens.pop(int(i)) for i in discarded if int(i) in gens}
            try:
                return original(self, *args, **kwargs)
            finally:
                gens.update(aside)

        return _bookkeeping_sync

    replace_method(
        CPUModelRunner,
        "_bookkeeping_sync",
        make_bookkeeping,
        expect=(
            "self",
            "scheduler_output",
            "sampler_output",
            "logits",
            "hidden_states",
            "num_scheduled_tokens",
        ),
    )
