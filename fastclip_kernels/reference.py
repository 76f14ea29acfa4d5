"""Plain-PyTorch references with open_clip's formulas (materialized [M, N] logits).

They are the ground truth for tests (run them in fp64) and the "materialized" provider in the
benchmarks. Names and argument conventions follow open_clip's ``ClipLoss`` / ``SigLipLoss``.
"""

import torch
import torch.nn.functional as F


def clip_loss_ref(image_features, text_features, logit_scale, logit_bias=None):
    """open_clip ClipLoss at world_size=1: mean of the image->text and text->image CE.

    image_features [B, D], text_features [B, D], logit_scale 0-d (exponentiated). Returns 0-d.
    """
    logits_per_image = logit_scale * image_features @ text_features.T
    logits_per_text = logit_scale * text_features @ image_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clip_loss_local_ref(
    image_features,
    text_features,
    all_image_features,
    all_text_features,
    logit_scale,
    label_offset,
    logit_bias=None,
):
    """open_clip ClipLoss with local_loss=True: local rows [b, D] against gathered [N, D].

    The positive of local row i is gathered column ``label_offset + i``.
    """
    logits_per_image = logit_scale * image_features @ all_text_features.T
    logits_per_text = logit_scale * text_features @ all_image_features.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    labels = torch.arange(image_features.shape[0], device=image_features.device) + label_offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss_ref(image_features, text_features, logit_scale, logit_bias, label_offset=0):
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
