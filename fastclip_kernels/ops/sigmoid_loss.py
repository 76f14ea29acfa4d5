"""SigLIP sigmoid loss on tiled sums: open_clip ``SigLipLoss`` math, O((b+N)*D) memory.

With labels y_ij = +1 on the positives (j = o + i) and -1 elsewhere, and z = s X Y^T + beta,

    L = -1/b sum_ij logsigmoid(y_ij z_ij) = 1/b sum_ij softplus(-y_ij z_ij)

one tiled sum over the [b, N] pairs; its gradient W_ij = sigmoid(z_ij) - [y_ij = 1] is formed in fp32
inside the kernel. (torch's F.softplus turns linear above 20, off by exp(-20); ours is exact.)
"""

import torch

from .._validation import as_scalar_tensor, check_features, check_same_batch, scalar_dtype
from .pairwise import sigmoid_loss_sum


def siglip_loss(
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
        >>> loss = siglip_loss(x, y, torch.tensor(10.0), torch.tensor(-10.0))
    """
    check_features("image_features", image_features)
    dim, device, dtype = image_features.shape[1], image_features.device, image_features.dtype
    check_features("text_features", text_features, dim, device, dtype)
    check_same_batch("text_features", text_features, "image_features", image_features)
    if logit_bias is None:
        raise ValueError("logit_bias is required for the sigmoid loss (SigLIP init: -10)")
    scale = as_scalar_tensor("logit_scale", logit_scale, device, scalar_dtype(dtype))
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
