"""CLIP (InfoNCE) contrastive loss on tiled log-sum-exps: open_clip ``ClipLoss`` math, O((b+N)*D) memory.

For local rows x_i, y_i (i < b) and gathered columns X_j, Y_j (j < N), positives at j = o + i:

    L = 1/2 * mean_i [ CE_i(s x_i . Y^T + beta, o + i) + CE_i(s y_i . X^T + beta, o + i) ]

with CE(z, k) = logsumexp(z) - z_k. In a single process (N = b, o = 0) the text->image terms are the
columns of the same matrix s X Y^T; the kernels recompute tiles and never store a [b, N] matrix.
The positive enters inside the kernel, so the gradient's P_ii - 1 cancels in fp32.

Files: ``triton.py`` (kernels, ``contrastive_loss_fwd`` / ``_bwd``), ``chunked.py`` (the CPU algorithm,
same contract), ``naive.py`` (``contrastive_loss_ref``: open_clip's materialized formula). Registered
ops (fake implementation and autograd, so they trace under ``torch.compile`` and run on ``meta``):

    fastclip::contrastive_loss_fwd(a, c, scale, bias?, label_offset, cols, backend)
        -> (ce_rows [M], ce_cols [N] or [0], lse_rows [M], lse_cols [N] or [0])
    fastclip::contrastive_loss_bwd(a, c, scale, bias?, lse_rows, lse_cols, g_rows, g_cols,
        label_offset, cols, backend) -> (grad_a, grad_c, dscale [], dbias [])
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


@torch.library.custom_op("fastclip::contrastive_loss_fwd", mutates_args=())
def _fwd_op(
    a: Tensor, c: Tensor, scale: Tensor, bias: Tensor | None, label_offset: int, cols: bool, backend: str
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a, c = rows_contiguous(a), rows_contiguous(c)
    lse_rows, ce_rows, lse_cols, ce_cols = _impl(backend).contrastive_loss_fwd(
        a, c, scale, bias, label_offset, cols
    )
    return ce_rows, ce_cols, lse_rows, lse_cols


@_fwd_op.register_fake
def _(a, c, scale, bias, label_offset, cols, backend):
    acc = _acc(a.dtype)
    n_cols = c.shape[0] if cols else 0
    rows = [a.new_empty(a.shape[0], dtype=acc) for _ in range(2)]
    col = [a.new_empty(n_cols, dtype=acc) for _ in range(2)]
    return rows[0], col[0], rows[1], col[1]


@torch.library.custom_op("fastclip::contrastive_loss_bwd", mutates_args=())
def _bwd_op(
    a: Tensor,
    c: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    lse_rows: Tensor,
    lse_cols: Tensor,
    g_rows: Tensor,
    g_cols: Tensor,
    label_offset: int,
    cols: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a, c = rows_contiguous(a), rows_contiguous(c)
    acc = _acc(a.dtype)
    g_rows = g_rows.to(acc).contiguous()
    g_cols = g_cols.to(acc).contiguous() if cols else None
    grad_a, grad_c, ds, db = _impl(backend).contrastive_loss_bwd(
        a, c, scale, bias, label_offset, lse_rows, g_rows, lse_cols if cols else None, g_cols
    )
    return grad_a, grad_c, ds.reshape(()).to(acc).clone(), db.reshape(()).to(acc).clone()  # 0-d: distinct


@_bwd_op.register_fake
def _(a, c, scale, bias, lse_rows, lse_cols, g_rows, g_cols, label_offset, cols, backend):
    acc = _acc(a.dtype)
    return torch.empty_like(a), torch.empty_like(c), a.new_empty((), dtype=acc), a.new_empty((), dtype=acc)


def _setup_context(ctx, inputs, output) -> None:
    a, c, scale, bias, label_offset, cols, backend = inputs
    _, _, lse_rows, lse_cols = output
    ctx.mark_non_differentiable(lse_rows, lse_cols)
    ctx.save_for_backward(a, c, scale, bias, lse_rows, lse_cols)
    ctx.config = (label_offset, cols, backend)


def _grad_like(grad: Tensor, ref: Tensor | None):
    return None if ref is None else grad.reshape(ref.shape).to(ref.dtype)


def _backward(ctx, g_rows, g_cols, _g_lse_rows, _g_lse_cols):
    a, c, scale, bias, lse_rows, lse_cols = ctx.saved_tensors
    grad_a, grad_c, ds, db = torch.ops.fastclip.contrastive_loss_bwd(
        a, c, scale, bias, lse_rows, lse_cols, g_rows, g_cols, *ctx.config
    )
    return grad_a, grad_c, _grad_like(ds, scale), _grad_like(db, bias), None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def similarity_cross_entropy(
    a, c, logit_scale, logit_bias=None, *, label_offset=0, cols=True, backend="auto"
):
    """Per-row (and per-column) cross-entropy of the logits, without materializing them.

    Args:
        a (torch.Tensor): [M, D] row features (fp16/bf16/fp32; fp64 on the chunked backend).
        c (torch.Tensor): [N, D] column features, same dtype and device.
        logit_scale (torch.Tensor): 0-d or [1] scale s (already exponentiated), same device.
        logit_bias (torch.Tensor, optional): 0-d or [1] additive bias beta.
        label_offset (int): row i's positive is column i + label_offset.
        cols (bool): also the column cross-entropies (needs M == N and label_offset == 0).
        backend (str): "auto", "triton" or "chunked" (``ops.common``).
    Returns:
        (ce_rows [M], ce_cols [N] or empty [0]) in fp32 (fp64 for fp64 inputs), where
        ce_rows_i = log sum_j exp(z_ij) - z_{i,i+o}, ce_cols_j = log sum_i exp(z_ij) - z_{j,j},
        z = s * a @ c.T + beta.
    """
    if cols and (a.shape[0] != c.shape[0] or label_offset != 0):
        raise ValueError("cols=True needs a square problem: M == N and label_offset == 0")
    backend = resolve_backend(backend, a)
    ce_rows, ce_cols, _, _ = torch.ops.fastclip.contrastive_loss_fwd(
        a, c, logit_scale, logit_bias, label_offset, cols, backend
    )
    return ce_rows, ce_cols


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale,
    logit_bias=None,
    *,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    label_offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Symmetric InfoNCE loss of paired image/text features, without the [b, N] logit matrix.

    Args:
        image_features (torch.Tensor): [b, D] fp16/bf16/fp32/fp64 (need not be L2-normalized).
        text_features (torch.Tensor): [b, D], same dtype and device; row i pairs with image i.
        logit_scale (torch.Tensor | float): 0-d or [1], the exponentiated scale s = 1/tau.
        logit_bias (torch.Tensor | float, optional): beta added to every logit (cancels in CE).
        all_image_features, all_text_features (torch.Tensor, optional): [N, D] gathered columns
            for open_clip's ``local_loss`` mode; the positive of local row i is column
            ``label_offset + i``. Omit both for the single-process loss (columns = local rows).
        backend: "auto" (Triton on CUDA, chunked PyTorch on CPU), "triton" or "chunked".
    Returns:
        0-d tensor, fp32 (fp64 for fp64 inputs); same value and gradients (features,
        logit_scale, logit_bias) as open_clip ``ClipLoss``.

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(8, 64), dim=-1)
        >>> y = torch.nn.functional.normalize(torch.randn(8, 64), dim=-1)
        >>> loss = contrastive_loss(x, y, torch.tensor(100.0))
    """
    check_features("image_features", image_features)
    dim, device, dtype = image_features.shape[1], image_features.device, image_features.dtype
    check_features("text_features", text_features, dim, device, dtype)
    check_same_batch("text_features", text_features, "image_features", image_features)
    scale = as_scalar_tensor("logit_scale", logit_scale, device, scalar_dtype(dtype), positive=True)
    bias = (
        None
        if logit_bias is None
        else as_scalar_tensor("logit_bias", logit_bias, device, scalar_dtype(dtype))
    )
    if all_image_features is None and all_text_features is None:
        if label_offset != 0:
            raise ValueError("label_offset needs all_image_features and all_text_features")
        ce_i2t, ce_t2i = similarity_cross_entropy(image_features, text_features, scale, bias, backend=backend)
    else:
        _check_gathered(image_features, all_image_features, all_text_features, label_offset)
        kwargs = dict(label_offset=label_offset, cols=False, backend=backend)
        ce_i2t, _ = similarity_cross_entropy(image_features, all_text_features, scale, bias, **kwargs)
        ce_t2i, _ = similarity_cross_entropy(text_features, all_image_features, scale, bias, **kwargs)
    return 0.5 * (ce_i2t.mean() + ce_t2i.mean())


def _check_gathered(image_features, all_image_features, all_text_features, label_offset):
    if all_image_features is None or all_text_features is None:
        raise ValueError("pass both all_image_features and all_text_features, or neither")
    dim, device, dtype = image_features.shape[1], image_features.device, image_features.dtype
    check_features("all_image_features", all_image_features, dim, device, dtype)
    check_features("all_text_features", all_text_features, dim, device, dtype)
    check_same_batch("all_text_features", all_text_features, "all_image_features", all_image_features)
    b, n = image_features.shape[0], all_image_features.shape[0]
    if not isinstance(label_offset, int) or not 0 <= label_offset <= n - b:
        raise ValueError(
            f"label_offset must be an int in [0, {n - b}] for b={b}, N={n}; got {label_offset!r}"
        )
