"""contrastive_loss / FastContrastiveLoss against open_clip's formula (ops/contrastive_loss/naive.py)."""

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_device
from helpers import assert_close_to_ref, assert_rel_close, grads, leaf

from fastclip_kernels import FastContrastiveLoss, contrastive_loss
from fastclip_kernels.ops.common import chunked
from fastclip_kernels.ops.contrastive_loss.naive import contrastive_loss_local_ref, contrastive_loss_ref

CHUNKED_SHAPES = [pytest.param(b, d, id=f"B{b}-D{d}") for b, d in [(1, 64), (7, 77), (127, 512), (9, 1152)]]
TRITON_SHAPES = [pytest.param(b, d, id=f"B{b}-D{d}") for b, d in [(1, 16), (7, 77), (33, 40)]]
LOW_PRECISION = [torch.float32, torch.float16, torch.bfloat16]


def features(b, d, dtype=torch.float64, normalized=True, device="cpu"):
    x, y = torch.randn(b, d, dtype=torch.float64), torch.randn(b, d, dtype=torch.float64)
    y = 0.5 * x + y  # correlated pairs, so positives stand out as in a trained model
    if normalized:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return x.to(device, dtype), y.to(device, dtype)


def loss_and_grads(fn, x, y, scale, bias=None):
    inputs = [leaf(x), leaf(y), leaf(scale), None if bias is None else leaf(bias)]
    loss = fn(*inputs)
    return loss, grads(loss, inputs)


def check_against_reference(x, y, scale, bias, backend, floor):
    """Loss and all gradients: kernel vs fp64 truth, within 2x PyTorch's own same-dtype error."""
    ours = loss_and_grads(lambda *a: contrastive_loss(*a, backend=backend), x, y, scale, bias)
    torch_same = loss_and_grads(
        contrastive_loss_ref, x, y, scale.to(x.dtype), None if bias is None else bias.to(x.dtype)
    )
    truth = loss_and_grads(
        contrastive_loss_ref, x.double(), y.double(), scale.double(), None if bias is None else bias.double()
    )
    assert_close_to_ref("loss", ours[0], truth[0], torch_same[0], floor=floor)
    n = 3 if bias is None else 4  # d_logit_bias: exactly 0 (the bias cancels in each softmax)
    for name, g, g64, gt in zip(
        ["d_image", "d_text", "d_logit_scale", "d_logit_bias"][:n], ours[1][:n], truth[1][:n],
        torch_same[1][:n], strict=True,
    ):  # fmt: skip
        assert_close_to_ref(name, g, g64, gt, floor=floor)


