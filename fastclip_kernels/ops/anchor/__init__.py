"""Per-anchor statistics and gradients of global contrastive losses, tile by tile (no autograd).

Each row a_i of A [M, D] is an *anchor*; its candidates are the rows c_j of C [N, D]; its positive
is column ``i + label_offset``. With P_ij = <a_i, c_j> and per-row scales s_i (1/tau_i):

    anchor_stats:  over S_i = {j != i + o} (``exclude_positive``, FastCLIP's g) or all j (InfoNCE)
        lse_i      = log sum_{j in S_i} exp(s_i P_ij)
        mean_dot_i = sum_{j in S_i} softmax_j(s_i P_i.) P_ij        (d lse_i / d s_i)
        pos_dot_i  = P_{i, i+o}

    anchor_grad:   grad_a_i = sum_j W_ij c_j with
        W_ij = [j in S_i] ( row.coef_i exp(row.scale_i P_ij - row.shift_i)
                          + col.coef_j exp(col.scale_j P_ij - col.shift_j) )
             + [j = i + o] pos_coef_i

The row term is the gradient of the local anchors' own losses; the column term is that of the
*columns'* losses (every global anchor j) in which a_i appears as a negative. This is how the
FastCLIP surrogate's two passes become one kernel per modality with no collective in backward.
Shifts are log-normalizers chosen by the caller so every exp is bounded (no overflow at s=100).

Both ops check, from shapes alone (no host sync, fake implementations too), that label_offset is an
int in [0, N - M] (the only index they take: every positive must be a column of C) and that each
per-anchor vector has length M (row terms, pos_coef) or N (column terms); ValueError names the argument.

Backends: ``triton`` (CUDA, or CPU under TRITON_INTERPRET=1) and ``chunked`` (PyTorch, fp64);
``naive.py`` holds the dense references. Registered ops (fake implementations; no autograd formula:
these are the building blocks of FastCLIP's gradient *estimator*, which ``FastCLIPLoss`` assembles
from ``anchor_grad`` itself, so their inputs never require grad):

    fastclip::anchor_stats(a, c, row_scale, label_offset, exclude_positive, backend)
        -> (lse [M], mean_dot [M], pos_dot [M])
    fastclip::anchor_grad(a, c, pos_coef, row_scale?, row_shift?, row_coef?, col_scale?, col_shift?,
        col_coef?, label_offset, exclude_positive, backend) -> grad_a [M, D]
"""

import torch
from torch import Tensor

from ..common import resolve_backend, rows_contiguous
from . import chunked


def _impl(backend: str):
    if backend == "triton":
        from . import triton

        return triton
    return chunked


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_args(a: Tensor, c: Tensor, label_offset: int, rows: dict, cols: dict | None = None) -> None:
    """Shapes and the positive's column, from metadata only (no host sync): a [M, D] and c [N, D];
    label_offset an int in [0, N - M], so every anchor's positive i + label_offset is a column of c;
    the per-anchor vectors in ``rows`` of length M, those in ``cols`` of length N (else the kernels
    would read past them)."""
    if a.dim() != 2 or c.dim() != 2 or a.shape[1] != c.shape[1]:
        raise ValueError(f"a and c must be [M, D] and [N, D], got {tuple(a.shape)} and {tuple(c.shape)}")
    if a.dtype != c.dtype or a.device != c.device:
        raise ValueError(
            f"c must match a's dtype and device, got {c.dtype} on {c.device}, {a.dtype} on {a.device}"
        )
    m, n = a.shape[0], c.shape[0]
    if isinstance(label_offset, bool) or not isinstance(label_offset, int) or not 0 <= label_offset <= n - m:
        raise ValueError(
            f"label_offset must be an int in [0, N - M] = [0, {n - m}] (row i's positive is column "
            f"i + label_offset), got {label_offset!r}"
        )
    for length, vectors in ((m, rows), (n, cols or {})):
        for name, v in vectors.items():
            if v is not None and tuple(v.shape) != (length,):
                raise ValueError(f"{name} must have shape ({length},), got {tuple(v.shape)}")


