"""Plain-PyTorch reference of the sigmoid loss: open_clip's ``SigLipLoss`` (materialized [b, N] logits).

The ground truth for tests (run it in fp64) and the "materialized" provider in the benchmarks.
"""

import torch
import torch.nn.functional as F


def sigmoid_loss_ref(image_features, text_features, logit_scale, logit_bias, label_offset=0):
    """open_clip SigLipLoss._loss: -sum_ij logsigmoid(y_ij z_ij) / b with y = +1 on the positives.

    image_features [b, D] against text_features [N, D]; the positive of row i is column
    ``label_offset + i`` (0 for the single-process loss, where N = b).
    """
    b, n = image_features.shape[0], text_features.shape[0]
    logits = logit_scale * image_features @ text_features.T + logit_bias
    labels = -torch.ones(b, n, device=logits.device, dtype=logits.dtype)
    rows = torch.arange(b, device=logits.device)
    labels[rows, rows + label_offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / b
