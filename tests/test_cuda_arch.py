"""Which GPUs the native CUDA kernels run on, and their stream safety, checked on a CPU machine.

setup.py builds machine code for FASTCLIP_CUDA_ARCHS ("80;90a") plus the PTX of the newest plain arch,
and records the targets in ``_C.build_info()["archs"]``; ``native.available`` reads them, so
``impl="auto"`` falls back to Triton on a GPU the build cannot run on (a V100 or T4) instead of failing
with "no kernel image is available" at the first ``opt.step()``.
"""

import ast
import importlib
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastclip_kernels import _native
from fastclip_kernels.ops.optim import native

optim_ops = importlib.import_module("fastclip_kernels.ops.optim")

ROOT = Path(__file__).resolve().parents[1]


def _setup_functions():
    """gencode_targets / gencode_flags from setup.py, without running setup() (it builds)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("gencode_")]
    namespace = {"re": __import__("re")}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace["gencode_targets"], namespace["gencode_flags"]


def test_setup_embeds_ptx_of_the_newest_plain_arch():
    gencode_targets, gencode_flags = _setup_functions()
    assert gencode_targets("80;90a") == ["sm_80", "sm_90a", "compute_80"]
    assert gencode_targets("75;80;86") == ["sm_75", "sm_80", "sm_86", "compute_86"]
    assert gencode_targets("90a") == ["sm_90a"]  # arch-specific PTX would run on sm_90 only
    assert gencode_flags(["sm_80", "compute_80"]) == [
        "-gencode",
        "arch=compute_80,code=sm_80",
        "-gencode",
        "arch=compute_80,code=compute_80",
    ]
    with pytest.raises(RuntimeError, match="FASTCLIP_CUDA_ARCHS"):
        gencode_targets("sm80")


@pytest.mark.parametrize(
    "capability, runs",
    [
        ((7, 0), False),  # V100: older than every target
        ((7, 5), False),  # T4
        ((8, 0), True),  # A100: sm_80 machine code
        ((8, 6), True),  # RTX 30xx: sm_80 code runs on 8.x
        ((8, 9), True),  # L4 / RTX 40xx
        ((9, 0), True),  # H100 / H200: sm_90a
        ((10, 0), True),  # B200: only through compute_80 PTX
        ((12, 0), True),  # RTX 50xx: only through compute_80 PTX
    ],
)
def test_kernels_run_on_follows_cuda_compatibility(capability, runs):
    assert _native.cuda_kernels_run_on(capability, "sm_80;sm_90a;compute_80") is runs


def test_kernels_run_on_without_ptx_and_old_build_strings():
    # A build without PTX (what setup.py emitted before) cannot run on Blackwell.
    assert not _native.cuda_kernels_run_on((10, 0), "sm_80;sm_90a")
    assert not _native.cuda_kernels_run_on((12, 0), "80;90a")
    assert _native.cuda_kernels_run_on((8, 6), "80;90a")
    assert not _native.cuda_kernels_run_on((9, 1), "90a") and _native.cuda_kernels_run_on((9, 0), "90a")
    assert _native.cuda_kernels_run_on((10, 3), "sm_100f") and not _native.cuda_kernels_run_on(
        (12, 0), "sm_100f"
    )
    assert _native.cuda_kernels_run_on((9, 0), "compute_90a")  # arch-specific PTX: 9.0 only
    assert not _native.cuda_kernels_run_on((10, 0), "compute_90a")
    assert not _native.cuda_kernels_run_on((9, 0), "")


@pytest.fixture
def fake_cuda_build(monkeypatch):
    """A _C built with CUDA for "80;90a" + PTX, on a machine whose GPU capability the test sets."""
    lib = SimpleNamespace(multi_tensor_adamw_cpu=None)
    monkeypatch.setattr(_native, "_load", lambda: (lib, None))
    monkeypatch.setitem(_native._state, "cuda", True)
    monkeypatch.setattr(_native, "build_info", lambda: {"cuda": True, "archs": "sm_80;sm_90a;compute_80"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])
    return capability


def test_auto_falls_back_to_triton_on_a_gpu_the_build_does_not_cover(fake_cuda_build):
    cuda, fp32 = torch.device("cuda", 0), torch.float32
    fake_cuda_build["value"] = (9, 0)
    assert native.available(cuda)
    assert optim_ops.resolve_backend("auto", cuda, fp32) == "native"
    fake_cuda_build["value"] = (7, 5)  # T4
    assert not native.available(cuda)
    assert optim_ops.resolve_backend("auto", cuda, fp32) == "triton"
    with pytest.raises(RuntimeError, match="impl='native'"):
        optim_ops.resolve_backend("native", cuda, fp32)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_nvcc_packs_machine_code_and_ptx(tmp_path):
    """nvcc accepts the flags, and its fatbinary step packs sm_80 + sm_90a code and compute_80 PTX."""
    gencode_targets, gencode_flags = _setup_functions()
    src = tmp_path / "k.cu"
    src.write_text("__global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n")
    cmd = ["nvcc", *gencode_flags(gencode_targets("80;90a")), "-c", str(src), "-o", str(tmp_path / "k.o")]
    proc = subprocess.run([*cmd, "--dryrun"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    images = set(re.findall(r"--image3=kind=(\w+),sm=(\w+)", proc.stdout + proc.stderr))
    assert images == {("elf", "80"), ("elf", "90a"), ("ptx", "80")}, images


def test_table_used_from_a_side_stream_is_recorded_on_it(monkeypatch):
    """The metadata table is freed on eviction; a side stream that read it must be recorded on the tensor
    (record_stream), or the allocator may reuse the memory while that stream's kernel still runs."""

    class FakeStream:
        def __init__(self, handle):
            self.cuda_stream, self.waited = handle, []

        def wait_event(self, event):
            self.waited.append(event)

    class FakeTensor:
        def __init__(self):
            self.recorded = []

        def record_stream(self, stream):
            self.recorded.append(stream.cuda_stream)

        def data_ptr(self):
            return 1234

    main, side = FakeStream(7), FakeStream(8)
    table = object.__new__(native._Table)
    table.tensor, table.event, table.streams = FakeTensor(), object(), {main.cuda_stream}
    current = {"stream": main}
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current["stream"])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda = torch.device("cuda", 0)
    assert table.ptr(cuda) == 1234 and table.tensor.recorded == []  # the stream that made it
    current["stream"] = side
    table.ptr(cuda)
    table.ptr(cuda)
    assert table.tensor.recorded == [8] and side.waited == [table.event]
