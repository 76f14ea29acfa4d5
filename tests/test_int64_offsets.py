"""Row offsets of the loss kernels are int64: row * stride passes 2^31 once rows x D >= 2^31 (2.1M
gathered columns at D = 1024), which int32 wraps to a wrong address. Checked in the TTIR of every
loss kernel (tests/row_offsets_ttir.py); no GPU or 2^31-element tensor needed."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

LOSS_KERNELS = {
    "_row_cross_entropy_fwd_kernel",
    "_sigmoid_loss_fwd_kernel",
    "_pairwise_grad_kernel",
    "_anchor_stats_kernel",
    "_anchor_grad_kernel",
}


@pytest.fixture(scope="module")
def uses():
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "row_offsets_ttir.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return {r["kernel"]: r["uses"] for r in map(json.loads, out.stdout.splitlines())}


def test_every_loss_kernel_checked(uses):
    assert set(uses) == LOSS_KERNELS


def test_feature_rows_addressed_in_int64(uses):
    scalar_i64 = re.compile(r"tt\.addptr %\w+, %\w+ : !tt\.ptr<\w+>, i64")
    for kernel, by_arg in uses.items():
        for arg, lines in by_arg.items():
            for line in lines:
                assert scalar_i64.search(line), f"{kernel}: {arg} addressed with int32 row offsets: {line}"
        assert by_arg["a_ptr"] and by_arg["c_ptr"], f"{kernel} never reads a_ptr / c_ptr?"


def test_row_stride_beyond_int32_chunk_offsets_is_rejected():
    """Offsets inside a ROW_CHUNK-row chunk stay int32 only for row strides below MAX_ROW_STRIDE."""
    import torch

    from fastclip_kernels.ops.common.pairwise import check_row_strides
    from fastclip_kernels.ops.common.tiles import MAX_ROW_STRIDE, ROW_CHUNK

    assert (ROW_CHUNK + 256) * MAX_ROW_STRIDE < 2**31
    check_row_strides(torch.empty(2, 8))
    wide = torch.empty(1, 1).as_strided((1, 1), (MAX_ROW_STRIDE, 1))  # one row: no memory
    with pytest.raises(ValueError, match="row stride of"):
        check_row_strides(torch.empty(2, 8), wide)
