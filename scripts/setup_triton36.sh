#!/usr/bin/env bash
# The second environment CI compiles the kernels with: the GPU machine's Triton (3.6) over this
# machine's torch and packages (a venv with --system-site-packages, holding only triton==3.6.0).
# Cached: reused when it already has Triton 3.6.0. Prints the venv's python (tests/test_hopper_compile.py
# finds it at the same default place, or at $FASTCLIP_TRITON36_VENV).
set -euo pipefail
VENV="${FASTCLIP_TRITON36_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fastclip-kernels/venv-triton3.6}"
if ! "$VENV/bin/python" -c "import triton, sys; sys.exit(triton.__version__ != '3.6.0')" 2>/dev/null; then
    rm -rf "$VENV"
    python -m venv --system-site-packages --without-pip "$VENV"
    python -m pip --python "$VENV/bin/python" install -q --no-deps "triton==3.6.0"
fi
echo "$VENV/bin/python"
