"""The native library ``fastclip_kernels._C``: loading it, and calling its functions on a device.

``_C`` never links torch (bitsandbytes' model): its functions take data pointers, sizes, a dtype
code and a CUDA stream as Python ints, so building it needs no torch. This module loads it on first
use -- importing never fails because it is missing; the error comes when a native kernel is called.
Its users: the multi-tensor optimizer kernels (``ops/optim/native.py``).
"""

import importlib

import torch

DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}  # csrc/common.h


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


def native_cuda_available() -> bool:
    """True if ``_C`` was compiled with CUDA and torch sees a CUDA GPU."""
    _load()
    return _state["cuda"] and torch.cuda.is_available()


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
            "with `pip install .` (needs a C++17 compiler, and nvcc for the CUDA kernels), or use "
            "impl='triton' or impl='reference'."
        )
    return lib


def _call(name: str, device: torch.device, *args) -> None:
    """_C.<name>_cpu(*args), or _C.<name>_cuda(*args, stream) on the device's current stream."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            getattr(_lib(), f"{name}_cuda")(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        getattr(_lib(), f"{name}_cpu")(*args)
