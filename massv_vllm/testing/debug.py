"""Look inside a running MASSV drafter: what it receives and what it proposes.

Pass ``worker_extension_cls="massv_vllm.testing.debug.DrafterProbe"`` to ``LLM(...)``, then::

    llm.collective_rpc("massv_probe_start")
    llm.generate(...)
    rec = llm.collective_rpc("massv_probe_records")[0]

``rec["projector_inputs"]``: the image embeddings the drafter's projector received, one entry per
call (shape + values), i.e. the target's own encoder outputs as vLLM hands them over.
``rec["image_slots"]``: per call with images, the token ids under the image mask in the draft
layout (must be only the image placeholder), the number of masked slots and of embedding rows.
``rec["drafts"]``: every proposal as {request id: draft token ids}. ``rec["positions"]``: the
positions of every drafter forward (first pass and later steps). ``rec["steps"]``: per
proposal, the batch's request ids, query_start_loc, computed tokens and image embeddings passed. Used by the tests and handy
when debugging acceptance; it costs host syncs, so never leave it on in production.
"""

from __future__ import annotations

from typing import Any


def _unwrap(model: Any) -> Any:
    return model.unwrap() if hasattr(model, "unwrap") else model


class DrafterProbe:
    """vLLM worker extension (mixed into the worker class by vLLM)."""

    def massv_probe_start(self) -> bool:
        runner = self.model_runner
        drafter = getattr(runner, "drafter", None)
        if drafter is None:
            raise RuntimeError("no drafter in this engine (speculative decoding is off)")
        rec = {"projector_inputs": [], "drafts": [], "positions": [], "steps": [], "image_slots": []}
        runner._massv_probe = rec
        if getattr(drafter, "_massv_probe_installed", False):
            return True
        model = _unwrap(drafter.model)
        if getattr(model, "projector", None) is not None:
            model.projector.register_forward_hook(
                lambda mod, inp, out: runner._massv_probe["projector_inputs"].append(
                    {"shape": list(inp[0].shape), "values": inp[0].float().flatten().cpu().tolist()}
                )
            )
        orig_embed = model.embed_input_ids

        def embed_input_ids(input_ids, *args, **kwargs):
            mm = kwargs.get("multimodal_embeddings", args[0] if args else None)
            mask = kwargs.get("is_multimodal")
            if mm and mask is not None:
                # Where the image rows land in the draft layout: the token ids under the mask must
                # all be the image placeholder, and there must be one slot per embedding row.
                ids = input_ids.flatten()[: mask.numel()].cpu()
                runner._massv_probe["image_slots"].append(
                    {
                        "slot_tokens": sorted(set(ids[mask.cpu()].tolist())),
                        "slots": int(mask.sum()),
                        "rows": int(sum(e.reshape(-1, e.shape[-1]).shape[0] for e in mm)),
                    }
                )
            return orig_embed(input_ids, *args, **kwargs)

        model.embed_input_ids = embed_input_ids
        orig_forward = model.forward

        def forward(*args, **kwargs):
            pos = kwargs.get("positions", args[1] if len(args) > 1 else None)
            if pos is not None:
                runner._massv_probe["positions"].append(pos.flatten().cpu().tolist())
            return orig_forward(*args, **kwargs)

        model.forward = forward
        orig_propose = drafter.propose

        def propose(*args, **kwargs):
            out = orig_propose(*args, **kwargs)
            ids = list(runner.input_batch.req_ids)
            mm = kwargs.get("mm_embed_inputs")
            cad = kwargs.get("common_attn_metadata")
            runner._massv_probe["drafts"].append(dict(zip(ids, out.cpu().tolist())))
            runner._massv_probe["steps"].append(
                {
                    "req_ids": ids,
                    "query_start_loc": cad.query_start_loc_cpu.tolist() if cad is not None else None,
                    "num_mm_embeds": int(sum(e.shape[0] for e in mm[0])) if mm else 0,
                    "mm_mask_true": int(mm[1].sum()) if mm else 0,
                    "num_computed": [int(runner.requests[r].num_computed_tokens) for r in ids],
                }
            )
            return out

        drafter.propose = propose
        drafter._massv_probe_installed = True
        return True

    def massv_fast_loop_calls(self) -> dict[str, int] | None:
        """Proposals made by MASSV's own draft loop (patches/_draft_loop.py): ``all``,
        ``first_pass`` (those whose first pass ran there too) and ``one_graph`` (those whose steps
        2..γ took the one-graph step update); None: not set up."""
        loop = getattr(getattr(self.model_runner, "drafter", None), "_massv_loop", None)
        if loop is None:
            return None
        return {"all": loop.calls, "first_pass": loop.first_pass_calls, "one_graph": loop.one_graph_calls}

    def massv_draft_attention_windows(self) -> list[tuple[Any, list[Any]]]:
        """Each drafter attention-metadata group: the sliding window its metadata builder applies
        (its KV-cache spec's; None: full attention) and the windows its layers were built with
        (``Attention.sliding_window``), sorted."""
        from vllm.config import get_layers_from_vllm_config
        from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

        drafter = getattr(self.model_runner, "drafter", None)
        groups = getattr(drafter, "draft_attn_groups", None) or []
        layers = get_layers_from_vllm_config(
            self.model_runner.vllm_config, AttentionLayerBase, [n for g in groups for n in g.layer_names]
        )
        out = []
        for g in groups:
            spec = g.get_metadata_builder().kv_cache_spec
            out.append(
                (getattr(spec, "sliding_window", None), [layers[n].sliding_window for n in g.layer_names])
            )
        return sorted(out, key=repr)

    def massv_probe_records(self) -> dict[str, Any]:
        return getattr(self.model_runner, "_massv_probe", None) or {}
