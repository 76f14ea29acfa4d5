"""sigmoid_loss / FastSigLipLoss against open_clip's SigLipLoss formula."""

import decimal
import inspect

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_device
from helpers import assert_close_to_ref, assert_rel_close, grads, leaf
from test_contrastive_loss import CHUNKED_SHAPES, LOW_PRECISION, TRITON_SHAPES, features

from fastclip_kernels import FastContrastiveLoss, FastSigLipLoss, sigmoid_loss
from fastclip_kernels.ops.common import chunked
from fastclip_kernels.ops.sigmoid_loss import sigmoid_loss_rows_grad
from fastclip_kernels.ops.sigmoid_loss.naive import sigmoid_loss_ref


def loss_and_grads(fn, x, y, scale, bias):
    inputs = [leaf(x), leaf(y), leaf(scale), leaf(bias)]
    loss = fn(*inputs)
    return loss, grads(loss, inputs)


def check_against_reference(x, y, scale, bias, backend, floor):
    ours = loss_and_grads(lambda *a: sigmoid_loss(*a, backend=backend), x, y, scale, bias)
    torch_same = loss_and_grads(sigmoid_loss_ref, x, y, scale.to(x.dtype), bias.to(x.dtype))
    truth = loss_and_grads(sigmoid_loss_ref, x.double(), y.double(), scale.double(), bias.double())
    assert_close_to_ref("loss", ours[0], truth[0], torch_same[0], floor=floor)
    for name, g, g64, gt in zip(
        ["d_image", "d_text", "d_logit_scale", "d_logit_bias"], ours[1], truth[1], torch_same[1], strict=True
    ):
        assert_close_to_ref(name, g, g64, gt, floor=floor)


@pytest.mark.parametrize("b,d", CHUNKED_SHAPES)
def test_chunked_matches_open_clip_formula_fp64(b, d):
    x, y = features(b, d)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    ours = loss_and_grads(lambda *a: sigmoid_loss(*a, backend="chunked"), x, y, scale, bias)
    ref = loss_and_grads(sigmoid_loss_ref, x, y, scale, bias)
    assert_rel_close("loss", ours[0], ref[0], 1e-10)
    for name, g, r in zip(
        ["d_image", "d_text", "d_logit_scale", "d_logit_bias"], ours[1], ref[1], strict=True
    ):
        assert_rel_close(name, g, r, 1e-10, 1e-14)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("b,d", CHUNKED_SHAPES)
def test_chunked_low_precision_tolerance_rule(b, d, dtype):
    x, y = features(b, d, dtype)
    check_against_reference(x, y, torch.tensor(10.0), torch.tensor(-10.0), "chunked", floor=1e-5)


