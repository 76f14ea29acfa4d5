"""Environment report for bug reports and CI logs: ``python -m fastclip_kernels``.

Versions, the device, and which of our backends and which peer libraries are usable, each with the
reason when not. Peers are looked up with ``importlib.util.find_spec``, never imported.
"""

import importlib.metadata
import importlib.util
import os
import platform

import torch

from . import __version__
from ._native import build_info

# peer name: (module that must exist, distribution for the version, how to get it)
PEERS = {
    "flash-attn": ("flash_attn", "flash-attn", "pip install flash-attn --no-build-isolation"),
    "xformers": ("xformers", "xformers", "pip install xformers"),
    "apex": ("apex.optimizers", "apex", "build NVIDIA apex from github.com/NVIDIA/apex"),
    "inf_cl": ("inf_cl", "inf_cl", "pip install inf_cl"),
}


def _line(ok: bool, detail: str) -> dict:
    return {"ok": ok, "detail": detail}


def _has_module(name: str) -> bool:
    """find_spec without importing the module itself (a dotted name imports its parents)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing or broken
        return False


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _triton() -> tuple[str | None, str]:
    """(version or None, why not importable)."""
    try:
        import triton
    except Exception as exc:  # a broken install raises more than ImportError
        return None, f"import triton failed: {type(exc).__name__}: {exc}"
    return triton.__version__, ""


def _device() -> tuple[str, str]:
    """(the CUDA GPU torch uses, or "cpu"; why there is no GPU, or "")."""
    if torch.cuda.is_available():
        name, (major, minor) = torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)
        return f"{name} (sm_{major}{minor}, {torch.cuda.device_count()} visible)", ""
    if torch.version.cuda is None:
        return "cpu", f"torch {torch.__version__} is a CPU-only build"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return "cpu", f"torch built with CUDA {torch.version.cuda} sees no GPU{hint}"


def _backends(triton_error: str, device: str, no_gpu: str) -> dict:
    info = build_info()
    gpu = _line(not no_gpu, device if not no_gpu else f"no CUDA GPU: {no_gpu}")
    interp = os.environ.get("TRITON_INTERPRET")
    if interp == "1":
        interp_detail = "TRITON_INTERPRET=1: Triton kernels run on the CPU"
    else:
        interp_detail = (
            f"TRITON_INTERPRET={interp or 'unset'}; set it to 1 before import to run Triton on the CPU"
        )
    if "error" in info:
        native = _line(False, f"fastclip_kernels._C did not load ({info['error']}); reinstall: pip install .")
    elif info["cuda"]:
        native = _line(True, f"CUDA compiled in: yes (CUDA {info['cuda_version']}, archs {info['archs']})")
    else:
        native = _line(True, "CUDA compiled in: no (built without nvcc or with FASTCLIP_BUILD_CUDA=0)")
    return {
        "triton (GPU)": _line(False, triton_error) if triton_error else gpu,
        "triton interpreter": _line(not triton_error, triton_error or interp_detail),
        "native library": native,
        "native CUDA kernels usable": gpu if info["cuda"] else _line(False, "native library has no CUDA"),
    }


def _peers() -> dict:
    peers = {}
    for name, (module, dist, get) in PEERS.items():
        top = module.split(".")[0]
        if not _has_module(top):
            peers[name] = _line(False, f"not installed ({get})")
        elif not _has_module(module):
            peers[name] = _line(False, f"'{top}' is installed but has no {module}: not NVIDIA apex ({get})")
        else:
            peers[name] = _line(True, f"{dist} {_dist_version(dist) or '(version unknown)'}")
    return peers


def env_report() -> dict:
    """versions, device, and for each backend and peer {"ok": bool, "detail": str}."""
    triton_version, triton_error = _triton()
    device, no_gpu = _device()
    return {
        "versions": {
            "fastclip_kernels": __version__,
            "torch": torch.__version__,
            "triton": triton_version,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "device": f"{device} ({no_gpu})" if no_gpu else device,
        "backends": _backends(triton_error, device, no_gpu),
        "peers": _peers(),
    }


def format_report(report: dict) -> str:
    lines = [f"{k}: {v if v is not None else 'not installed'}" for k, v in report["versions"].items()]
    lines.append(f"device: {report['device']}")
    for section in ("backends", "peers"):
        lines.append(f"{section}:")
        width = max(len(name) for name in report[section])
        for name, line in report[section].items():
            lines.append(f"  {name:<{width}}  {'yes' if line['ok'] else 'no ':<3}  {line['detail']}")
    return "\n".join(lines)


def main() -> None:
    print(format_report(env_report()))
