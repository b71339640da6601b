"""MASSV speculative decoding for vision-language models in vLLM (arXiv 2505.10526)."""

__version__ = "0.1.0"
VLLM_VERSION = "0.26.0"  # the only vLLM release the patches in massv_vllm.patches target
