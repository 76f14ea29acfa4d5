"""Compile every shipped GPU configuration of the pairwise and anchor kernels for sm_90 (no GPU needed).

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

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastclip_kernels.ops.anchor import triton as anchor_triton  # noqa: E402
from fastclip_kernels.ops.common import pairwise  # noqa: E402
from fastclip_kernels.ops.contrastive_loss import triton as contrastive_triton  # noqa: E402
from fastclip_kernels.ops.optim import triton as optim_triton  # noqa: E402
from fastclip_kernels.ops.sigmoid_loss import triton as sigmoid_triton  # noqa: E402
from fastclip_kernels.ops.state_update import triton as update_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
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


def compile_one(kernel, dtype, constexprs, num_warps, signature=None):
    names = kernel.arg_names
    signature = signature or _signature(names, DTYPES[dtype], constexprs)
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    return {
        "kernel": kernel.__name__,
        "dtype": dtype,
        **{
            k: v if isinstance(v, (bool, int, str)) else str(v)
            for k, v in constexprs.items()
            if k != "INPUT_PRECISION"
        },
        "precision": constexprs.get("INPUT_PRECISION", "none"),
        "uses_dot": "INPUT_PRECISION" in constexprs,
        "half_operands": any(t in ("*fp16", "*bf16") for t in signature.values()),
        "wgmma": "wgmma" in compiled.asm["ptx"],
        "shared_bytes": compiled.metadata.shared,
        **_ptxas_report(compiled.asm["ptx"]),
    }


def precisions(dtype: str):
    """The tl.dot input precisions a launch can select for ``dtype`` (fp32: tf32 where
    torch.backends.cuda.matmul.allow_tf32, else ieee, PyTorch's default)."""
    return ("tf32", "ieee") if dtype == "fp32" else ("ieee",)


def configurations():
    for dtype, d in itertools.product(DTYPES, FEATURE_DIMS):
        for precision in precisions(dtype):
            yield from pairwise_configurations(dtype, d, precision)
            yield from anchor_configurations(dtype, d, precision)


def pairwise_configurations(dtype, d, precision):
    """The loss kernels with the tiles ``pairwise.blocks`` gives the launchers."""
    cfg = pairwise.blocks(d, False, TORCH_DTYPES[dtype], precision)
    blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
    common = dict(HAS_BIAS=True, INPUT_PRECISION=precision, **blocks)
    rescale = dict(RESCALE_W=pairwise.rescale_w(TORCH_DTYPES[dtype]))
    if d == FEATURE_DIMS[0]:
        yield contrastive_triton._row_cross_entropy_fwd_kernel, dtype, common, cfg["num_warps"]
        yield sigmoid_triton._sigmoid_loss_fwd_kernel, dtype, common, cfg["num_warps"]
    for loss, row, col in [(0, True, True), (0, True, False), (0, False, True), (1, False, False)]:
        grad = dict(
            common, **rescale, LOSS=loss, HAS_ROW_TERM=row, HAS_COL_TERM=col, BLOCK_DO=cfg["BLOCK_DO"]
        )
        yield pairwise._pairwise_grad_kernel, dtype, grad, cfg["num_warps"]


def anchor_configurations(dtype, d, precision):
    """The anchor kernels: both EXCLUDE_POSITIVE values, every HAS_ROW/HAS_COL the launcher passes."""
    cfg = pairwise.blocks(d, False, TORCH_DTYPES[dtype], precision)
    blocks = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
    for exclude in (True, False):
        common = dict(EXCLUDE_POSITIVE=exclude, INPUT_PRECISION=precision, **blocks)
        if d == FEATURE_DIMS[0]:
            yield anchor_triton._anchor_stats_kernel, dtype, common, cfg["num_warps"]
        for row, col in itertools.product((True, False), repeat=2):
            grad = dict(
                common,
                HAS_ROW=row,
                HAS_COL=col,
                RESCALE_W=pairwise.rescale_w(TORCH_DTYPES[dtype]),
                BLOCK_DO=cfg["BLOCK_DO"],
            )
            yield anchor_triton._anchor_grad_kernel, dtype, grad, cfg["num_warps"]


STATE_UPDATE_INTS = {"n", "shard", "stride_tau_m", "stride_tau_n", "rank", "world_size"}


def state_update_configurations():
    """The fused FastCLIP state update (elementwise, no tensor cores): every constexpr combination."""
    kernel = update_kernel._fastclip_state_update_kernel
    for gamma_one, per_sample, write in itertools.product((True, False), repeat=3):
        constexprs = dict(
            GAMMA_ONE=gamma_one, PER_SAMPLE_TAU=per_sample, WRITE=write, BLOCK=update_kernel.BLOCK
        )
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                signature[name] = "*i64" if name == "idx_ptr" else "*fp32"
            else:
                signature[name] = "i32" if name in STATE_UPDATE_INTS else "fp32"
        yield kernel, "fp32", constexprs, 4, signature


OPTIM_INTS = {"num_chunks"}


def optimizer_configurations():
    """The multi-tensor optimizer kernels (elementwise): every param dtype and flag combination."""
    kernels = [
        optim_triton._sq_norm_kernel, optim_triton._adamw_kernel,
        optim_triton._lamb_stage1_kernel, optim_triton._lamb_stage2_kernel,
    ]  # fmt: skip
    flags = ("LR_FROM_PTR", "HAS_SCALE", "HAS_MASTER", "BIAS_CORRECTION")
    for kernel, (name, p_dtype) in itertools.product(kernels, optim_triton._TL.items()):
        present = [f for f in flags if f in kernel.arg_names]
        for values in itertools.product((True, False), repeat=len(present)):
            constexprs = dict(zip(present, values, strict=True), P_DTYPE=p_dtype, BLOCK=1024)
            if constexprs.get("HAS_MASTER") is False and name != torch.float32:
                continue  # low-precision params always come with fp32 masters
            signature = {}
            for arg in kernel.arg_names:
                if arg in constexprs:
                    signature[arg] = "constexpr"
                elif arg.endswith("_ptr"):
                    signature[arg] = "*i64" if arg in ("table_ptr", "chunk_ptr") else "*fp32"
                else:
                    signature[arg] = "i32" if arg in OPTIM_INTS else "fp32"
            short = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[name]
            yield kernel, short, constexprs, 4, signature


def segment_sum_configuration():
    """LAMB's fixed-order per-tensor reduction of the norms' chunk partials (no dot)."""
    kernel = optim_triton._segment_sum_kernel
    constexprs = dict(BLOCK=optim_triton.SEGMENT_BLOCK)
    signature = {
        "partial_ptr": "*fp32", "starts_ptr": "*i64", "sums_ptr": "*fp32",
        "num_chunks": "i32", "num_tensors": "i32", "BLOCK": "constexpr",
    }  # fmt: skip
    yield kernel, "fp32", constexprs, 4, signature


if __name__ == "__main__":
    for kernel, dtype, constexprs, num_warps in configurations():
        print(json.dumps(compile_one(kernel, dtype, constexprs, num_warps)), flush=True)
    sys.path.insert(0, os.path.dirname(__file__))
    import hopper_attention  # noqa: E402
    import hopper_patch_embed  # noqa: E402

    for kernel, dtype, constexprs, num_warps, signature in [
        *state_update_configurations(),
        *optimizer_configurations(),
        *segment_sum_configuration(),
        *hopper_patch_embed.configurations(),
        *hopper_attention.configurations(),
    ]:
        print(json.dumps(compile_one(kernel, dtype, constexprs, num_warps, signature)), flush=True)
    sys.exit(0)
