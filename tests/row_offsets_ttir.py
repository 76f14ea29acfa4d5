"""How the loss kernels address their [rows, D] feature matrices, read from the TTIR (no GPU needed).

Run as a script (without TRITON_INTERPRET): prints one JSON line per kernel with every use of a
feature-matrix pointer argument (a_ptr, c_ptr, grad_a_ptr) in the kernel's TTIR. Row offsets
row * stride pass 2^31 once rows x D >= 2^31, so each use must be a scalar ``tt.addptr`` by an i64
offset (``tiles._row_block``), never a splat that later adds an int32 row * stride.
Used by tests/test_int64_offsets.py.
"""

import json
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_for_hopper import TARGET, anchor_configurations, pairwise_configurations  # noqa: E402

FEATURE_PTRS = ("a_ptr", "c_ptr", "grad_a_ptr")


def feature_pointer_uses(ttir: str) -> dict:
    """{argument: [TTIR lines using it]} for the feature-matrix pointer arguments."""
    lines = ttir.splitlines()
    start = next(i for i, line in enumerate(lines) if "tt.func" in line) + 1  # past the signature
    return {
        name: [line.strip() for line in lines[start:] if re.search(rf"%{name}\b", line)]
        for name in FEATURE_PTRS
    }


if __name__ == "__main__":
    from compile_for_hopper import _signature

    seen = set()
    for kernel, _dtype, constexprs, num_warps in [
        *pairwise_configurations("fp16", 64, "ieee"),
        *anchor_configurations("fp16", 64, "ieee"),
    ]:
        if kernel.__name__ in seen:
            continue
        seen.add(kernel.__name__)
        signature = _signature(kernel.arg_names, "*fp16", constexprs)
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
        uses = feature_pointer_uses(compiled.asm["ttir"])
        print(json.dumps({"kernel": kernel.__name__, "uses": uses}), flush=True)
