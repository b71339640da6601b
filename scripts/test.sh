#!/usr/bin/env bash
# The project's test command (README, .ci/run): install what is missing, lint, run the tests.
# On a machine without a GPU this runs the real vLLM engine on its CPU backend (tests marked
# "engine"); tests/gpu is skipped there and runs on the GPU machine (see README).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/install.sh || exit 1
python3 -m ruff check . && python3 -m ruff format --check . || { echo "test.sh: ruff failed"; exit 1; }
python3 -m pytest "$@"
rc=$?
# pytest exit code 5 means "no tests were collected": never let that pass as success.
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest collected no tests"; exit 1; fi
exit "$rc"
