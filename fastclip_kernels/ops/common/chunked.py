"""Shared PyTorch chunk math of the pairwise losses and the per-anchor ops (CPU algorithms).

Rows of A are processed ``chunk`` at a time against all of C, so the largest temporary is
[chunk, N] and memory stays O((M + N) * D + chunk * N). ``pairwise_bwd`` recomputes each
[chunk, N] block once and emits dA, dC, ds and dbeta for any dL/dz given as a weight function.
"""

import torch

#: Elements in one [chunk, N] logit block (16 MiB in fp32): small next to a materialized
#: [M, N] matrix, big enough that each block is a well-shaped matmul.
BLOCK_ELEMENTS = 1 << 22


def softplus(z: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(z)), exact to rounding for all z (torch's softplus turns linear above 20)."""
    return z.clamp(min=0) + torch.log1p(torch.exp(-z.abs()))


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_chunks(M: int, N: int, chunk: int | None):
    step = chunk or max(1, BLOCK_ELEMENTS // max(N, 1))
    return [(i, min(i + step, M)) for i in range(0, M, step)]


def logits(a_blk, c, scale, bias):
    dot = a_blk @ c.T
    z = dot * scale
    return dot, (z + bias if bias is not None else z)


def positives(z_blk, i0, i1, label_offset):
    """(rows, cols) index of the positives in a [i1 - i0, N] block: column i + label_offset."""
    rows = torch.arange(i1 - i0, device=z_blk.device)
    return rows, rows + i0 + label_offset


def cast(a, c, scale, bias):
    acc = accum_dtype(a.dtype)
    return a.to(acc), c.to(acc), scale.to(acc), (bias.to(acc) if bias is not None else None)


def pairwise_bwd(a, c, scale, bias, weight_fn, chunk: int | None = None):
    """(dA, dC, ds, dbeta) for dL/dz_ij = weight_fn(z_blk, i0, i1), one recompute per block.

    weight_fn gets the [i1 - i0, N] logit block (accumulation dtype) and its row range.
    """
    a32, c32, scale32, bias32 = cast(a, c, scale, bias)
    grad_a = torch.empty_like(a32)
    grad_c = torch.zeros_like(c32)
    dscale = a32.new_zeros(())
    dbias = a32.new_zeros(())
    for i0, i1 in row_chunks(a.shape[0], c.shape[0], chunk):
        dot, z = logits(a32[i0:i1], c32, scale32, bias32)
        w = weight_fn(z, i0, i1)
        grad_a[i0:i1] = (w @ c32) * scale32
        grad_c.addmm_(w.T, a32[i0:i1], alpha=1.0)
        dscale = dscale + (w * dot).sum()
        dbias = dbias + w.sum()
    grad_c.mul_(scale32)
    return grad_a.to(a.dtype), grad_c.to(c.dtype), dscale, dbias
