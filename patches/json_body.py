"""validate_json_request (vllm/entrypoints/serve/utils/api_utils.py, vLLM 0.26.0): a request body
that is not a JSON object is a 400.

A JSON array (or string, number, null) as the body of /v1/chat/completions got "500 Internal
Server Error: 'list' object has no attribute 'get'": FastAPI hands the parsed body to the
request model, whose ``mode="before"`` validators (``ChatCompletionRequest.validate_stream_options``
and others) call ``data.get(...)``; the AttributeError is no validation error, so it reaches the
catch-all handler as a 500. Every OpenAI route already depends on ``validate_json_request`` (it
refuses a non-JSON content type with 400), and FastAPI runs that dependency after parsing the body
and before validating it, so the patch adds the missing "must be a JSON object" check there.

There is no class to patch: the dependency is a module-level function that each router module
imports by name when it is first imported, inside ``build_app`` (after vLLM has loaded its plugins,
in ``vllm serve`` and in ``python -m vllm.entrypoints.openai.api_server``). The module attribute is
replaced before that; routers imported earlier keep vLLM's check, and a warning says so.
"""

import logging
import sys

from massv_vllm.patches import replace_function
from massv_vllm.patches.envs import request_patch_applies

logger = logging.getLogger("vllm.massv_vllm.patches")

VLLM_MODULE = "vllm.entrypoints.serve.utils.api_utils"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_JSON_BODY_ERRORS",)
NAME = "validate_json_request"

JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


def not_an_object(body) -> str | None:
    """The 400 message for a parsed JSON body that is not an object, else None."""
    if isinstance(body, dict):
        return None
    kind = "null" if body is None else JSON_KINDS.get(type(body), type(body).__name__)
    return f"The request body must be a JSON object ({{...}}), got {kind}"


def apply() -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError

    module = sys.modules[VLLM_MODULE]

    def make(original):
        # No ``from __future__ import annotations`` in this module: FastAPI reads the annotation
        # below to know what to inject, and it must be the Request class, not the string "Request".
        async def validate_json_request(raw_request: Request):
            await original(raw_request)  # vLLM's content-type check
            if not request_patch_applies(SWITCHES[0]):
                return
            try:
                body = await raw_request.json()  # parsed (and cached) by FastAPI before its dependencies
            except Exception:
                return  # not JSON at all: FastAPI has already answered it with its own 400
            message = not_an_object(body)
            if message is not None:
                raise RequestValidationError(errors=[message])

        return validate_json_request

    original = replace_function(module, NAME, make, expect=("raw_request",))
    early = sorted(
        name
        for name, mod in list(sys.modules.items())
        if name.endswith("api_router") and getattr(mod, NAME, None) is original
    )
    if early:
        logger.warning(
            "massv-vllm: %s were imported before the patch; their routes keep vLLM's %s "
            "(a JSON body that is not an object stays a 500 there)",
            ", ".join(early),
            NAME,
        )
