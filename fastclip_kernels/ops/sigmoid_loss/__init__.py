"""SigLIP sigmoid loss on tiled sums: open_clip ``SigLipLoss`` math, O((b+N)*D) memory.

With labels y_ij = +1 on the positives (j = o + i) and -1 elsewhere, and z = s X Y^T + beta,

    L = -1/b sum_ij logsigmoid(y_ij z_ij) = 1/b sum_ij softplus(-y_ij z_ij)

one tiled sum over the [b, N] pairs; its gradient W_ij = sigmoid(z_ij) - [y_ij = 1] is formed in fp32
inside the kernel. (torch's F.softplus turns linear above 20, off by exp(-20); ours is exact.)

Files: ``triton.py`` (kernel, ``sigmoid_loss_fwd`` / ``_bwd``), ``chunked.py`` (CPU algorithm, same
contract), ``naive.py`` (``sigmoid_loss_ref``). Registered ops (fake implementation and autograd):

    fastclip::sigmoid_loss_fwd(a, c, scale, bias?, label_offset, backend) -> total []
    fastclip::sigmoid_loss_bwd(g, a, c, scale, bias?, label_offset, backend)
        -> (grad_a, grad_c, dscale [], dbias [])
    fastclip::sigmoid_loss_rows_bwd(g, a, c, scale, bias?, label_offset, backend)
        -> (grad_a, dscale [], dbias [])   (no grad_c: the distributed loss's backward)
"""

import torch
from torch import Tensor

from ..._validation import as_scalar_tensor, check_features, check_same_batch, scalar_dtype
from ..common import resolve_backend, rows_contiguous
from . import chunked


def _impl(backend: str):
    if backend == "triton":
        from . import triton

        return triton
    return chunked


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("fastclip::sigmoid_loss_fwd", mutates_args=())
def _fwd_op(
    a: Tensor, c: Tensor, scale: Tensor, bias: Tensor | None, label_offset: int, backend: str
) -> Tensor:
    a, c = rows_contiguous(a), rows_contiguous(c)
    return _impl(backend).sigmoid_loss_fwd(a, c, scale, bias, label_offset).reshape(()).to(_acc(a.dtype))


@_fwd_op.register_fake
def _(a, c, scale, bias, label_offset, backend):
    return a.new_empty((), dtype=_acc(a.dtype))


