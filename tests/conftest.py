"""Test setup: Triton kernels run under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before Triton decorates the kernels, i.e. before fastclip_kernels'
Triton module is imported, so it is set here at collection time.
"""

import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def triton_device() -> str:
    """Where the Triton kernels run: the GPU if there is one, else CPU under the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


GPU_REASON = re.compile(r"\b(GPU|CUDA)\b")


def pytest_collection_modifyitems(config, items):
    """Every test that skips without a GPU carries the ``gpu`` marker, so ``-m gpu`` selects them all
    (scripts/gpu_check.py runs them first in a GPU window): a ``skipif`` whose reason names GPU or CUDA
    marks its test, besides the tests marked ``gpu`` explicitly."""
    for item in items:
        if any(GPU_REASON.search(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)
