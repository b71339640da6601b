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
from pathlib import Path
from typing import Any

from massv_vllm.patches import replace_function, replace_method

logger = logging.getLogger("vllm.massv_vllm.patches")
METHOD = "massv"


def resolve_massv(args: Any, target_model_config: Any) -> None:
    """Validate a massv/draft_model speculative config on ``args`` and rewrite the alias in place."""
    from massv_vllm.patches.envs import set_massv_active
    from massv_vllm.serving.checks import check_pair
    from massv_vllm.serving.config import MassvConfigError, is_massv_folder, read_config_json, recorded_gamma

    spec = dict(args.speculative_config or {})
    method = spec.get("method", args.spec_method)
    model = spec.get("model", args.spec_model)
    # "massv", or a MASSV folder given as a draft model: --spec-model DRAFTER (vLLM then infers
    # the method) or "method": "draft_model".
    massv = method == METHOD or (method in (None, "draft_model") and bool(model) and is_massv_folder(model))
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
    # Where the user put the method (the JSON dict or --spec-method) now says "draft_model".
    in_dict = "method" in spec or (args.spec_method is None and args.speculative_config is not None)
    if in_dict:
        spec["method"] = "draft_model"
    else:
        args.spec_method = "draft_model"
    if spec.get("num_speculative_tokens") is None and args.spec_tokens is None:
        gamma = recorded_gamma(read_config_json(model))
        if gamma is None:
            raise MassvConfigError(
                f"MASSV drafter {model}",
                "no number of draft tokens given (num_speculative_tokens / --spec-tokens) and the folder "
                "records none (speculators_config.proposal_methods[0].speculative_tokens)",
            )
        if args.speculative_config is not None:
            spec["num_speculative_tokens"] = gamma
        else:
            args.spec_tokens = gamma
    if args.speculative_config is not None:
        args.speculative_config = spec
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


def resolve_verifier(drafter: str, verifier: str) -> str:
    """The target a speculators-format MASSV drafter folder names, as a usable path or hub id.

    An absolute path is used as it is; a relative one is resolved against the drafter folder (a
    drafter and target moved together keep working); anything else is a hub id, left to vLLM."""
    from massv_vllm.serving.config import MassvConfigError

    path = Path(verifier).expanduser()
    if path.is_absolute():
        candidate = path
    elif verifier.startswith((".", "~")) or (Path(drafter) / verifier).exists():
        candidate = (Path(drafter) / verifier).resolve()
    else:
        return verifier  # a hub id ("Qwen/Qwen2.5-VL-7B-Instruct"): vLLM resolves it as usual
    if not candidate.is_dir():
        raise MassvConfigError(
            f"MASSV drafter {drafter}",
            f"its config.json names the target (speculators_config.verifier.name_or_path) {verifier!r}, "
            f"which is not a folder ({candidate}). Move the target there, correct that path (a relative "
            "path is read from the drafter folder), or name the target yourself: vllm serve TARGET "
            f'--speculative-config \'{{"method": "massv", "model": "{drafter}"}}\'',
        )
    return str(candidate)


def massv_speculators_override(
    model: str, user_spec: dict[str, Any] | None
) -> tuple[str, dict[str, Any]] | None:
    """For ``vllm serve DRAFTER`` / ``LLM(model=DRAFTER)`` with a MASSV drafter folder: (the target,
    the speculative config); None for any other model. The user's own speculative-config keys
    (e.g. ``num_speculative_tokens``) win over the folder's."""
    from massv_vllm.serving.config import (
        SPECULATORS_TYPE,
        read_config_json,
        recorded_gamma,
        recorded_verifier,
    )

    if not Path(model).is_dir() or not (Path(model) / "config.json").is_file():
        return None
    raw = read_config_json(model)
    if raw.get("speculators_model_type") != SPECULATORS_TYPE:
        return None
    verifier = recorded_verifier(raw)
    if verifier is None:
        from massv_vllm.serving.config import MassvConfigError

        raise MassvConfigError(
            f"MASSV drafter {model}", "speculators_config.verifier.name_or_path is missing"
        )
    spec = {"method": METHOD, "model": model, "num_speculative_tokens": recorded_gamma(raw)}
    spec |= {k: v for k, v in (user_spec or {}).items() if k not in ("method", "model")}
    return resolve_verifier(model, verifier), spec


VLLM_MODULE = "vllm.engine.arg_utils"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_ALIAS",)


def apply() -> None:
    import vllm.engine.arg_utils as arg_utils
    from vllm.engine.arg_utils import EngineArgs

    def make_override(original):
        # vLLM's speculators detection (transformers_utils/config.py) starts the verifier named in
        # a drafter folder; for MASSV folders the verifier path is resolved and checked first.
        def maybe_override_with_speculators(
            model,
            tokenizer,
            trust_remote_code,
            revision=None,
            vllm_speculative_config=None,
            hf_token=None,
            **kw,
        ):
            found = massv_speculators_override(str(model), vllm_speculative_config)
            if found is None:
                return original(
                    model, tokenizer, trust_remote_code, revision, vllm_speculative_config, hf_token, **kw
                )
            target, spec = found
            return target, target, spec

        return maybe_override_with_speculators

    replace_function(
        arg_utils,
        "maybe_override_with_speculators",
        make_override,
        expect=(
            "model",
            "tokenizer",
            "trust_remote_code",
            "revision",
            "vllm_speculative_config",
            "hf_token",
            "kwargs",
        ),
    )

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
