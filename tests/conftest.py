"""Test setup: Triton kernels run under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before Triton decorates the kernels, i.e. before fastclip_kernels'
Triton module is imported, so it is set here at collection time.
"""

import os

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
