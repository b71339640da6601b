"""ImageMediaIO (vllm/multimodal/media/image.py, vLLM 0.26.0): oversized images are a 400, not a 500.

``ImageMediaIO.load_bytes`` turns PIL's ``OSError``/``UnidentifiedImageError`` into ``ValueError``
(which the OpenAI server answers with 400) and enforces ``VLLM_MAX_IMAGE_PIXELS`` itself, but
only *after* ``Image.open``. ``Image.open`` already raises ``PIL.Image.DecompressionBombError``
for headers claiming more than 2 x ``PIL.Image.MAX_IMAGE_PIXELS`` (178,956,970) pixels; that
error is a plain ``Exception``, so a ~60-byte PNG claiming 50000x50000 pixels got
"500 Internal Server Error" (and any client could trigger 5xx alerts at will). The patch maps it
to a ``ValueError`` that names the problem, and gives empty image data its own message instead of
PIL's "cannot identify image file <_io.BytesIO object>". Every other outcome is unchanged.
"""

from __future__ import annotations

from massv_vllm.patches import replace_method
from massv_vllm.patches.envs import request_patch_applies

VLLM_MODULE = "vllm.multimodal.media.image"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_IMAGE_ERRORS",)


def apply() -> None:
    from PIL import Image
    from vllm.multimodal.media.image import ImageMediaIO

    def make(original):
        def load_bytes(self, data: bytes):
            if not request_patch_applies(SWITCHES[0]):
                return original(self, data)
            if len(data) == 0:
                raise ValueError("Failed to load image: the image data is empty (0 bytes)")
            try:
                return original(self, data)
            except Image.DecompressionBombError as e:
                raise ValueError(
                    f"Failed to load image: the image is too large ({e}). The server refuses images "
                    f"over {2 * Image.MAX_IMAGE_PIXELS} pixels; resize it before sending."
                ) from e

        return load_bytes

    replace_method(ImageMediaIO, "load_bytes", make, expect=("self", "data"))
