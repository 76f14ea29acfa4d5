"""Every shipped GPU configuration of the varlen attention kernels, for tests/compile_for_hopper.py.

``configurations()`` yields ``(kernel, dtype_name, constexprs, num_warps, signature)`` for
``compile_for_hopper.compile_one``: fp16, bf16 and fp32 (tf32 dots, as with
torch.backends.cuda.matmul.allow_tf32, and ieee FMA dots, PyTorch's default), head dims 32/64/128
(and 80, padded to BLOCK_D = 128), causal on and off, for the forward, the backward preprocess, dK/dV and dQ kernels. The tiles come
from ``varlen_attention.triton.config``, i.e. what the launchers use.

Run alone (no GPU needed): ``env -u TRITON_INTERPRET python tests/hopper_attention.py``.
"""

import itertools
import json
import os
import sys

import torch

from fastclip_kernels.ops.varlen_attention import triton as triton_varlen
from fastclip_kernels.ops.varlen_attention import triton_bwd as triton_varlen_bwd


def precisions(dtype: str):
    """tl.dot input precisions a launch can select: fp32 tf32 (allow_tf32) or ieee (the default)."""
    return ("tf32", "ieee") if dtype == "fp32" else ("ieee",)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
HEAD_DIMS = [32, 64, 80, 128]  # 80: a padded head dim (BLOCK_D = 128, masked)
TOKEN_PTRS = {"q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}


def _signature(kernel, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in TOKEN_PTRS:
            sig[name] = f"*{dtype}"
        elif name.startswith("cu_seqlens"):
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"  # lse, delta
        elif name == "softmax_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"  # strides, T
    return sig


KERNELS = {
    "fwd": triton_varlen._varlen_attention_fwd_kernel,
    "dkdv": triton_varlen_bwd._varlen_attention_bwd_dkdv_kernel,
    "dq": triton_varlen_bwd._varlen_attention_bwd_dq_kernel,
}


def configurations():
    for (dtype, torch_dtype), d in itertools.product(DTYPES.items(), HEAD_DIMS):
        for precision in precisions(dtype):
            yield from _configurations(dtype, torch_dtype, d, precision)


def _configurations(dtype, torch_dtype, d, precision):
    """One (dtype, head dim, dot precision): the tiles ``triton_varlen.config`` gives the launchers."""
    pre_cfg = triton_varlen.config("dq", d, torch_dtype, precision)  # as the backward launcher
    pre = dict(HEAD_DIM=d, BLOCK_M=pre_cfg["BLOCK_M"], BLOCK_D=pre_cfg["BLOCK_D"])
    kernel = triton_varlen_bwd._varlen_attention_bwd_preprocess_kernel
    yield kernel, dtype, pre, 4, _signature(kernel, dtype, pre)
    for causal, (name, kernel) in itertools.product((False, True), KERNELS.items()):
        cfg = triton_varlen.config(name, d, torch_dtype, precision, causal)
        tiles = {k: cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D")}
        constexprs = dict(CAUSAL=causal, HEAD_DIM=d, INPUT_PRECISION=precision, **tiles)
        yield kernel, dtype, constexprs, cfg["num_warps"], _signature(kernel, dtype, constexprs)


# Arguments a real launch sees as multiples of 16 (Triton's "D" specialization: 16-byte aligned
# tensors, strides of heads with d % 16 == 0); lse/delta strides (= T) and T itself vary.
NOT_DIVISIBLE = {"stride_lse_h", "stride_delta_h", "T", "softmax_scale"}


def launch_attrs(kernel, constexprs: dict) -> dict:
    """ASTSource attrs with the divisibility-16 hints a launch on aligned [T, H, d] tensors gets.

    Without them (as compile_one compiles) loads are not vectorized and the K/V loads are not
    software-pipelined, so registers and shared memory differ from what runs.
    """
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(kernel.arg_names)
        if name not in constexprs and name not in NOT_DIVISIBLE
    }


def compile_as_launched(kernel, dtype, constexprs, num_warps, signature) -> dict:
    """compile_one's report for the kernel specialized as a launch on aligned tensors."""
    import triton
    from compile_for_hopper import TARGET, _ptxas_report
    from triton.compiler import ASTSource

    src = ASTSource(
        fn=kernel, signature=signature, constexprs=constexprs, attrs=launch_attrs(kernel, constexprs)
    )
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    return {
        "kernel": kernel.__name__,
        "dtype": dtype,
        **{k: v for k, v in constexprs.items() if k != "INPUT_PRECISION"},
        "num_warps": num_warps,
        "wgmma": "wgmma" in compiled.asm["ptx"],
        "shared_bytes": compiled.metadata.shared,
        **_ptxas_report(compiled.asm["ptx"]),
    }


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compile_for_hopper import compile_one

    for args in configurations():
        plain = compile_one(*args)
        launched = compile_as_launched(*args)
        keys = ("registers", "spill_bytes", "shared_bytes", "wgmma")
        print(json.dumps({**plain, "as_launched": {k: launched[k] for k in keys}}), flush=True)
