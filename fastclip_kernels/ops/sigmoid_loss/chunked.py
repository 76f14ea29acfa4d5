"""Chunked PyTorch algorithm of the sigmoid loss (CPU tensors, fp64): same contract as ``triton.py``."""

import torch

from ..common.chunked import cast, logits, pairwise_bwd, positives, row_chunks, softplus


def sigmoid_loss_fwd(a, c, scale, bias, label_offset: int, chunk: int | None = None):
    """sum_ij softplus(-y_ij z_ij), y_ij = +1 iff j = i + label_offset, as a 0-d tensor."""
    a, c, scale, bias = cast(a, c, scale, bias)
    total = a.new_zeros(())
    for i0, i1 in row_chunks(a.shape[0], c.shape[0], chunk):
        _, z = logits(a[i0:i1], c, scale, bias)
        pos = positives(z, i0, i1, label_offset)
        z[pos] = -z[pos]
        total = total + softplus(z).sum()
    return total


def sigmoid_weight(label_offset, g):
    """weight_fn for g * sum_ij softplus(-y_ij z_ij)."""

    def weight(z, i0, i1):
        w = g.to(z.dtype) * torch.sigmoid(z)
        w[positives(z, i0, i1, label_offset)] -= g.to(z.dtype)
        return w

    return weight


def sigmoid_loss_bwd(g, a, c, scale, bias, label_offset: int):
    """(grad_a, grad_c, ds, dbeta) of g * sum_ij softplus(-y_ij z_ij)."""
    return pairwise_bwd(a, c, scale, bias, sigmoid_weight(label_offset, g))


def sigmoid_loss_rows_bwd(g, a, c, scale, bias, label_offset: int):
    """(grad_a, ds, dbeta) of g * sum_ij softplus(-y_ij z_ij): the row gradient only (no dC GEMM)."""
    a32, c32, scale32, bias32 = cast(a, c, scale, bias)
    weight = sigmoid_weight(label_offset, g)
    grad_a = torch.empty_like(a32)
    dscale, dbias = a32.new_zeros(()), a32.new_zeros(())
    for i0, i1 in row_chunks(a.shape[0], c.shape[0], None):
        dot, z = logits(a32[i0:i1], c32, scale32, bias32)
        w = weight(z, i0, i1)
        grad_a[i0:i1] = (w @ c32) * scale32
        dscale, dbias = dscale + (w * dot).sum(), dbias + w.sum()
    return grad_a.to(a.dtype), dscale, dbias
