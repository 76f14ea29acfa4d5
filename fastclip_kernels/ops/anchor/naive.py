"""Dense plain-PyTorch references of the per-anchor ops (materialized [M, N] dots): the spec.

fp64-capable; tests compare both backends with them. Conventions as ``anchor/__init__.py``.
"""

import torch


def _positive(m: int, n: int, label_offset: int, device) -> torch.Tensor:
    return torch.arange(n, device=device)[None, :] == (torch.arange(m, device=device) + label_offset)[:, None]


def anchor_stats_ref(a, c, row_scale, label_offset=0, exclude_positive=True):
    """(lse [M], mean_dot [M], pos_dot [M]) over all candidates (``exclude_positive``: but the positive)."""
    dot = a @ c.T
    pos = _positive(a.shape[0], c.shape[0], label_offset, a.device)
    z = dot * row_scale[:, None]
    if exclude_positive:
        z = z.masked_fill(pos, float("-inf"))
    lse = torch.logsumexp(z, dim=1)
    mean_dot = (torch.softmax(z, dim=1) * dot).sum(dim=1)
    return lse, mean_dot, (dot * pos).sum(dim=1)


def anchor_grad_ref(a, c, pos_coef, row=None, col=None, label_offset=0, exclude_positive=True):
    """grad_a = W @ C with W_ij = [j in S_i](row.coef_i e^{row.scale_i P_ij - row.shift_i} +
    col.coef_j e^{col.scale_j P_ij - col.shift_j}) + [j = i + o] pos_coef_i."""
    dot = a @ c.T
    w = torch.zeros_like(dot)
    if row is not None:
        scale, shift, coef = (t[:, None].to(dot.dtype) for t in row)
        w = w + coef * torch.exp(scale * dot - shift)
    if col is not None:
        scale, shift, coef = (t[None, :].to(dot.dtype) for t in col)
        w = w + coef * torch.exp(scale * dot - shift)
    pos = _positive(a.shape[0], c.shape[0], label_offset, a.device)
    if exclude_positive:
        w = w.masked_fill(pos, 0.0)
    return (w + pos * pos_coef[:, None].to(dot.dtype)) @ c
