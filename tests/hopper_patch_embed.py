"""Shipped GPU configurations of the packed patch-embedding kernel, for tests/compile_for_hopper.py.

``configurations()`` yields ``(kernel, dtype_name, constexprs, num_warps, signature)`` for
``compile_one``: every (images, weight) dtype pair the launcher is used with -- fp16/fp16,
bf16/bf16, fp32/fp32 (tf32 and ieee dots) and fp32 images into a bf16 model -- for patch sizes 14 and 16,
with and without a bias. dtype_name is the images' dtype. The width D (768, 1024, ...) is a runtime
argument and the launcher's blocks do not depend on it, so it does not change the compiled code.
"""

import itertools

import torch
import triton

from fastclip_kernels.ops.patch_embed import triton as kernels

PATCH_SIZES = (14, 16)
# (images, weight = compute/output) dtypes
DTYPE_PAIRS = [("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp32"), ("fp32", "bf16")]
_TORCH = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _signature(kernel, constexprs, image, weight):
    pointers = {
        "img_ptr": f"*{image}",
        "idx_ptr": "*i64",
        "batch_ptr": "*i32",
        "w_ptr": f"*{weight}",
        "bias_ptr": f"*{weight}",
        "pos_ptr": "*fp32" if weight != image else f"*{weight}",  # mixed precision: fp32 table
        "out_ptr": f"*{weight}",
    }
    return {
        name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in kernel.arg_names
    }


def configurations():
    kernel = kernels._patch_embed_fwd_kernel
    for (image, weight), patch, has_bias in itertools.product(DTYPE_PAIRS, PATCH_SIZES, (True, False)):
        cfg = kernels.blocks(_TORCH[weight], interpret=False)
        # fp32 weights: tf32 dots where torch.backends.cuda.matmul.allow_tf32, else ieee (the default)
        for precision in ("tf32", "ieee") if weight == "fp32" else ("ieee",):
            constexprs = dict(
                C=3,
                P=patch,
                P_POW2=triton.next_power_of_2(patch),
                HAS_BIAS=has_bias,
                INPUT_PRECISION=precision,
                **{k: cfg[k] for k in ("BLOCK_T", "BLOCK_D", "BLOCK_K")},
            )
            yield kernel, image, constexprs, cfg["num_warps"], _signature(kernel, constexprs, image, weight)
