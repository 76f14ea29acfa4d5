"""CLIP (InfoNCE) contrastive loss on tiled log-sum-exps: open_clip ``ClipLoss`` math, O((b+N)*D) memory.

For local rows x_i, y_i (i < b) and gathered columns X_j, Y_j (j < N), positives at j = o + i:

    L = 1/2 * mean_i [ lse_j(s <x_i, Y_j> + beta) + lse_j(s <y_i, X_j> + beta) ] - mean_i (s <x_i, y_i> + beta)

In a single process (N = b, o = 0) both log-sum-exps come from one matrix: the text->image LSE is the
column LSE of s X Y^T, so the kernels recompute that matrix once per pass, not twice.
"""

import torch

from .._validation import as_scalar_tensor, check_features, check_same_batch, scalar_dtype
from .pairwise import similarity_logsumexp


def positive_logits(image_features, text_features, logit_scale, logit_bias=None):
    """s * <x_i, y_i> + beta for paired rows [b, D] -> [b], fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if image_features.dtype == torch.float64 else torch.float32
    pos = (image_features.to(acc) * text_features.to(acc)).sum(dim=-1) * logit_scale.to(acc)
    return pos + logit_bias.to(acc) if logit_bias is not None else pos


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
    scale = as_scalar_tensor("logit_scale", logit_scale, device, scalar_dtype(dtype))
    bias = None if logit_bias is None else as_scalar_tensor("logit_bias", logit_bias, device, scalar_dtype(dtype))
    pos = positive_logits(image_features, text_features, scale, bias)
    if all_image_features is None and all_text_features is None:
        if label_offset != 0:
            raise ValueError("label_offset needs all_image_features and all_text_features")
        lse_i2t, lse_t2i = similarity_logsumexp(image_features, text_features, scale, bias, backend=backend)
    else:
        _check_gathered(image_features, all_image_features, all_text_features, label_offset)
        lse_i2t, _ = similarity_logsumexp(image_features, all_text_features, scale, bias, cols=False, backend=backend)
        lse_t2i, _ = similarity_logsumexp(text_features, all_image_features, scale, bias, cols=False, backend=backend)
    return 0.5 * (lse_i2t.mean() + lse_t2i.mean()) - pos.mean()


def _check_gathered(image_features, all_image_features, all_text_features, label_offset):
    if all_image_features is None or all_text_features is None:
        raise ValueError("pass both all_image_features and all_text_features, or neither")
    dim, device, dtype = image_features.shape[1], image_features.device, image_features.dtype
    check_features("all_image_features", all_image_features, dim, device, dtype)
    check_features("all_text_features", all_text_features, dim, device, dtype)
    check_same_batch("all_text_features", all_text_features, "all_image_features", all_image_features)
    b, n = image_features.shape[0], all_image_features.shape[0]
    if not isinstance(label_offset, int) or not 0 <= label_offset <= n - b:
        raise ValueError(f"label_offset must be an int in [0, {n - b}] for b={b}, N={n}; got {label_offset!r}")
