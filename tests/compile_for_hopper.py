"""Compile every shipped GPU configuration of the pairwise kernels for sm_90 (no GPU needed).

Run as a script (Triton must not be in interpreter mode): prints one JSON line per configuration
with whether the PTX uses wgmma, the shared memory, registers and spill bytes reported by ptxas.
Used by tests/test_hopper_compile.py.
"""

import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastclip_kernels.ops.pairwise import tiled  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
FEATURE_DIMS = [64, 768]  # BLOCK_DO = 64 and 128: the two shipped backward tilings


def _signature(names, ptr, constexprs):
    sig = {}
    for name in names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr if name in ("a_ptr", "c_ptr", "grad_a_ptr", "bias_ptr") else "*fp32"
        else:
            sig[name] = "i32"
    return sig


def _ptxas_report(ptx: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run(
            [get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o", path + ".cubin"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", out)]
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", out)]
    return {"spill_bytes": sum(spills), "registers": max(regs)}


def compile_one(kernel, dtype, constexprs, num_warps):
    names = kernel.arg_names
    src = ASTSource(fn=kernel, signature=_signature(names, DTYPES[dtype], constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    return {
        "kernel": kernel.__name__,
        "dtype": dtype,
        **{k: v for k, v in constexprs.items() if k != "INPUT_PRECISION"},
        "precision": constexprs["INPUT_PRECISION"],
        "wgmma": "wgmma" in compiled.asm["ptx"],
        "shared_bytes": compiled.metadata.shared,
        **_ptxas_report(compiled.asm["ptx"]),
    }


def configurations():
    for dtype, d in itertools.product(DTYPES, FEATURE_DIMS):
        cfg = tiled._blocks(d, interpret=False)
        blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
        precision = "tf32" if dtype == "fp32" else "ieee"
        common = dict(HAS_BIAS=True, INPUT_PRECISION=precision, **blocks)
        if d == FEATURE_DIMS[0]:
            yield tiled._row_cross_entropy_fwd_kernel, dtype, common, cfg["num_warps"]
            yield tiled._sigmoid_loss_fwd_kernel, dtype, common, cfg["num_warps"]
        for loss, row, col in [(0, True, True), (0, True, False), (0, False, True), (1, False, False)]:
            grad = dict(common, LOSS=loss, HAS_ROW_TERM=row, HAS_COL_TERM=col, BLOCK_DO=cfg["BLOCK_DO"])
            yield tiled._pairwise_grad_kernel, dtype, grad, cfg["num_warps"]


if __name__ == "__main__":
    for kernel, dtype, constexprs, num_warps in configurations():
        print(json.dumps(compile_one(kernel, dtype, constexprs, num_warps)), flush=True)
    sys.exit(0)
