"""massv-vllm: MASSV speculative decoding for vision-language models, as a vLLM plugin.

One installed package, ``massv_vllm``. The top-level ``patches/`` folder (every change to vLLM
internals) is installed as ``massv_vllm.patches``; ``train/`` and ``benchmarks/`` are scripts run
from a checkout and stay out of site-packages.
"""

from setuptools import find_packages, setup

setup(
    name="massv-vllm",
    version="0.1.0",
    description="MASSV speculative decoding for vision-language models in vLLM",
    python_requires=">=3.10",
    packages=[*find_packages(include=["massv_vllm", "massv_vllm.*"]), "massv_vllm.patches"],
    package_dir={"massv_vllm": "massv_vllm", "massv_vllm.patches": "patches"},
    install_requires=[
        "vllm==0.26.0",
        "transformers==5.17.0",
        "torch",
        "safetensors",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "train": ["deepspeed", "datasets"],
        "bench": ["matplotlib"],
        "dev": ["pytest>=8", "ruff==0.17.*", "matplotlib", "datasets", "deepspeed"],
    },
    entry_points={
        "vllm.general_plugins": ["massv = massv_vllm.serving.plugin:register"],
        "console_scripts": ["massv-build-drafter = massv_vllm.build:main"],
    },
)
