"""GPU tests: run on the GPU machine (`pytest tests/gpu`), skipped where CUDA is absent.

``MASSV_GPU_TESTS_ON_CPU=1`` runs them on vLLM's CPU backend with small sizes (a dry run of the
scripts, to catch mistakes before spending GPU time).
"""

from __future__ import annotations

import os

import pytest
import torch

ON_CPU = os.environ.get("MASSV_GPU_TESTS_ON_CPU") == "1"
# ``pytestmark`` of the modules whose CPU dry run shrinks their sizes; the skip reason says how.
GPU_OR_CPU_DRY_RUN = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not (torch.cuda.is_available() or ON_CPU),
        reason="needs a CUDA GPU (MASSV_GPU_TESTS_ON_CPU=1 dry-runs it on CPU with small N)",
    ),
]
# These tests touch CUDA in the pytest process (TargetEncoder, drafter training) before vLLM
# starts its engine processes; forked children of a CUDA-initialised parent fail with
# "CUDA error: initialization error" (seen on the H100), spawned ones do not.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() or ON_CPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine; see README)")
    for item in items:
        if "tests/gpu/" in str(item.fspath):
            item.add_marker(skip)
