"""MediaConnector (vllm/multimodal/media/connector.py, vLLM 0.26.0): a refused file:// URL is a 400.

A request whose image is a ``file://`` URL, sent to a server started without
``--allowed-local-media-path`` (the default, and the safe setting), made ``_load_file_url`` raise
``RuntimeError``, which the OpenAI server maps to "500 Internal Server Error". The request is
what is wrong, not the server, so the same refusal is raised as ``ValueError`` (answered with
400). Paths outside an allowed folder were already a ``ValueError``; nothing else changes.
"""

from __future__ import annotations

from massv_vllm.patches import replace_method
from massv_vllm.patches.envs import request_patch_applies

VLLM_MODULE = "vllm.multimodal.media.connector"  # applied when this vLLM module is imported
SWITCHES = ("MASSV_PATCH_FILE_URL_ERRORS",)


def apply() -> None:
    from vllm.multimodal.media.connector import MediaConnector

    def make(original):
        def _load_file_url(self, url_spec, media_io):
            if self.allowed_local_media_path is None and request_patch_applies(SWITCHES[0]):
                raise ValueError(
                    "Cannot load local files (file:// URLs): this server was started without "
                    "`--allowed-local-media-path`; send the image as a data: or http(s): URL."
                )
            return original(self, url_spec, media_io)

        return _load_file_url

    replace_method(MediaConnector, "_load_file_url", make, expect=("self", "url_spec", "media_io"))