@torch.library.custom_op("fastclip::anchor_stats", mutates_args=())
def _stats_op(
    a: Tensor, c: Tensor, row_scale: Tensor, label_offset: int, exclude_positive: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    _check_args(a, c, label_offset, {"row_scale": row_scale})
    a, c = rows_contiguous(a), rows_contiguous(c)
    return _impl(backend).anchor_stats(a, c, row_scale, label_offset, exclude_positive)


@_stats_op.register_fake
def _(a, c, row_scale, label_offset, exclude_positive, backend):
    _check_args(a, c, label_offset, {"row_scale": row_scale})
    return tuple(a.new_empty(a.shape[0], dtype=_acc(a.dtype)) for _ in range(3))


def _check_grad_args(
    a, c, pos_coef, row_scale, row_shift, row_coef, col_scale, col_shift, col_coef, label_offset
):
    for side, term in (("row", (row_scale, row_shift, row_coef)), ("col", (col_scale, col_shift, col_coef))):
        if any(t is None for t in term) and any(t is not None for t in term):
            raise ValueError(f"{side}_scale, {side}_shift and {side}_coef must be given together, or none")
    rows = {"pos_coef": pos_coef, "row_scale": row_scale, "row_shift": row_shift, "row_coef": row_coef}
    cols = {"col_scale": col_scale, "col_shift": col_shift, "col_coef": col_coef}
    _check_args(a, c, label_offset, rows, cols)


@torch.library.custom_op("fastclip::anchor_grad", mutates_args=())
def _grad_op(
    a: Tensor,
    c: Tensor,
    pos_coef: Tensor,
    row_scale: Tensor | None,
    row_shift: Tensor | None,
    row_coef: Tensor | None,
    col_scale: Tensor | None,
    col_shift: Tensor | None,
    col_coef: Tensor | None,
    label_offset: int,
    exclude_positive: bool,
    backend: str,
) -> Tensor:
    _check_grad_args(
        a, c, pos_coef, row_scale, row_shift, row_coef, col_scale, col_shift, col_coef, label_offset
    )
    a, c = rows_contiguous(a), rows_contiguous(c)
    row = None if row_scale is None else (row_scale, row_shift, row_coef)
    col = None if col_scale is None else (col_scale, col_shift, col_coef)
    return _impl(backend).anchor_grad(a, c, label_offset, exclude_positive, pos_coef, row, col)


@_grad_op.register_fake
def _(a, c, pos_coef, *terms_and_config):
    _check_grad_args(a, c, pos_coef, *terms_and_config[:7])
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def anchor_stats(a, c, row_scale, *, label_offset: int = 0, exclude_positive: bool = True, backend="auto"):
    """Per-anchor log-sum-exp, softmax-mean dot and positive dot (see the module docstring).

    Args:
        a (torch.Tensor): [M, D] anchors. c (torch.Tensor): [N, D] candidates, same dtype/device.
        row_scale (torch.Tensor): [M] per-anchor scale s_i (a stride-0 expand of a scalar is fine).
        label_offset (int): the positive of row i is column i + label_offset, in [0, N - M].
        exclude_positive (bool): leave the positive out of the sums (FastCLIP's g) or keep it.
        backend (str): "auto", "triton" or "chunked" (``ops.common``).
    Returns:
        (lse [M], mean_dot [M], pos_dot [M]) fp32 (fp64 for fp64 inputs).
    """
    backend = resolve_backend(backend, a)
    return torch.ops.fastclip.anchor_stats(a, c, row_scale, label_offset, exclude_positive, backend)


def anchor_grad(
    a, c, pos_coef, *, row=None, col=None, label_offset: int = 0, exclude_positive=True, backend="auto"
):
    """grad_a [M, D] (a's dtype) = W @ C for the W of the module docstring.

    Args:
        a, c: as :func:`anchor_stats`.
        pos_coef (torch.Tensor): [M] W at the positive (i, i + label_offset), fp32/fp64.
        row (tuple | None): (scale [M], shift [M], coef [M]) of the local anchors' own term.
        col (tuple | None): (scale [N], shift [N], coef [N]) of the column anchors' term.
    """
    backend = resolve_backend(backend, a)
    row = row if row is not None else (None, None, None)
    col = col if col is not None else (None, None, None)
    return torch.ops.fastclip.anchor_grad(a, c, pos_coef, *row, *col, label_offset, exclude_positive, backend)


__all__ = ["anchor_stats", "anchor_grad"]