@pytest.mark.parametrize("b,d", CHUNKED_SHAPES)
def test_chunked_matches_open_clip_formula_fp64(b, d):
    x, y = features(b, d)
    scale, bias = torch.tensor(14.3, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    ours = loss_and_grads(lambda *a: contrastive_loss(*a, backend="chunked"), x, y, scale, bias)
    ref = loss_and_grads(contrastive_loss_ref, x, y, scale, bias)
    atol = 1e-13 * scale.item()  # the loss is a difference of terms of size ~s; B=1 gives 0
    assert_rel_close("loss", ours[0], ref[0], 1e-10, atol)
    for name, g, r in zip(["d_image", "d_text", "d_logit_scale"], ours[1][:3], ref[1][:3], strict=True):
        assert_rel_close(name, g, r, 1e-10, atol)
    # The bias shifts every logit of a softmax row equally: its exact gradient is zero.
    assert abs(ours[1][3].item()) < 1e-12


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("b,d", CHUNKED_SHAPES)
def test_chunked_low_precision_tolerance_rule(b, d, dtype):
    x, y = features(b, d, dtype)
    check_against_reference(x, y, torch.tensor(100.0), None, "chunked", floor=1e-5)


def test_chunked_fp64_gradcheck_over_several_chunks(monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 12)  # 3 rows per chunk -> 3 chunks for b=7
    x, y = (leaf(t) for t in features(7, 5, normalized=False))
    scale, bias = leaf(torch.tensor(2.5, dtype=torch.float64)), leaf(torch.tensor(0.3, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda *a: contrastive_loss(*a, backend="chunked"), (x, y, scale, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("b,d", TRITON_SHAPES)
def test_triton_kernels_tolerance_rule(b, d, dtype):
    x, y = features(b, d, dtype, device=triton_device())
    scale = torch.tensor(100.0, device=x.device)
    bias = torch.tensor(-3.0, device=x.device)
    check_against_reference(x, y, scale, bias, "triton", floor=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 tl.dot is wrong in the Triton interpreter; GPU only"
)
@pytest.mark.parametrize("b,d", [(7, 77), (257, 768)])
def test_triton_bf16_on_gpu(b, d):
    x, y = features(b, d, torch.bfloat16, device="cuda")
    check_against_reference(x, y, torch.tensor(100.0, device="cuda"), None, "triton", floor=1e-4)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_adversarial_scale_100_and_unnormalized_stay_finite(backend):
    """s = 100 with text_i = -image_i (sim - diag = 2, exp(200) overflows fp32) and norms of 3."""
    device = "cpu" if backend == "chunked" else triton_device()
    x = 3.0 * F.normalize(torch.randn(9, 24, dtype=torch.float64), dim=-1)
    x, y = x.to(device, torch.float32), (-x).to(device, torch.float32)
    scale = torch.tensor(100.0, device=device)
    loss, (gx, gy, gs, _) = loss_and_grads(lambda *a: contrastive_loss(*a, backend=backend), x, y, scale)
    ref, (rx, ry, rs, _) = loss_and_grads(contrastive_loss_ref, x.double(), y.double(), scale.double())
    for name, t in [("loss", loss), ("d_image", gx), ("d_text", gy), ("d_logit_scale", gs)]:
        assert torch.isfinite(t).all(), f"{name} is not finite"
    assert_rel_close("loss", loss, ref, 1e-5)
    assert_rel_close("d_image", gx, rx, 1e-4)
    assert_rel_close("d_text", gy, ry, 1e-4)
    assert_rel_close("d_logit_scale", gs, rs, 1e-4)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_local_rows_against_gathered_columns(backend):
    """open_clip local_loss: b local rows vs N gathered columns with labels offset by rank * b."""
    device = "cpu" if backend == "chunked" else triton_device()
    dtype = torch.float64 if backend == "chunked" else torch.float32
    all_x, all_y = features(20, 33, dtype, device=device)
    offset, b = 10, 5
    x, y = all_x[offset : offset + b], all_y[offset : offset + b]
    scale = torch.tensor(20.0, device=device, dtype=dtype)
    ours = contrastive_loss(
        x, y, scale, all_image_features=all_x, all_text_features=all_y, label_offset=offset, backend=backend
    )
    ref = contrastive_loss_local_ref(
        x.double(), y.double(), all_x.double(), all_y.double(), scale.double(), offset
    )
    assert_rel_close("local loss", ours, ref, 1e-10 if dtype == torch.float64 else 1e-5)


def test_module_matches_functional_and_output_dict():
    x, y = features(6, 32, torch.float32)
    scale = torch.tensor(50.0)
    loss_fn = FastContrastiveLoss(local_loss=True, gather_with_grad=True, cache_labels=True)
    out = loss_fn(x, y, scale, output_dict=True)
    assert set(out) == {"contrastive_loss"}
    assert torch.equal(out["contrastive_loss"], contrastive_loss(x, y, scale))
    assert_rel_close(
        "module loss",
        loss_fn(x, y, scale),
        contrastive_loss_ref(x.double(), y.double(), 50.0),
        1e-6,
        1e-6 * 50,
    )


def test_logit_scale_shape_1_and_python_float():
    x, y = features(5, 8, torch.float32)
    s = leaf(torch.tensor([30.0]))  # open_clip's nonscalar_logit_scale
    loss = contrastive_loss(x, y, s)
    (gs,) = torch.autograd.grad(loss, [s])
    assert gs.shape == (1,)
    assert torch.allclose(loss, contrastive_loss(x, y, 30.0))


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    x, y = features(3, 8, torch.float32)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        contrastive_loss(x, y, 10.0, backend="triton")
