"""EngineArgs (vllm/engine/arg_utils.py, vLLM 0.26.0): the ``"method": "massv"`` spelling.

vLLM's ``SpeculativeConfig.method`` is a closed Literal; a new method would have to be threaded
through ~10 hard-coded ``"draft_model"`` sites. MASSV *is* a draft model, so the alias is resolved
where the user's dict enters the engine (``create_speculative_config``, process 0 only; engine-core
and worker processes receive the built config): the drafter/target pair is validated there, before
any model or GPU memory is touched, and ``"massv"`` becomes ``"draft_model"``. The same validation
runs for ``"draft_model"`` pointed at a MASSV folder.
"""

from __future__ import annotations

import logging
from typing import Any

from massv_vllm.patches import replace_method

logger = logging.getLogger("vllm.massv_vllm.patches")
METHOD = "massv"


def resolve_massv(args: Any, target_model_config: Any) -> None:
    """Validate a massv/draft_model speculative config on ``args`` and rewrite the alias in place."""
    from massv_vllm.patches.envs import set_massv_active
    from massv_vllm.serving.checks import check_pair
    from massv_vllm.serving.config import MassvConfigError, is_massv_folder

    spec = dict(args.speculative_config or {})
    method = spec.get("method", args.spec_method)
    model = spec.get("model", args.spec_model)
    massv = method == METHOD or (method == "draft_model" and bool(model) and is_massv_folder(model))
    # Engine processes started from here inherit the flag: the request-handling patches act in
    # MASSV servers only (patches/envs.py). A later non-MASSV engine in this process clears it.
    set_massv_active(massv)
    if not massv:
        return
    if not model:
        raise MassvConfigError(
            "speculative_config", '"method": "massv" needs "model": the path of a MASSV drafter folder'
        )
    info = check_pair(model, target_model_config.hf_config, target_model_config.tokenizer)
    if method == METHOD:
        if "method" in spec:
            spec["method"] = "draft_model"
            args.speculative_config = spec
        else:
            args.spec_method = "draft_model"
    _check_lengths(info, target_model_config)
    if spec.get("parallel_drafting"):
        _check_parallel_drafting(info, model)
    if info.massv.target.family == "gemma3" and args.disable_hybrid_kv_cache_manager is None:
        # The drafter's sliding-window and full-attention layers must share one KV-cache group
        # (llm_base_proposer.validate_same_kv_cache_group); the hybrid manager would split them.
        args.disable_hybrid_kv_cache_manager = True
        logger.info("massv-vllm: Gemma3 target -> disable_hybrid_kv_cache_manager=True")
    logger.info(startup_line(info, model, target_model_config.model, args))


def startup_line(info: Any, drafter: str, target: str, args: Any) -> str:
    """The one line a MASSV engine logs at start-up: what runs, with what, and which patches."""
    from massv_vllm.patches.envs import SWITCHES

    spec = args.speculative_config or {}
    gamma = spec.get("num_speculative_tokens", args.spec_tokens)
    proj = info.massv.projector
    if proj is None:
        projector = "none (text-only drafter)"
    else:
        dims = [proj.input_dim] + [proj.hidden_dim] * (proj.depth - 1) + [info.base_config.hidden_size]
        projector = "->".join(map(str, dims)) + f" ({proj.activation})"
    on = [env for env, sw in SWITCHES.items() if sw.enabled()]
    off = [env for env, sw in SWITCHES.items() if not sw.enabled()]
    return (
        f"massv-vllm: drafter {drafter} | target {target} | γ={gamma} | projector {projector} | "
        f"patches on: {', '.join(on) or 'none'}" + (f" | off: {', '.join(off)}" if off else "")
    )


PARALLEL_KEYS = ("pard_token", "ptd_token_id")  # where vLLM reads the mask id (llm_base_proposer)


def _check_parallel_drafting(info: Any, model: str) -> None:
    """``"parallel_drafting": true`` needs a drafter trained for it: its config.json names the mask
    token (training takes a padding row: ``families.parallel_mask_token_id``), which must be a
    vocabulary id and never the image token. Refused here, in the calling process, before any
    engine starts; vLLM's own check would fail later inside the worker."""
    from massv_vllm.serving.config import MassvConfigError

    cfg = info.base_config
    token = next((getattr(cfg, k) for k in PARALLEL_KEYS if getattr(cfg, k, None) is not None), None)
    if token is None:
        raise MassvConfigError(
            f"MASSV drafter {model}",
            '"parallel_drafting": true, but this drafter was not trained for parallel drafting '
            "(its config.json has no pard_token); train it with the parallel-drafting option or "
            "drop parallel_drafting",
        )
    massv = info.massv
    problems = []
    if not isinstance(token, int) or isinstance(token, bool):
        problems.append(f"pard_token must be an integer token id, got {token!r}")
    elif not 0 <= token < massv.target.vocab_size:
        problems.append(f"pard_token {token} is outside the vocabulary (0..{massv.target.vocab_size - 1})")
    elif token == massv.target.image_token_id:
        problems.append(f"pard_token {token} is the target's image token id")
    if problems:
        raise MassvConfigError(f"MASSV drafter {model}", problems)


def _check_lengths(info: Any, target_model_config: Any) -> None:
    limit = getattr(info.base_config, "max_position_embeddings", None)
    if limit and target_model_config.max_model_len > limit:
        logger.warning(
            "massv-vllm: target max_model_len %d exceeds the drafter's %d positions; while a batch "
            "holds a longer sequence vLLM proposes no real drafts (outputs stay exact, speed-up is "
            "lost). Pass --max-model-len <= %d to avoid it.",
            target_model_config.max_model_len,
            limit,
            limit,
        )


VLLM_MODULE = "vllm.engine.arg_utils"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_ALIAS",)


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def create_speculative_config(self, target_model_config, target_parallel_config):
            resolve_massv(self, target_model_config)
            return original(self, target_model_config, target_parallel_config)

        return create_speculative_config

    replace_method(
        EngineArgs,
        "create_speculative_config",
        make,
        expect=("self", "target_model_config", "target_parallel_config"),
    )
