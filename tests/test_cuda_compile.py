"""csrc/cuda/row_dot.cu compiles for Hopper (sm_90a) and ptxas spills no registers. No GPU needed."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_row_dot_cu_compiles_without_spills(tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", f"-I{CSRC}", "-gencode", "arch=compute_90a,code=sm_90a"]
    cmd += ["-Xptxas", "-v", "-c", str(CSRC / "cuda" / "row_dot.cu"), "-o", str(tmp_path / "row_dot.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed:\n{log}"
    assert (tmp_path / "row_dot.o").stat().st_size > 0
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'", log)
    assert kernels and len(spills) == len(kernels), f"no ptxas report per kernel:\n{log}"
    assert all(s == ("0", "0") for s in spills), f"register spills:\n{log}"
