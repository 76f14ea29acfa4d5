"""Plain-PyTorch reference of the contrastive loss: open_clip's ``ClipLoss`` (materialized [M, N] logits).

The ground truth for tests (run it in fp64) and the "materialized" provider in the benchmarks;
argument conventions follow open_clip's ``ClipLoss``.
"""

import torch
import torch.nn.functional as F


def contrastive_loss_ref(image_features, text_features, logit_scale, logit_bias=None):
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


def contrastive_loss_local_ref(
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
