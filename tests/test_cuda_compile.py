"""csrc/cuda/multi_tensor.cu compiles for Hopper (sm_90a) and ptxas spills no registers. No GPU needed."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")


def ptxas_report(log: str) -> dict[str, tuple[int, int, int]]:
    """{kernel (mangled name): (registers, spill store bytes, spill load bytes)} from `ptxas -v`."""
    report, kernel, spills = {}, None, (0, 0)
    for line in log.splitlines():
        if m := re.search(r"Function properties for (\w+)", line):
            kernel = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spills = (int(m.group(1)), int(m.group(2)))
        elif (m := re.search(r"Used (\d+) registers", line)) and kernel:
            report[kernel], kernel = (int(m.group(1)), *spills), None
    return report


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
def test_multi_tensor_cu_compiles_without_spills(tmp_path):
    """Every multi-tensor optimizer kernel (3 dtypes x AdamW, LAMB stages 1-2, sum of squares, plus the
    norm and clip-coefficient kernels) compiles for sm_90a with no spills within the <= 64 registers
    that __launch_bounds__(512, 2) allows (two blocks per SM)."""
    cmd = [
        NVCC,
        "-std=c++17",
        "-O3",
        f"-I{CSRC}",
        "-gencode",
        "arch=compute_90a,code=sm_90a",
        "-Xptxas",
        "-v",
    ]
    cmd += ["-c", str(CSRC / "cuda" / "multi_tensor.cu"), "-o", str(tmp_path / "multi_tensor.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed:\n{log}"
    report = ptxas_report(log)
    for name, (regs, stores, loads) in sorted(report.items()):
        print(f"{regs:4d} registers, spill {stores}/{loads} B  {name}")
    for kernel in ("adamw_kernel", "lamb_stage1_kernel", "lamb_stage2_kernel", "sq_norm_kernel"):
        assert sum(kernel in name for name in report) == 3, f"{kernel}: expected fp32, fp16, bf16:\n{log}"
    assert any("global_norm_kernel" in n for n in report) and any(
        "clip_coefficient_kernel" in n for n in report
    )
    assert all(st == ld == 0 for _, st, ld in report.values()), f"register spills:\n{log}"
    assert all(regs <= 64 for regs, *_ in report.values()), f"more than 64 registers:\n{log}"
