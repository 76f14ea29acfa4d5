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
