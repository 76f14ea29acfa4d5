"""CLIP (InfoNCE) contrastive loss on tiled log-sum-exps: open_clip ``ClipLoss`` math, O((b+N)*D) memory.

For local rows x_i, y_i (i < b) and gathered columns X_j, Y_j (j < N), positives at j = o + i:

    L = 1/2 * mean_i [ CE_i(s x_i . Y^T + beta, o + i) + CE_i(s y_i . X^T + beta, o + i) ]

with CE(z, k) = logsumexp(z) - z_k. In a single process (N = b, o = 0) the text->image terms are the
columns of the same matrix s X Y^T; the kernels recompute tiles and never store a [b, N] matrix.
The positive enters inside the kernel, so the gradient's P_ii - 1 cancels in fp32.
"""

import torch

from .._validation import as_scalar_tensor, check_features, check_same_batch, scalar_dtype
from .pairwise import similarity_cross_entropy


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
