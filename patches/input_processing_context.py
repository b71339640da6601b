"""InputProcessingContext (vllm/multimodal/processing/context.py, vLLM 0.26.0): processor errors say why.

``call_hf_processor`` turns any exception of the HF processor into
``ValueError("Failed to apply <Processor> on data={...} with kwargs={...}")`` (answered with 400),
which drops the actual reason and dumps the repr of the whole input, the full prompt text
included. An image with an aspect ratio over 200 (e.g. 1x400 px) thus got a 400 that never says
"aspect ratio". The patch keeps the 400 and the exception chain but rewrites the message to a
short summary of the input plus the processor's own error, e.g. "Failed to apply
Qwen2_5_VLProcessor to 1 image (1x400): ValueError: absolute aspect ratio must be smaller than 200,
got 400.0".
"""

from __future__ import annotations

from typing import Any

from massv_vllm.patches import replace_method
from massv_vllm.patches.envs import request_patch_applies

PREFIX = "Failed to apply "


def describe_inputs(data: Any) -> str:
    """A short, size-bounded description of a processor's inputs (never the content itself)."""
    if not isinstance(data, dict):
        return type(data).__name__
    parts = []
    for key, value in data.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        if key == "text":
            n = sum(len(v) for v in items if isinstance(v, str))
            parts.append(f"text of {n} characters")
        elif key == "images":
            # PIL images (or vLLM's wrappers of them) have a (w, h) tuple; arrays/tensors do not.
            sizes = [f"{s[0]}x{s[1]}" for v in items[:8] if isinstance(s := getattr(v, "size", None), tuple)]
            more = ", ..." if len(items) > 8 else ""
            parts.append(f"{len(items)} image{'s' * (len(items) != 1)} ({', '.join(sizes)}{more})")
        else:
            parts.append(f"{key} ({len(items)} item{'s' * (len(items) != 1)})")
    return ", ".join(parts) or "no inputs"


VLLM_MODULE = "vllm.multimodal.processing.context"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_PROCESSOR_ERRORS",)


def apply() -> None:
    from vllm.multimodal.processing.context import InputProcessingContext

    def make(original):
        def call_hf_processor(self, hf_processor, *args: Any, **kwargs: Any):
            try:
                return original(self, hf_processor, *args, **kwargs)
            except ValueError as e:
                cause = e.__cause__
                if cause is None or not str(e).startswith(PREFIX) or not request_patch_applies(SWITCHES[0]):
                    raise
                data = args[0] if args else kwargs.get("data")
                raise ValueError(
                    f"{PREFIX}{type(hf_processor).__name__} to {describe_inputs(data)}: "
                    f"{type(cause).__name__}: {cause}"
                ) from cause

        return call_hf_processor

    replace_method(
        InputProcessingContext,
        "call_hf_processor",
        make,
        expect=("self", "hf_processor", "data", "kwargs", "num_tries", "max_tries"),
    )