def test_chunked_fp64_gradcheck_over_several_chunks(monkeypatch):
    monkeypatch.setattr(chunked, "BLOCK_ELEMENTS", 12)
    x, y = (leaf(t) for t in features(7, 5, normalized=False))
    scale, bias = leaf(torch.tensor(2.5, dtype=torch.float64)), leaf(torch.tensor(-1.0, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda *a: sigmoid_loss(*a, backend="chunked"), (x, y, scale, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("b,d", TRITON_SHAPES)
def test_triton_kernels_tolerance_rule(b, d, dtype):
    x, y = features(b, d, dtype, device=triton_device())
    scale, bias = torch.tensor(10.0, device=x.device), torch.tensor(-10.0, device=x.device)
    check_against_reference(x, y, scale, bias, "triton", floor=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 tl.dot is wrong in the Triton interpreter; GPU only"
)
def test_triton_bf16_on_gpu():
    x, y = features(257, 768, torch.bfloat16, device="cuda")
    s, b = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")
    check_against_reference(x, y, s, b, "triton", floor=1e-4)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_gathered_columns_with_label_offset(backend):
    device = "cpu" if backend == "chunked" else triton_device()
    dtype = torch.float64 if backend == "chunked" else torch.float32
    all_x, all_y = features(20, 24, dtype, device=device)
    offset, b = 15, 5
    x, y = all_x[offset : offset + b], all_y[offset : offset + b]
    s, bias = torch.tensor(10.0, device=device, dtype=dtype), torch.tensor(-5.0, device=device, dtype=dtype)
    ours = sigmoid_loss(x, y, s, bias, all_text_features=all_y, label_offset=offset, backend=backend)
    ref = sigmoid_loss_ref(x.double(), all_y.double(), s.double(), bias.double(), label_offset=offset)
    assert_rel_close("loss", ours, ref, 1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_large_logits_stay_finite(backend):
    device = "cpu" if backend == "chunked" else triton_device()
    x = 3.0 * F.normalize(torch.randn(9, 24), dim=-1).to(device)
    s, bias = torch.tensor(100.0, device=device), torch.tensor(-10.0, device=device)
    loss, gs = loss_and_grads(lambda *a: sigmoid_loss(*a, backend=backend), x, -x, s, bias)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in gs)
    ref = sigmoid_loss_ref(x.double(), -x.double(), s.double(), bias.double())
    assert_rel_close("loss", loss, ref, 1e-5)


def _softplus_decimal(z: float) -> float:
    """log(1 + e^z) in 400-digit decimals (1 + e^-700 must not round to 1): an independent fp64 reference."""
    with decimal.localcontext() as ctx:
        ctx.prec = 400
        return float((decimal.Decimal(z).exp() + 1).ln())


def test_softplus_is_exact_where_torch_softplus_is_not():
    """Against exact decimals, to 1 ulp: softplus(25) = 25 + 1.4e-11 (torch's threshold=20 returns
    25), softplus(-30) = 9.4e-14 (log(1 + e^z) in fp64 loses 3 digits there), and moderate values."""
    values = [25.0, 40.0, -30.0, -700.0, 0.5, -3.0, 0.0, 700.0]
    z = torch.tensor(values, dtype=torch.float64)
    want = torch.tensor([_softplus_decimal(v) for v in values], dtype=torch.float64)
    ulp = torch.finfo(torch.float64).eps
    assert ((chunked.softplus(z) - want).abs() <= ulp * want.abs()).all(), (chunked.softplus(z) - want) / want
    assert (F.softplus(z) - want).abs().max() > 1e-12  # the source we do not follow here


def test_module_output_dict_and_missing_bias():
    x, y = features(4, 16, torch.float32)
    loss_fn = FastSigLipLoss(cache_labels=True, dist_impl="bidir")
    out = loss_fn(x, y, torch.tensor(10.0), torch.tensor(-10.0), output_dict=True)
    assert torch.equal(out["contrastive_loss"], sigmoid_loss(x, y, 10.0, -10.0))
    with pytest.raises(ValueError, match="logit_bias"):
        loss_fn(x, y, torch.tensor(10.0))


# open_clip's current constructor arguments, in order, with their defaults (src/open_clip/loss.py at
# mlfoundations/open_clip 89fb801, 2026-06-27): a positional call written for open_clip must bind the same.
OPEN_CLIP_SIGLIP_ARGS = dict(cache_labels=False, rank=0, world_size=1, dist_impl=None, chunk_size=0)
OPEN_CLIP_CLIP_ARGS = dict(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1)
OPEN_CLIP_FORWARD = ["image_features", "text_features", "logit_scale", "logit_bias", "output_dict"]


@pytest.mark.parametrize(
    "cls, args", [(FastSigLipLoss, OPEN_CLIP_SIGLIP_ARGS), (FastContrastiveLoss, OPEN_CLIP_CLIP_ARGS)]
)
def test_constructor_and_forward_take_open_clips_current_arguments(cls, args):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    positional = [p for p in params if p.kind == p.POSITIONAL_OR_KEYWORD][: len(args)]
    assert [(p.name, p.default) for p in positional] == list(args.items())
    assert list(inspect.signature(cls.forward).parameters)[1:] == OPEN_CLIP_FORWARD


def test_every_dist_impl_and_chunk_size_gives_the_same_bits():
    x, y = features(6, 16, torch.float32)
    s, b = torch.tensor(10.0), torch.tensor(-10.0)
    want = FastSigLipLoss()(x, y, s, b)
    for impl in (None, "bidir", "shift", "reduce", "gather"):
        for chunk_size in (0, 1, 4, 1000):
            loss_fn = FastSigLipLoss(True, 0, 1, impl, chunk_size)  # open_clip's positional order
            assert loss_fn.dist_impl == (impl or "bidir") and loss_fn.chunk_size == chunk_size
            assert torch.equal(loss_fn(x, y, s, b), want)
    assert FastSigLipLoss(bidir=False).dist_impl == "shift"  # open_clip 2023's flag


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_row_gradient_op_matches_autograd_of_the_sum(backend):
    """sigmoid_loss_rows_grad (the distributed backward's op): dA, ds, dbeta of g * sum, no dC."""
    device = "cpu" if backend == "chunked" else triton_device()
    dtype = torch.float64 if backend == "chunked" else torch.float32
    all_x, all_y = features(37, 40, torch.float64)
    a, offset = all_x[9:29], 9  # 20 rows, 37 columns: crosses the 16-row / 16-column tiles
    s, beta, g = (torch.tensor(v, dtype=torch.float64) for v in (7.0, -4.0, 0.3))
    inputs = [leaf(a), leaf(s), leaf(beta)]
    ref = g * sigmoid_loss_ref(inputs[0], all_y, inputs[1], inputs[2], offset) * a.shape[0]
    want = grads(ref, inputs)
    cast = [t.to(device, dtype) for t in (g, a, all_y, s, beta)]
    got = sigmoid_loss_rows_grad(*cast, label_offset=offset, backend=backend)
    assert got[0].dtype == dtype and got[0].shape == a.shape
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, gv, wv in zip(["d_rows", "d_logit_scale", "d_logit_bias"], got, want, strict=True):
        assert_rel_close(name, gv, wv, rtol)
