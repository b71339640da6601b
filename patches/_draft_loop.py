"""The fast MASSV draft loop (``MASSV_FAST_DRAFT``), used by the draft_model_proposer patch.

vLLM 0.26's ``draft_model`` proposer runs each of the γ-1 draft *decode* steps (one token per
request) as a PIECEWISE CUDA graph: every drafter layer's attention is launched from Python, and
the attention metadata is rebuilt in Python per step (``llm_base_proposer.py``,
``initialize_cudagraph_keys`` allows PIECEWISE only). At Qwen2.5-1.5B shapes that host work is
several times the GPU work of the step.

This loop runs the same steps with the same arithmetic, but each step's whole forward
(embedding, drafter, logits, argmax) is one *full* CUDA graph, replayed per step, the way
vLLM's Model Runner V2 runs EAGLE draft steps. What a full graph needs, and how it is met:

* every tensor the graph reads lives at a fixed address: the proposer's own ``input_ids``,
  ``positions``, ``inputs_embeds`` and slot-mapping buffers, plus this loop's ``seq_lens``,
  ``query_start_loc`` and ``block_table`` copies (vLLM's per-step ``seq_lens`` is a fresh
  tensor);
* the attention metadata is built per step, outside the graph, by the drafter's own builder
  with the same call as at capture and as vLLM's own draft steps (``build_for_drafting``): no
  ahead-of-time FlashAttention-3 schedule (that builder knows the target's heads, not the
  drafter's), a fixed split count for graph-sized batches, sequence lengths read on the device;
  the graph is captured with ``max_seq_len = max_model_len`` so its launch shape covers any
  length;
* a batch of B requests replays the graph captured for the smallest size n >= B (sizes 1, 2, 4,
  then multiples of 8 up to ``max_num_seqs``); the n - B padded requests have empty queries,
  zero sequence length and padding KV slots.

Positions, KV slots and sequence lengths advance with vLLM's own kernel
(``eagle_step_update_slot_mapping_and_metadata``), exactly as in the stock loop. The first draft
step (the target's verified tokens plus the bonus token) is laid out by vLLM's own code; its
forward runs as a full graph too (``MASSV_FAST_DRAFT_FIRST_PASS``, on by default: faster on an
H200 with and without async scheduling, both drafting modes) when the batch is decode-shaped (γ+1
verified tokens per request, no image in the window); otherwise vLLM runs it. vLLM's
``set_inputs_first_pass`` still lays out inputs, positions and KV slots (γ+1 + e slots per
request: e = 1 bonus slot, or with parallel drafting the bonus slot and γ-1 mask slots, e = γ), the
graph runs the drafter over n·(γ+1+e) slots and samples at the e new slots of each request. With
parallel drafting that one pass is the whole proposal.

With ``MASSV_FAST_DRAFT_ONE_GRAPH=1`` (off: 0.8-1.6 % slower than one graph per step on an H200,
2026-12-01, ``docs/fast-drafting.md``) steps 2..γ are one graph per proposal
instead of one per step: the attention metadata of a decode step are views of the loop's buffers
(FlashAttention with ``fast_build``, Triton attention), so they are built once, and the step update
is vLLM's kernel rewritten in torch ops that read the real batch size from the device
(``num_valid``): vLLM's kernel takes it as a launch argument, which a graph would freeze. Eagerly
(CPU) the metadata are rebuilt per step, since vLLM's CPU builder plans from the lengths.

On a machine without CUDA graphs (vLLM's CPU backend, ``enforce_eager``) the loop runs the same
steps eagerly, so the CPU engine tests cover its arithmetic. Cases it does not handle (sampled
drafts, data parallelism, more requests than the largest capture size; with parallel drafting,
anything but a decode-shaped first pass with the switch on) go to vLLM's own ``propose``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

logger = logging.getLogger("vllm.massv_vllm.patches")


class DraftDecodeLoop:
    """Draft steps 2..γ of a MASSV drafter (see the module docstring)."""

    def __init__(self, proposer: Any) -> None:
        from vllm.config import CUDAGraphMode
        from vllm.platforms import current_platform

        self.p = proposer
        cfg = proposer.vllm_config
        cc = cfg.compilation_config
        self.max_reqs = proposer.max_batch_size
        self.use_graphs = bool(
            current_platform.is_cuda_alike()
            and cc.cudagraph_mode.has_full_cudagraphs()
            and not cfg.model_config.enforce_eager
            and not proposer.speculative_config.enforce_eager
        )
        # Request counts to capture, vLLM's default pattern (1, 2, 4, then multiples of 8) up to
        # max_num_seqs. Not the target's capture sizes: a spec-decode engine rounds those to
        # multiples of γ + 1 tokens, while a draft step has one token per request.
        top = min(self.max_reqs, cc.max_cudagraph_capture_size or self.max_reqs)
        self.sizes = sorted({s for s in (1, 2, 4, *range(8, top + 1, 8), top) if s <= top})
        dev = proposer.device
        self.seq_lens = torch.zeros(self.max_reqs, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.zeros(self.max_reqs + 1, dtype=torch.int32, device=dev)
        self.tokens = torch.zeros(self.max_reqs, dtype=torch.int64, device=dev)
        self.block_table: torch.Tensor | None = None  # allocated at capture (needs the KV layout)
        self.fp_sizes: set[int] = set()  # request counts with a captured first-pass graph
        self.arange_np = np.arange(self.max_reqs + 1, dtype=np.int32)
        self.captured = False
        self.calls = 0  # proposals made (tests check that this loop, not vLLM's, drafted)
        self.first_pass_calls = 0  # of which the first pass ran here too
        # The first draft pass of a decode step (γ+1 verified tokens + 1 bonus slot per request)
        # as one full graph as well (MASSV_FAST_DRAFT_FIRST_PASS; 0 leaves that pass to vLLM).
        from massv_vllm.patches.envs import switch

        self.first_pass_graphs = switch("MASSV_FAST_DRAFT_FIRST_PASS").enabled()
        # Steps 2..γ as one graph (MASSV_FAST_DRAFT_ONE_GRAPH, off: slower when measured): the step
        # update reads the batch size from the device (``num_valid``), so one capture serves any
        # batch <= n.
        self.one_graph = switch("MASSV_FAST_DRAFT_ONE_GRAPH").enabled()
        self.one_graph_calls = 0  # proposals whose steps 2..γ ran that way
        self.gamma = proposer.num_speculative_tokens
        self.parallel = bool(proposer.parallel_drafting)
        # New slots per request in the first pass, each one sampled: the bonus token's, plus γ-1
        # mask tokens' with parallel drafting (vLLM's extra_slots_per_request; a draft model
        # passes no hidden states, so all of them are new). Slots per request: γ+1 verified + these.
        self.fp_new = proposer.extra_slots_per_request
        self.fp_q = self.gamma + 1 + self.fp_new
        self.fp_query_start_loc = torch.zeros(self.max_reqs + 1, dtype=torch.int32, device=dev)
        self.fp_seq_lens = torch.zeros(self.max_reqs, dtype=torch.int32, device=dev)
        self.fp_sample_index = torch.zeros(self.max_reqs * self.fp_new, dtype=torch.int64, device=dev)
        self.fp_tokens = torch.zeros(self.max_reqs * self.fp_new, dtype=torch.int64, device=dev)
        self.num_valid = torch.zeros(1, dtype=torch.int32, device=dev)
        self.req_index = torch.arange(self.max_reqs, dtype=torch.int32, device=dev)
        self.step_tokens = torch.zeros(self.max_reqs, max(self.gamma - 1, 1), dtype=torch.int64, device=dev)
        self.graph = self.fp_graph = self.steps_graph = None
        if self.use_graphs:
            from vllm.compilation.cuda_graph import CUDAGraphWrapper

            if self.one_graph and not self.parallel and self.gamma >= 2:
                self.steps_graph = CUDAGraphWrapper(self._steps_forward, cfg, CUDAGraphMode.FULL)
            else:
                self.graph = CUDAGraphWrapper(self._forward, cfg, CUDAGraphMode.FULL)
            if self.first_pass_graphs:
                self.fp_graph = CUDAGraphWrapper(self._first_pass_forward, cfg, CUDAGraphMode.FULL)

    # ---- eligibility ----------------------------------------------------------------------------

    def padded_size(self, batch_size: int) -> int | None:
        """Tokens the step runs with for ``batch_size`` requests (None: no graph that large)."""
        if not self.use_graphs:
            return batch_size
        for n in self.sizes:
            if n >= batch_size:
                return n
        return None

    def handles(self, num_speculative_tokens: int, batch_size: int, sampling_metadata: Any) -> bool:
        p = self.p
        if num_speculative_tokens < 2 or p.use_heterogeneous_vocab:
            return False
        if self.parallel and not self.first_pass_graphs:  # one pass: nothing left for this loop
            return False
        if p._enable_probabilistic_draft_probs and not sampling_metadata.all_greedy:
            return False
        if p.eplb_state is not None or p.vllm_config.parallel_config.data_parallel_size > 1:
            return False
        if p.constant_draft_positions or p.uses_mrope:
            return False
        # Before capture (vLLM's warm-up runs) and beyond the largest graph: vLLM's own loop.
        return not (self.use_graphs and (not self.captured or self.padded_size(batch_size) is None))

    # ---- the step -------------------------------------------------------------------------------

    def _forward(self, n: int) -> torch.Tensor:
        """One draft decode step over ``n`` (padded) tokens; captured as a full CUDA graph."""
        p = self.p
        ids = p.input_ids[:n]
        if p.supports_mm_inputs:
            # MASSV drafters embed in Python in the stock loop too (llm_base_proposer.propose).
            p.inputs_embeds[:n] = p.model.embed_input_ids(ids)
            hidden = p.model(input_ids=None, positions=p.positions[:n], inputs_embeds=p.inputs_embeds[:n])
        else:
            hidden = p.model(input_ids=ids, positions=p.positions[:n], inputs_embeds=None)
        tokens = p._greedy_sample(hidden)
        self.tokens[:n] = tokens
        ids.copy_(tokens)  # the next step's input (int32 buffer)
        return self.tokens[:n]

    def _step_update(self, n: int, table: torch.Tensor) -> None:
        """vLLM's ``eagle_step_slot_mapping_metadata_kernel`` over ``n`` (padded) requests, in torch
        ops, with the real batch size read from ``num_valid`` on the device instead of passed at
        launch (a graph would freeze it): requests ``>= num_valid`` only get the padding slot.
        Reads and advances ``positions[:n]``; advances ``seq_lens[:n]``; writes the slot mapping."""
        from vllm.v1.spec_decode.utils import PADDING_SLOT_ID

        p = self.p
        valid = self.req_index[:n] < self.num_valid
        new_position = p.positions[:n] + 1
        exceeds = new_position >= p.max_model_len
        clamped = torch.where(exceeds, 0, new_position)
        block_number = torch.clamp(clamped // p.block_size, max=table.shape[1] - 1)
        block_id = torch.gather(table[:n], 1, block_number.unsqueeze(1)).squeeze(1)
        slot = block_id.to(torch.int64) * p.block_size + clamped % p.block_size
        slot = torch.where(exceeds | ~valid, PADDING_SLOT_ID, slot)
        seq_len = torch.clamp(torch.where(exceeds, 1, self.seq_lens[:n] + 1), max=p.max_model_len)
        p._slot_mapping_buffer[:n] = slot
        p.positions[:n] = torch.where(valid, clamped, p.positions[:n])
        self.seq_lens[:n] = torch.where(valid, seq_len, self.seq_lens[:n])

    def _steps_forward(self, n: int) -> torch.Tensor:
        """Draft steps 2..γ over ``n`` (padded) requests, each a step update and a decode step;
        captured as one full graph (the attention metadata are views of the buffers the updates
        advance). Returns the γ-1 tokens of each request, [n, γ-1]."""
        assert self.block_table is not None
        for k in range(self.gamma - 1):
            self._step_update(n, self.block_table)
            self.step_tokens[:n, k] = self._forward(n)
        return self.step_tokens[:n]

    def _first_pass_forward(self, num_tokens: int) -> torch.Tensor:
        """The first draft pass over ``num_tokens`` = n·(γ+1+e) slots, sampling e tokens per
        request; captured as a full graph."""
        p = self.p
        k = num_tokens // self.fp_q * self.fp_new
        ids = p.input_ids[:num_tokens]
        if p.supports_mm_inputs:
            p.inputs_embeds[:num_tokens] = p.model.embed_input_ids(ids)
            hidden = p.model(
                input_ids=None, positions=p.positions[:num_tokens], inputs_embeds=p.inputs_embeds[:num_tokens]
            )
        else:
            hidden = p.model(input_ids=ids, positions=p.positions[:num_tokens], inputs_embeds=None)
        self.fp_tokens[:k] = p._greedy_sample(hidden[self.fp_sample_index[:k]])
        return self.fp_tokens[:k]

    def _attn_metadata(
        self,
        n: int,
        batch_size: int,
        max_seq_len: int,
        block_table: torch.Tensor,
        query_len: int = 1,
        query_start_loc: torch.Tensor | None = None,
        seq_lens: torch.Tensor | None = None,
    ):
        """Attention metadata of a uniform step: ``n`` (padded) requests of ``query_len`` tokens,
        the ``n - batch_size`` padded ones empty."""
        from vllm.v1.attention.backend import CommonAttentionMetadata

        p = self.p
        qsl_cpu = torch.from_numpy(np.minimum(self.arange_np[: n + 1], batch_size) * query_len)
        cad = CommonAttentionMetadata(
            query_start_loc=(self.query_start_loc if query_start_loc is None else query_start_loc)[: n + 1],
            query_start_loc_cpu=qsl_cpu,
            seq_lens=(self.seq_lens if seq_lens is None else seq_lens)[:n],
            num_reqs=n,
            num_actual_tokens=n * query_len,
            max_query_len=query_len,
            max_seq_len=max_seq_len,
            block_table_tensor=block_table[:n],
            slot_mapping=p._slot_mapping_buffer[: n * query_len],
        )
        per_layer = {}
        for group in p.draft_attn_groups:
            # vLLM's own draft-step call. Not build(fast_build=False): the drafter's builder holds
            # the *target's* head counts and head size, so FlashAttention-3's ahead-of-time
            # scheduler metadata would be laid out for the target's heads ("scheduler_metadata must
            # have shape (metadata_size)" with Qwen2.5-0.5B's 64-wide heads on the H200). Without it
            # FA3 schedules inside the kernel call, which a full graph captures and replays.
            md = group.get_metadata_builder().build_for_drafting(common_attn_metadata=cad, draft_index=1)
            for name in group.layer_names:
                per_layer[name] = md
        return per_layer

    def _run(
        self, n: int, per_layer: dict[str, Any], capture: bool = False, first_pass: bool = False
    ) -> torch.Tensor:
        """One step over ``n`` requests: the decode step (one token each) or the first pass (γ+1+e
        slots each); graph replay (capture) on CUDA, eager elsewhere."""
        tokens = n * self.fp_q if first_pass else n
        graph, fn = (self.fp_graph, self._first_pass_forward) if first_pass else (self.graph, self._forward)
        full = graph is not None and (capture or self.captured)
        with self._context(per_layer, n, tokens, full):
            return graph(tokens) if graph is not None else fn(tokens)

    def _context(self, per_layer: dict[str, Any], n: int, tokens: int, full: bool):
        """vLLM's forward context for one uniform step (full-graph replay/capture or eager)."""
        from vllm.config import CUDAGraphMode
        from vllm.forward_context import BatchDescriptor, set_forward_context

        return set_forward_context(
            per_layer,
            self.p.vllm_config,
            num_tokens=tokens,
            cudagraph_runtime_mode=CUDAGraphMode.FULL if full else CUDAGraphMode.NONE,
            batch_descriptor=BatchDescriptor(num_tokens=tokens, num_reqs=n, uniform=True),
            slot_mapping=self.p._get_slot_mapping(tokens),
        )

    # ---- capture (GPU runner start-up) ----------------------------------------------------------

    @torch.inference_mode()
    def capture(self, device_block_table: torch.Tensor) -> None:
        """Capture one graph per size; called inside vLLM's own capture phase."""
        from vllm.v1.spec_decode.utils import PADDING_SLOT_ID

        p = self.p
        self.block_table = torch.zeros_like(device_block_table)
        for n in sorted(self.sizes, reverse=True):  # large first: smaller ones reuse the pool
            self.seq_lens[:n] = 1
            self.query_start_loc[: n + 1] = torch.arange(n + 1, dtype=torch.int32, device=p.device)
            p.positions[:n] = 0
            p.input_ids[:n] = 0
            p._slot_mapping_buffer[:n] = PADDING_SLOT_ID  # dummy steps write no KV
            if self.steps_graph is not None:
                self.num_valid.fill_(0)  # every request padding: the dummy steps write no KV
                per_layer = self._attn_metadata(n, n, p.max_model_len, self.block_table)
                with self._context(per_layer, n, n, full=False):
                    self._steps_forward(n)  # warm-up outside the graph
                with self._context(per_layer, n, n, full=True):
                    self.steps_graph(n)
            elif not self.parallel:  # parallel drafting has no decode steps after the first pass
                per_layer = self._attn_metadata(n, n, p.max_model_len, self.block_table)
                with self._context(per_layer, n, n, full=False):
                    self._forward(n)  # warm-up (lazy initialisation, autotuning) outside the graph
                self._run(n, per_layer, capture=True)
            if self.fp_graph is not None and n * self.fp_q <= p.max_num_tokens:
                self._capture_first_pass(n)
        self.captured = True
        logger.info(
            "massv-vllm: captured full CUDA graphs of the %s for sizes %s",
            "parallel draft pass" if self.parallel else "draft decode step",
            self.sizes,
        )

    def _capture_first_pass(self, n: int) -> None:
        from vllm.v1.spec_decode.utils import PADDING_SLOT_ID

        p = self.p
        q, e = self.fp_q, self.fp_new
        tokens = n * q
        arange = torch.arange(n + 1, dtype=torch.int32, device=p.device)
        self.fp_query_start_loc[: n + 1] = arange * q
        self.fp_seq_lens[:n] = q
        # the last e slots of each request (where vLLM puts the new ones)
        last = torch.arange(q - e, q, device=p.device)
        self.fp_sample_index[: n * e] = (arange[:n, None] * q + last).flatten()
        p.input_ids[:tokens] = 0
        p.positions[:tokens] = 0
        p._slot_mapping_buffer[:tokens] = PADDING_SLOT_ID
        per_layer = self._attn_metadata(
            n, n, p.max_model_len, self.block_table, q, self.fp_query_start_loc, self.fp_seq_lens
        )
        with self._context(per_layer, n, tokens, full=False):
            self._first_pass_forward(tokens)
        self._run(n, per_layer, capture=True, first_pass=True)
        self.fp_sizes.add(n)

    # ---- the first pass -------------------------------------------------------------------------

    def handles_first_pass(self, cad: Any, mm_embed_inputs: Any, num_speculative_tokens: int) -> bool:
        """A decode-shaped batch: every request has γ+1 verified tokens and no image in its window
        (``cad`` before vLLM's ``set_inputs_first_pass``)."""
        if not self.first_pass_graphs or num_speculative_tokens != self.gamma:
            return False
        if mm_embed_inputs is not None and len(mm_embed_inputs[0]) > 0:
            return False
        b = cad.batch_size()
        q = num_speculative_tokens + 1
        if cad.max_query_len != q or cad.num_actual_tokens != b * q:
            return False
        n = self.padded_size(b)
        return n is not None and (not self.use_graphs or n in self.fp_sizes)

    def first_pass(self, cad: Any, sample_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The first draft pass after vLLM's ``set_inputs_first_pass`` (which wrote input ids and
        positions and built ``cad`` for γ+1+e slots per request); returns (draft tokens [b·e],
        their positions, which only sequential drafting's later steps need)."""
        from vllm.v1.spec_decode.utils import PADDING_SLOT_ID

        p = self.p
        b = cad.batch_size()
        n = self.padded_size(b)
        assert n is not None
        q, e = self.fp_q, self.fp_new
        used, tokens = b * q, n * q
        torch.mul(torch.clamp(p.arange[: n + 1], max=b), q, out=self.fp_query_start_loc[: n + 1])
        self.fp_seq_lens[:b] = cad.seq_lens[:b]
        self.fp_seq_lens[b:n] = 0
        self.fp_sample_index[: b * e] = sample_index[: b * e]
        self.fp_sample_index[b * e : n * e] = 0
        p._slot_mapping_buffer[:used] = cad.slot_mapping[:used]
        p._slot_mapping_buffer[used:tokens] = PADDING_SLOT_ID
        if self.use_graphs:
            assert self.block_table is not None
            self.block_table[:b, : cad.block_table_tensor.shape[1]] = cad.block_table_tensor[:b]
            table = self.block_table
        else:
            table = cad.block_table_tensor
        per_layer = self._attn_metadata(
            n, b, cad.max_seq_len, table, q, self.fp_query_start_loc, self.fp_seq_lens
        )
        first = self._run(n, per_layer, first_pass=True)[: b * e].clone()
        self.first_pass_calls += 1
        return first, None if self.parallel else p.positions[sample_index]

    # ---- one speculative step -------------------------------------------------------------------

    def draft(
        self,
        first_tokens: torch.Tensor,
        positions: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        max_seq_len: int,
        num_speculative_tokens: int,
    ) -> torch.Tensor:
        """Draft tokens 2..γ after the first pass; returns all γ, [batch_size, γ].

        ``positions`` are the first draft token's positions, ``seq_lens`` the drafter's sequence
        lengths after the first pass with rejected tokens removed (as in the stock loop)."""
        from vllm.v1.spec_decode.utils import eagle_step_update_slot_mapping_and_metadata

        p = self.p
        b = first_tokens.shape[0]
        n = self.padded_size(b)
        assert n is not None
        self.calls += 1
        self.seq_lens[:b] = seq_lens[:b]
        if self.use_graphs:
            assert self.block_table is not None
            self.seq_lens[b:n] = 0
            self.block_table[:b, : block_table.shape[1]] = block_table[:b]
            torch.clamp(p.arange[: n + 1], max=b, out=self.query_start_loc[: n + 1])
            table = self.block_table
        else:
            self.query_start_loc[: n + 1] = p.arange[: n + 1]
            table = block_table
        p.input_ids[:b] = first_tokens
        # MASSV_FAST_DRAFT_ONE_GRAPH: the device-side step update; on CUDA all steps in one replay
        # on one set of attention metadata. Eagerly (CPU) the steps stay separate, since attention
        # builders there may plan from the lengths (vLLM's CPU builder does).
        one = self.one_graph and num_speculative_tokens == self.gamma
        if one:
            self.one_graph_calls += 1
            self.num_valid.fill_(b)
            p.positions[:b] = positions  # the step update advances them in place
            if self.steps_graph is not None and self.captured:
                with self._context(self._attn_metadata(n, b, max_seq_len, table), n, n, full=True):
                    steps = self.steps_graph(n)
                return torch.cat([first_tokens.unsqueeze(1), steps[:b]], dim=1)
        out = [first_tokens]
        pos = positions
        for _ in range(num_speculative_tokens - 1):
            if one:
                self._step_update(n, table)
            else:
                eagle_step_update_slot_mapping_and_metadata(
                    positions_1d=pos,
                    block_table_tensor=table[:b],
                    seq_lens=self.seq_lens[:b],
                    block_size=p.block_size,
                    max_model_len=p.max_model_len,
                    out_clamped_positions=p.positions[:b],
                    out_slot_mapping=p._slot_mapping_buffer[:n],
                    input_batch_size=n,
                )
                pos = p.positions[:b]
            max_seq_len = min(max_seq_len + 1, p.max_model_len)
            tokens = self._run(n, self._attn_metadata(n, b, max_seq_len, table))
            out.append(tokens[:b].clone())  # the buffer is overwritten by the next step
        return torch.stack(out, dim=1)
