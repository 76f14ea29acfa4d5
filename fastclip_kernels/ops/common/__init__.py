"""What every op shares: the backend names and the one place that decides GPU dispatch.

Backends (the same words in every op):
    "auto"       Triton where :func:`is_gpu` holds (CUDA, and ``meta`` tensors, which take the GPU
                 path through the ops' fake implementations), else the op's PyTorch path;
    "triton"     our Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1, or meta);
    "chunked"    the PyTorch CPU algorithm of an op that has a ``chunked.py``;
    "reference"  the plain-PyTorch spec of an op without one (its ``naive.py``).
Shared tile math lives in ``common.tiles`` / ``common.pairwise`` (Triton) and ``common.chunked``
(PyTorch); ops import it from here, never from each other.
"""

import os

import torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def is_gpu(x) -> bool:
    """True where an op takes its GPU path: CUDA tensors (or devices), and meta ones (shape-only dry
    runs through the ops' fake implementations). The one place this decision lives."""
    device = x.device if isinstance(x, torch.Tensor) else torch.device(x)
    return device.type in ("cuda", "meta")


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1, read at Triton's import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# Tests only (tests/test_production_tiles.py): True makes the interpreter run the GPU tiles, which it
# otherwise never selects. Not API; launchers read it through ``small_tiles``.
_GPU_TILES_UNDER_INTERPRETER = False


def small_tiles() -> bool:
    """True where launchers pick the interpreter's small tiles / blocks instead of the GPU ones:
    under TRITON_INTERPRET=1, unless a test forces the GPU configurations there."""
    return interpreting() and not _GPU_TILES_UNDER_INTERPRETER


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        return False
    return True


def resolve_backend(backend: str, x: torch.Tensor, cpu_backend: str = "chunked", *, triton_ok=None) -> str:
    """'triton' or ``cpu_backend`` for tensors like ``x``.

    'auto' picks Triton where :func:`is_gpu` and ``triton_ok`` (default: x's dtype is fp16/bf16/fp32)
    hold. An explicit 'triton' is checked: the dtype, and TRITON_INTERPRET=1 for CPU tensors.
    """
    allowed = ("auto", "triton", cpu_backend)
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend == cpu_backend:
        return backend
    ok = x.dtype in TRITON_DTYPES if triton_ok is None else triton_ok
    if backend == "auto":
        return "triton" if is_gpu(x) and ok and triton_available() else cpu_backend
    if not ok:
        raise ValueError(f"backend='triton' supports {TRITON_DTYPES}, got tensors of {x.dtype}")
    if not triton_available():  # pragma: no cover - depends on the environment
        raise RuntimeError(
            f"backend='triton' needs Triton: pip install triton (or use backend={cpu_backend!r})"
        )
    if x.device.type == "cpu" and not interpreting():
        raise ValueError(
            f"backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import "
            f"(or use backend={cpu_backend!r})"
        )
    return "triton"


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself if its rows have unit stride along the last dim, else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()
