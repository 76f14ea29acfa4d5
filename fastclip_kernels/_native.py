"""The native library ``fastclip_kernels._C`` and the torch ops built on it.

``_C`` never links torch (bitsandbytes' model): its functions take data pointers, sizes, row strides,
a dtype code and a CUDA stream as Python ints, so building it needs no torch. This module loads it on
first use -- importing never fails because it is missing; the error comes when a native op is called
-- and registers two torch ops (``torch.library.custom_op``, with fake and autograd registrations):

    fastclip::row_dot(a [rows, D], c [rows, D]) -> out [rows]      out[i] = sum_d a[i, d] * c[i, d]
    fastclip::row_dot_backward(grad_out [rows], a, c) -> (grad_a, grad_c)
        grad_a[i, d] = grad_out[i] * c[i, d],  grad_c[i, d] = grad_out[i] * a[i, d]

``out`` is fp32 (fp64 for fp64 inputs); gradients have the input dtype. Kernels: CPU float32/float64;
CUDA float32/float16/bfloat16 when ``_C`` was compiled with nvcc. ``row_dot`` picks the op where it
has a kernel and plain PyTorch otherwise.
"""

import importlib

import torch
from torch import Tensor

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}  # csrc/common.h
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_state: dict = {}  # "lib": the module or None, "error": why not, "cuda": compiled with CUDA


def _load():
    """(module, None) or (None, the exception that stopped ``import fastclip_kernels._C``); tried once."""
    if "lib" not in _state:
        try:
            lib = importlib.import_module("fastclip_kernels._C")
            _state.update(lib=lib, error=None, cuda=bool(lib.build_info()["cuda"]))
        except (ImportError, OSError) as exc:
            _state.update(lib=None, error=exc, cuda=False)
    return _state["lib"], _state["error"]


def native_available() -> bool:
    """True if ``fastclip_kernels._C`` imports (the CPU kernels are then usable)."""
    return _load()[0] is not None


def native_cuda_available(device=None) -> bool:
    """True if ``_C`` was compiled with CUDA, torch sees a CUDA GPU, and the build has machine code or
    PTX that runs on that GPU (``device``, default the current one)."""
    _load()
    if not (_state["cuda"] and torch.cuda.is_available()):
        return False
    return cuda_kernels_run_on(torch.cuda.get_device_capability(device), build_info()["archs"])


def cuda_kernels_run_on(capability: tuple[int, int], archs: str) -> bool:
    """Whether kernels built for ``archs`` (``build_info()["archs"]``, e.g. "sm_80;sm_90a;compute_80")
    run on a GPU of compute ``capability`` (major, minor), by CUDA's compatibility rules:

    - ``sm_XY`` machine code runs on X.Z for Z >= Y (same major), ``sm_XYf`` likewise (family);
    - ``sm_XYa`` (arch-specific: wgmma, setmaxnreg) runs on X.Y only;
    - ``compute_XY`` PTX is JIT-compiled by the driver for any X'.Y' >= X.Y.

    A bare "80" or "90a" (builds before PTX was embedded) reads as ``sm_80`` / ``sm_90a``.
    """
    major, minor = capability
    for target in filter(None, (t.strip() for t in archs.split(";"))):
        kind, _, arch = target.rpartition("_")
        digits = arch.rstrip("af")
        if not digits.isdigit() or len(digits) < 2:
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind not in ("sm", "compute", ""):
            continue
        if arch.endswith("a"):
            runs = (major, minor) == built
        elif kind == "compute" and not arch.endswith("f"):
            runs = (major, minor) >= built
        else:
            runs = major == built[0] and minor >= built[1]
        if runs:
            return True
    return False


def build_info() -> dict:
    """``_C.build_info()`` (cuda, cuda_version, archs), or {"cuda": False, "error": why it did not load}."""
    lib, error = _load()
    if lib is None:
        return {"cuda": False, "cuda_version": None, "archs": "", "error": f"{type(error).__name__}: {error}"}
    return dict(lib.build_info())


def _lib():
    lib, error = _load()
    if lib is None:
        raise RuntimeError(
            f"fastclip_kernels._C is not built ({type(error).__name__}: {error}). Reinstall from a checkout "
            "with `pip install .` (needs a C++17 compiler, and nvcc for the CUDA kernels), or call "
            "fastclip_kernels._native.row_dot, which falls back to PyTorch."
        )
    return lib


