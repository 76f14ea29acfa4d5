"""Distributed SigLIP loss: ONE no-grad all-gather of [image | text], NO collective in the backward.

Global batch of n = K b pairs, rank k holds rows o .. o + b - 1 (o = k b), z_ij = s <x_i, y_j> + beta,
W_ij = sigmoid(z_ij) - [j = i]. Rank k returns open_clip ``SigLipLoss``'s value on that rank,

    L_k = 1/b sum_{i local} sum_{j < n} softplus(-y_ij z_ij)      (mean over ranks = the global loss),

and the gradients open_clip's neighbour exchange leaves on it (after its backward exchanges), computed
from the gathered X, Y [n, D] without communicating:

    dL/dx_i = s/b sum_{j < n} W_ij y_j         (local rows against all texts: the row pass),
    dL/dy_j = s/b sum_{i < n} W_ij x_i         (all images against local texts: the same pass on
                                                y against X, as W^T is W of the swapped problem),
    dL/ds, dL/dbeta: the local rows' terms, 1/b sum_{i local, j} W_ij (<x_i, y_j>, 1).

After DDP's mean over ranks every parameter gets exactly the single-process global-batch gradient.
Bytes sent per rank: 2 (K-1) b D s forward (s = bytes per element), 0 backward; open_clip's
'bidir' / 'shift' send (K-1) b D s forward and the same again in the backward, in 2 (K-1) or
(K-1) sequential exchanges. Compute per rank: one [b, n] pass forward, two in the backward.
"""

import torch
import torch.distributed as dist

from .._validation import as_scalar_tensor, check_features, check_same_batch, scalar_dtype
from ..ops.common import resolve_backend
from ..ops.sigmoid_loss import sigmoid_loss_rows_grad, sigmoid_loss_sum
from .gather import all_gather_packed

#: open_clip ``SigLipLoss(dist_impl=...)`` names; here all run the one gather above (same result).
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def check_process_group(rank: int, world_size: int, group=None) -> None:
    """``rank`` / ``world_size`` must describe ``group`` (host-side, no device work)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"world_size={world_size} needs an initialized torch.distributed process group")
    size, actual = dist.get_world_size(group), dist.get_rank(group)
    if (size, actual) != (world_size, rank):
        raise ValueError(
            f"rank={rank}, world_size={world_size} do not match the process group (rank {actual} of {size})"
        )


class _GlobalSigmoidGrad(torch.autograd.Function):
    """forward(x, y, scale, bias, X, Y, rank, backend) -> L_k; backward: two row passes, no collective."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, X, Y, rank, backend):
        b = x.shape[0]
        ctx.save_for_backward(x, y, scale, bias, X, Y)
        ctx.config = (rank * b, backend)
        return sigmoid_loss_sum(x, Y, scale, bias, label_offset=rank * b, backend=backend) / b

    @staticmethod
    def backward(ctx, grad_out):
        x, y, scale, bias, X, Y = ctx.saved_tensors
        offset, backend = ctx.config
        g = grad_out / x.shape[0]
        kw = dict(label_offset=offset, backend=backend)
        grad_x, ds, db = sigmoid_loss_rows_grad(g, x, Y, scale, bias, **kw)
        grad_y = sigmoid_loss_rows_grad(g, y, X, scale, bias, **kw)[0] if ctx.needs_input_grad[1] else None
        grad_scale = ds.reshape(scale.shape).to(scale.dtype) if ctx.needs_input_grad[2] else None
        grad_bias = db.reshape(bias.shape).to(bias.dtype) if ctx.needs_input_grad[3] else None
        return grad_x, grad_y, grad_scale, grad_bias, None, None, None, None


def sigmoid_loss_global(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias,
    *,
    rank: int,
    world_size: int,
    group=None,
    backend: str = "auto",
) -> torch.Tensor:
    """SigLIP over the global batch of ``world_size`` ranks (call on every rank; math in the module doc).

    Args:
        image_features, text_features (torch.Tensor): [b, D] local pairs, same b on every rank.
        logit_scale, logit_bias (torch.Tensor | float): 0-d or [1] s (> 0) and beta.
        rank, world_size (int): this rank and K, as in ``group`` (None: the default group).
        backend (str): "auto", "triton" or "chunked".
    Returns:
        0-d tensor (fp32; fp64 for fp64 features): open_clip's per-rank SigLIP value L_k. Gradients
        as open_clip's after its backward exchanges; after DDP's mean, the global-batch gradient.

    Example (on every rank):
        >>> loss = sigmoid_loss_global(img, txt, scale, bias, rank=dist.get_rank(), world_size=K)
    """
    check_features("image_features", image_features)
    dim, device, dtype = image_features.shape[1], image_features.device, image_features.dtype
    check_features("text_features", text_features, dim, device, dtype)
    check_same_batch("text_features", text_features, "image_features", image_features)
    if logit_bias is None:
        raise ValueError("logit_bias is required for the sigmoid loss (SigLIP init: -10)")
    scale = as_scalar_tensor("logit_scale", logit_scale, device, scalar_dtype(dtype), positive=True)
    bias = as_scalar_tensor("logit_bias", logit_bias, device, scalar_dtype(dtype))
    check_process_group(rank, world_size, group)
    backend = resolve_backend(backend, image_features)
    X, Y = all_gather_packed([image_features, text_features], group=group)
    return _GlobalSigmoidGrad.apply(image_features, text_features, scale, bias, X, Y, rank, backend)


__all__ = ["DIST_IMPLS", "check_process_group", "sigmoid_loss_global"]
