"""Bad input raises ValueError/TypeError naming the argument, and leaves the inputs untouched."""

import math

import pytest
import torch

from fastclip_kernels import FastContrastiveLoss, FastSigLipLoss, contrastive_loss, sigmoid_loss
from fastclip_kernels.ops.common import resolve_backend
from fastclip_kernels.ops.contrastive_loss import similarity_cross_entropy

X, Y = torch.randn(4, 8), torch.randn(4, 8)
S = torch.tensor(10.0)

BAD_CALLS = [
    ("batch mismatch", dict(text_features=torch.randn(5, 8)), ValueError, "text_features has batch 5"),
    ("dim mismatch", dict(text_features=torch.randn(4, 7)), ValueError, "text_features has feature dim 7"),
    ("rank 3", dict(image_features=torch.randn(2, 4, 8)), ValueError, "image_features must be 2-D"),
    ("rank 1", dict(text_features=torch.randn(8)), ValueError, "text_features must be 2-D"),
    (
        "dtype mismatch",
        dict(text_features=torch.randn(4, 8, dtype=torch.float64)),
        TypeError,
        "text_features has dtype",
    ),
    (
        "int features",
        dict(image_features=torch.ones(4, 8, dtype=torch.int64)),
        TypeError,
        "image_features must be fp16",
    ),
    (
        "not a tensor",
        dict(image_features=[[1.0] * 8] * 4),
        TypeError,
        "image_features must be a torch.Tensor",
    ),
    (
        "empty batch",
        dict(image_features=torch.randn(0, 8), text_features=torch.randn(0, 8)),
        ValueError,
        "non-empty",
    ),
    ("nan scale", dict(logit_scale=torch.tensor(float("nan"))), ValueError, "logit_scale must be finite"),
    ("inf scale float", dict(logit_scale=math.inf), ValueError, "logit_scale must be finite"),
    ("vector scale", dict(logit_scale=torch.ones(2)), ValueError, "logit_scale must have one element"),
    ("str scale", dict(logit_scale="10"), TypeError, "logit_scale must be a float"),
    ("nan bias", dict(logit_bias=torch.tensor(float("inf"))), ValueError, "logit_bias must be finite"),
    ("negative scale", dict(logit_scale=torch.tensor(-5.0)), ValueError, "logit_scale must be > 0"),
    ("zero scale float", dict(logit_scale=0.0), ValueError, "logit_scale must be > 0"),
    ("negative scale int", dict(logit_scale=-5), ValueError, "logit_scale must be > 0"),
]


def _call(fn, overrides):
    args = dict(image_features=X, text_features=Y, logit_scale=S, logit_bias=torch.tensor(-1.0))
    args.update(overrides)
    return fn(**args)


@pytest.mark.parametrize("fn", [contrastive_loss, sigmoid_loss], ids=["clip", "siglip"])
@pytest.mark.parametrize("case,overrides,err,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_names_the_argument(fn, case, overrides, err, match):
    before = [t.clone() for t in (X, Y, S)]
    with pytest.raises(err, match=match):
        _call(fn, overrides)
    assert all(torch.equal(a, b) for a, b in zip(before, (X, Y, S), strict=True)), "inputs were modified"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA)")
def test_device_mismatch():
    with pytest.raises(ValueError, match="text_features is on"):
        contrastive_loss(X.cuda(), Y, S.cuda())
    with pytest.raises(ValueError, match="logit_scale is on"):  # a 0-d CPU tensor is accepted
        contrastive_loss(X.cuda(), Y.cuda(), S.reshape(1))


def test_device_mismatch_on_meta_device():
    """The same check without a GPU: the meta device stands in for a second device."""
    with pytest.raises(ValueError, match="text_features is on meta"):
        contrastive_loss(X, Y.to("meta"), S)
    with pytest.raises(ValueError, match="logit_scale is on meta"):
        contrastive_loss(X, Y, S.to("meta"))


def test_gathered_arguments():
    all_x, all_y = torch.randn(12, 8), torch.randn(12, 8)
    with pytest.raises(ValueError, match="label_offset must be an int in \\[0, 8\\]"):
        contrastive_loss(X, Y, S, all_image_features=all_x, all_text_features=all_y, label_offset=9)
    with pytest.raises(ValueError, match="pass both"):
        contrastive_loss(X, Y, S, all_image_features=all_x)
    with pytest.raises(ValueError, match="all_text_features has batch"):
        contrastive_loss(X, Y, S, all_image_features=all_x, all_text_features=all_y[:11])
    with pytest.raises(ValueError, match="label_offset needs"):
        contrastive_loss(X, Y, S, label_offset=2)
    with pytest.raises(ValueError, match="label_offset must be"):
        sigmoid_loss(X, Y, S, -1.0, all_text_features=all_y, label_offset=-1)


def test_backend_and_square_checks():
    with pytest.raises(ValueError, match="backend must be one of"):
        contrastive_loss(X, Y, S, backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' supports"):
        resolve_backend("triton", X.double())
    with pytest.raises(ValueError, match="cols=True needs a square problem"):
        similarity_cross_entropy(X, torch.randn(5, 8), S)


def test_module_constructor_arguments():
    with pytest.raises(ValueError, match="use_horovod"):
        FastContrastiveLoss(use_horovod=True)
    with pytest.raises(ValueError, match="use_horovod"):
        FastSigLipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank must be"):
        FastContrastiveLoss(rank=1, world_size=1)
    x = torch.randn(4, 8)
    for loss_fn in (FastContrastiveLoss(rank=0, world_size=2), FastSigLipLoss(rank=0, world_size=2)):
        with pytest.raises(ValueError, match="needs an initialized torch.distributed"):
            loss_fn(x, x, 10.0, -10.0)
    with pytest.raises(ValueError, match="dist_impl must be None or one of"):
        FastSigLipLoss(dist_impl="ring")
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="chunk_size must be an int >= 0"):
            FastSigLipLoss(chunk_size=bad)


def test_cpu_scalar_logit_scale_with_features_on_another_device():
    """open_clip's ``logit_scale * x @ y.T`` takes a 0-d CPU tensor with CUDA features; so do we
    (meta features stand in for CUDA). Its value is still checked on the host."""
    xm, ym = X.to("meta"), Y.to("meta")
    scale, bias = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0)
    losses = [
        contrastive_loss(xm, ym, scale, bias),
        sigmoid_loss(xm, ym, scale, bias),
        FastContrastiveLoss()(xm, ym, scale, bias),
        FastSigLipLoss()(xm, ym, scale, bias),
    ]
    for loss in losses:
        assert loss.device.type == "meta" and loss.shape == () and loss.requires_grad
    for fn in (contrastive_loss, sigmoid_loss):
        with pytest.raises(ValueError, match="logit_scale must be > 0"):
            fn(xm, ym, torch.tensor(-5.0), bias)
        with pytest.raises(ValueError, match="logit_scale is on cpu"):  # only 0-d, as in torch
            fn(xm, ym, torch.tensor([10.0]), bias)