def _check_pair(a: Tensor, c: Tensor) -> None:
    for name, x in (("a", a), ("c", c)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if c.shape != a.shape:
        raise ValueError(f"c has shape {tuple(c.shape)}, expected {tuple(a.shape)} (as a)")
    if c.dtype != a.dtype:
        raise TypeError(f"c has dtype {c.dtype}, expected {a.dtype} (as a)")
    if c.device != a.device:
        raise ValueError(f"c is on {c.device}, expected {a.device} (as a)")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dense_rows(x: Tensor) -> tuple[Tensor, int]:
    """(x, row stride) with unit stride along D and rows that do not overlap; copies only if needed."""
    rows, dim = x.shape
    if not ((dim <= 1 or x.stride(1) == 1) and (rows <= 1 or x.stride(0) >= dim)):
        x = x.contiguous()
    return x, (x.stride(0) if rows > 1 else dim)


def _kernel_dtypes(device: torch.device) -> tuple:
    return CUDA_DTYPES if device.type == "cuda" else CPU_DTYPES


def _native_args(a: Tensor, c: Tensor) -> tuple:
    """Checks a, c for the native kernels; returns (a, c, rows, D, stride_a, stride_c, dtype_code)."""
    _check_pair(a, c)
    if a.dtype not in _kernel_dtypes(a.device):
        raise TypeError(
            f"a has dtype {a.dtype}; native {a.device.type} kernels take {_kernel_dtypes(a.device)}"
        )
    (a, stride_a), (c, stride_c) = _dense_rows(a), _dense_rows(c)
    return a, c, a.shape[0], a.shape[1], stride_a, stride_c, DTYPE_CODES[a.dtype]


def _call(name: str, device: torch.device, *args) -> None:
    """_C.<name>_cpu(*args), or _C.<name>_cuda(*args, stream) on the device's current stream."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            getattr(_lib(), f"{name}_cuda")(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        getattr(_lib(), f"{name}_cpu")(*args)


@torch.library.custom_op("fastclip::row_dot", mutates_args=(), device_types=("cpu", "cuda"))
def _row_dot_op(a: Tensor, c: Tensor) -> Tensor:
    a, c, rows, dim, stride_a, stride_c, code = _native_args(a, c)
    out = a.new_empty(rows, dtype=_acc_dtype(a.dtype))
    _call(
        "row_dot", a.device, a.data_ptr(), c.data_ptr(), out.data_ptr(), rows, dim, stride_a, stride_c, code
    )
    return out


@_row_dot_op.register_fake
def _(a: Tensor, c: Tensor) -> Tensor:
    _check_pair(a, c)
    return a.new_empty(a.shape[0], dtype=_acc_dtype(a.dtype))


def _check_grad_out(grad_out: Tensor, a: Tensor) -> None:
    if grad_out.dim() != 1 or grad_out.shape[0] != a.shape[0]:
        raise ValueError(f"grad_out must be [rows] = [{a.shape[0]}], got shape {tuple(grad_out.shape)}")


@torch.library.custom_op("fastclip::row_dot_backward", mutates_args=(), device_types=("cpu", "cuda"))
def _row_dot_backward_op(grad_out: Tensor, a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    _check_grad_out(grad_out, a)
    a, c, rows, dim, stride_a, stride_c, code = _native_args(a, c)
    g = grad_out.to(_acc_dtype(a.dtype)).contiguous()
    grad_a = torch.empty((rows, dim), dtype=a.dtype, device=a.device)
    grad_c = torch.empty((rows, dim), dtype=a.dtype, device=a.device)
    ptrs = (g.data_ptr(), a.data_ptr(), c.data_ptr(), grad_a.data_ptr(), grad_c.data_ptr())
    _call("row_dot_bwd", a.device, *ptrs, rows, dim, stride_a, stride_c, code)
    return grad_a, grad_c


@_row_dot_backward_op.register_fake
def _(grad_out: Tensor, a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    _check_grad_out(grad_out, a)
    _check_pair(a, c)
    return a.new_empty(a.shape), a.new_empty(a.shape)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    a, c = ctx.saved_tensors
    return torch.ops.fastclip.row_dot_backward(grad_out, a, c)


_row_dot_op.register_autograd(_backward, setup_context=_setup_context)


@torch.compiler.assume_constant_result  # torch.compile calls it while tracing, never in the graph
def _has_kernel(device_type: str, dtype: torch.dtype) -> bool:
    _load()
    if device_type == "cpu":
        return dtype in CPU_DTYPES and _state["lib"] is not None
    return device_type == "cuda" and dtype in CUDA_DTYPES and _state["cuda"]


def row_dot(a: Tensor, c: Tensor) -> Tensor:
    """Row-wise dot product of paired rows, the positive logits <x_i, y_i> of a CLIP loss.

    Args:
        a (torch.Tensor): [rows, D] fp16/bf16/fp32/fp64 (any row stride; a copy is made only if
            rows are not unit-stride along D).
        c (torch.Tensor): [rows, D], same dtype and device.
    Returns:
        [rows], fp32 (fp64 for fp64 inputs): out[i] = sum_d a[i, d] * c[i, d], differentiable in a, c.

    Uses the native op ``torch.ops.fastclip.row_dot`` where it has a kernel (CPU fp32/fp64; CUDA
    fp32/fp16/bf16 when built with nvcc) and ``(a.float() * c.float()).sum(-1)`` otherwise.

    Example:
        >>> a, c = torch.randn(4, 8), torch.randn(4, 8)
        >>> torch.allclose(row_dot(a, c), (a * c).sum(-1), atol=1e-6)
        True
    """
    _check_pair(a, c)
    if _has_kernel(a.device.type, a.dtype):
        return torch.ops.fastclip.row_dot(a, c)
    acc = _acc_dtype(a.dtype)
    return (a.to(acc) * c.to(acc)).sum(-1)