@torch.library.custom_op("fastclip::sigmoid_loss_bwd", mutates_args=())
def _bwd_op(
    g: Tensor, a: Tensor, c: Tensor, scale: Tensor, bias: Tensor | None, label_offset: int, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a, c = rows_contiguous(a), rows_contiguous(c)
    acc = _acc(a.dtype)
    grad_a, grad_c, ds, db = _impl(backend).sigmoid_loss_bwd(
        g.reshape(()).to(acc), a, c, scale, bias, label_offset
    )
    return grad_a, grad_c, ds.reshape(()).to(acc).clone(), db.reshape(()).to(acc).clone()  # 0-d: distinct


@_bwd_op.register_fake
def _(g, a, c, scale, bias, label_offset, backend):
    acc = _acc(a.dtype)
    return torch.empty_like(a), torch.empty_like(c), a.new_empty((), dtype=acc), a.new_empty((), dtype=acc)


@torch.library.custom_op("fastclip::sigmoid_loss_rows_bwd", mutates_args=())
def _rows_bwd_op(
    g: Tensor, a: Tensor, c: Tensor, scale: Tensor, bias: Tensor | None, label_offset: int, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    a, c = rows_contiguous(a), rows_contiguous(c)
    acc = _acc(a.dtype)
    grad_a, ds, db = _impl(backend).sigmoid_loss_rows_bwd(
        g.reshape(()).to(acc), a, c, scale, bias, label_offset
    )
    return grad_a, ds.reshape(()).to(acc).clone(), db.reshape(()).to(acc).clone()


@_rows_bwd_op.register_fake
def _(g, a, c, scale, bias, label_offset, backend):
    acc = _acc(a.dtype)
    return torch.empty_like(a), a.new_empty((), dtype=acc), a.new_empty((), dtype=acc)


def _setup_context(ctx, inputs, output) -> None:
    a, c, scale, bias, label_offset, backend = inputs
    ctx.save_for_backward(a, c, scale, bias)
    ctx.config = (label_offset, backend)


def _grad_like(grad: Tensor, ref: Tensor | None):
    return None if ref is None else grad.reshape(ref.shape).to(ref.dtype)


def _backward(ctx, g):
    a, c, scale, bias = ctx.saved_tensors
    grad_a, grad_c, ds, db = torch.ops.fastclip.sigmoid_loss_bwd(g, a, c, scale, bias, *ctx.config)
    return grad_a, grad_c, _grad_like(ds, scale), _grad_like(db, bias), None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def sigmoid_loss_sum(a, c, logit_scale, logit_bias, *, label_offset=0, backend="auto"):
    """sum_ij softplus(-y_ij z_ij) with y_ij = +1 iff j = i + label_offset, else -1 (0-d tensor).

    Args:
        a (torch.Tensor): [M, D] rows; c (torch.Tensor): [N, D] columns, same dtype and device.
        logit_scale, logit_bias (torch.Tensor): 0-d or [1] s and beta, z = s * a @ c.T + beta.
        backend (str): "auto", "triton" or "chunked" (``ops.common``).
    Returns:
        0-d fp32 (fp64 for fp64 inputs): SigLIP's -sum_ij logsigmoid(y_ij z_ij).
    """
    backend = resolve_backend(backend, a)
    return torch.ops.fastclip.sigmoid_loss_fwd(a, c, logit_scale, logit_bias, label_offset, backend)


def sigmoid_loss_rows_grad(g, a, c, logit_scale, logit_bias, *, label_offset=0, backend="auto"):
    """Row gradient of g * :func:`sigmoid_loss_sum` without the column pass: (grad_a [M, D] in a's
    dtype, ds [], dbeta [] in fp32 / fp64). Tensors as in ``sigmoid_loss_sum``; g: 0-d."""
    backend = resolve_backend(backend, a)
    return torch.ops.fastclip.sigmoid_loss_rows_bwd(g, a, c, logit_scale, logit_bias, label_offset, backend)


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    all_text_features: torch.Tensor | None = None,
    label_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Sigmoid (SigLIP) loss of paired features, without the [b, N] logit matrix.

    Args:
        image_features (torch.Tensor): [b, D] fp16/bf16/fp32/fp64.
        text_features (torch.Tensor): [b, D]; row i is the positive of image i.
        logit_scale (torch.Tensor | float): 0-d or [1] exponentiated scale s.
        logit_bias (torch.Tensor | float): 0-d or [1] bias beta (SigLIP init: -10).
        all_text_features (torch.Tensor, optional): [N, D] columns (e.g. all ranks' texts); the
            positive of image i is column ``label_offset + i``, which must be text i. Default:
            ``text_features``.
        backend: "auto", "triton" or "chunked" (see :func:`contrastive_loss`).
    Returns:
        0-d tensor, fp32 (fp64 for fp64 inputs): sum over all pairs divided by b, as open_clip.

    Example:
        >>> x, y = torch.randn(8, 64), torch.randn(8, 64)
        >>> loss = sigmoid_loss(x, y, torch.tensor(10.0), torch.tensor(-10.0))
    """
    check_features("image_features", image_features)
    dim, device, dtype = image_features.shape[1], image_features.device, image_features.dtype
    check_features("text_features", text_features, dim, device, dtype)
    check_same_batch("text_features", text_features, "image_features", image_features)
    if logit_bias is None:
        raise ValueError("logit_bias is required for the sigmoid loss (SigLIP init: -10)")
    scale = as_scalar_tensor("logit_scale", logit_scale, device, scalar_dtype(dtype), positive=True)
    bias = as_scalar_tensor("logit_bias", logit_bias, device, scalar_dtype(dtype))
    columns = text_features
    if all_text_features is not None:
        check_features("all_text_features", all_text_features, dim, device, dtype)
        b, n = image_features.shape[0], all_text_features.shape[0]
        if not isinstance(label_offset, int) or not 0 <= label_offset <= n - b:
            raise ValueError(f"label_offset must be an int in [0, {n - b}]; got {label_offset!r}")
        columns = all_text_features
    elif label_offset != 0:
        raise ValueError("label_offset needs all_text_features")
    total = sigmoid_loss_sum(image_features, columns, scale, bias, label_offset=label_offset, backend=backend)
    return total / image_features.shape[0]
