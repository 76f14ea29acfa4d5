"""Drop-in ``nn.Module`` replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``.

Same constructor arguments and forward signature as open_clip; the math runs on the tiled kernels
in :mod:`fastclip_kernels.ops`. This release covers ``world_size=1``; the distributed path
(all-gather with a collective-free backward) is tracked separately.
"""

from torch import nn

from .ops.contrastive_loss import contrastive_loss
from .ops.sigmoid_loss import siglip_loss


def _check_parallel_args(rank: int, world_size: int, use_horovod: bool) -> None:
    if use_horovod:
        raise ValueError(
            "use_horovod=True is not supported (open_clip removed Horovod too); use torch.distributed"
        )
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    if world_size > 1:
        raise NotImplementedError(
            "world_size > 1 is not implemented yet in fastclip_kernels (distributed FastCLIP "
            "is the next milestone); use world_size=1 or open_clip's ClipLoss meanwhile"
        )


class FastContrastiveLoss(nn.Module):
    """open_clip ``ClipLoss`` drop-in: mean of the image->text and text->image cross-entropies.

    Args (as open_clip): local_loss, gather_with_grad, cache_labels (accepted; labels are never
    materialized here), rank, world_size, use_horovod (must be False). Keyword-only ``backend``:
    "auto" | "triton" | "chunked".

    forward(image_features [B, D], text_features [B, D], logit_scale, logit_bias=None,
    output_dict=False) -> 0-d loss, or {"contrastive_loss": loss}.
    """

    def __init__(
        self,
        local_loss=False,
        gather_with_grad=False,
        cache_labels=False,
        rank=0,
        world_size=1,
        use_horovod=False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        _check_parallel_args(rank, world_size, use_horovod)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = contrastive_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


class FastSigLipLoss(nn.Module):
    """open_clip ``SigLipLoss`` drop-in: -sum_ij logsigmoid(y_ij z_ij) / B with y = 2I - 1.

    Args (as open_clip): cache_labels, rank, world_size, dist_impl, bidir, use_horovod.
    forward(image_features [B, D], text_features [B, D], logit_scale, logit_bias,
    output_dict=False) -> 0-d loss, or {"contrastive_loss": loss}.
    """

    def __init__(
        self,
        cache_labels=False,
        rank=0,
        world_size=1,
        dist_impl=None,
        bidir=True,
        use_horovod=False,
        *,
        backend: str = "auto",
    ):
        super().__init__()
        _check_parallel_args(rank, world_size, use_horovod)
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.bidir, self.backend = dist_impl, bidir, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


__all__ = ["FastContrastiveLoss", "FastSigLipLoss"]
