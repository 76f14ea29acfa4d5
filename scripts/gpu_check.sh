#!/usr/bin/env bash
# One GPU window, one command (README, "On a GPU"):
#   bash scripts/gpu_check.sh [OUT_DIR]      install, then env / GPU tests / kernel tests / benchmarks / demo
#                                            training, each under its budget; results in OUT_DIR (default
#                                            gpu_check_out/), results.json first. About 8 minutes; no network.
#   bash scripts/gpu_check.sh --dry-run      on any machine: print the plan, check every test and benchmark exists
# The plan, the budgets and what each stage writes: scripts/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
exec "$PY" scripts/gpu_check.py "$@"
