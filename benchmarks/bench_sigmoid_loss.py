"""SigLIP sigmoid loss: materialized open_clip formula vs ours (time, peak memory, TFLOP/s).

Same harness and shapes as bench_contrastive_loss.py; b local rows against N text columns.
"""

import pytest
import torch
import torch.nn.functional as F
from bench_contrastive_loss import CPU_SHAPES, GPU_SHAPES, needs_gpu
from harness import fwd_bwd_callable, run_loss_benchmark

from fastclip_kernels import sigmoid_loss
from fastclip_kernels.ops.sigmoid_loss.naive import sigmoid_loss_ref


def make_case(provider, b, n, d, dtype, mode, dev):
    dtype = getattr(torch, dtype)
    grad = mode != "fwd"
    x = F.normalize(torch.randn(b, d, device=dev), dim=-1).to(dtype).requires_grad_(grad)
    Y = F.normalize(torch.randn(n, d, device=dev), dim=-1).to(dtype).requires_grad_(grad)
    s = torch.tensor(10.0, device=dev, requires_grad=grad)
    bias = torch.tensor(-10.0, device=dev, requires_grad=grad)
    if provider == "fastclip":

        def loss_fn(x, Y, s, bias):
            return sigmoid_loss(x, Y[:b], s, bias, all_text_features=Y)
    else:
        loss_fn = sigmoid_loss_ref
    return fwd_bwd_callable(loss_fn, (x, Y, s, bias), mode)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shapes; the GPU runs the GPU shapes")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["materialized", "fastclip"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: f"b{s[0]}-N{s[1]}-d{s[2]}")
def test_sigmoid_loss_cpu(benchmark, record, shape, provider, mode):
    run_loss_benchmark(benchmark, record, "sigmoid_loss", make_case, provider, shape, "float32", mode, 3)


@needs_gpu
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["materialized", "fastclip"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"b{s[0]}-N{s[1]}-d{s[2]}")
def test_sigmoid_loss_gpu(benchmark, record, shape, provider, mode):
    run_loss_benchmark(benchmark, record, "sigmoid_loss", make_case, provider, shape, "bfloat16", mode, 10)
