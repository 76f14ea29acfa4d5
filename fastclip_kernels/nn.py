"""Drop-in ``nn.Module`` replacements for open_clip's ``ClipLoss`` and ``SigLipLoss``.

Same constructor arguments and forward signature as open_clip; the math runs on the tiled kernels
in :mod:`fastclip_kernels.ops`. ``FastContrastiveLoss`` follows open_clip's distributed conventions
(:func:`fastclip_kernels.distributed.gather_features`); ``FastSigLipLoss`` covers ``world_size=1``.
"""

from torch import nn

from .distributed.gather import gather_features
from .fastclip.loss import FastCLIPLoss
from .ops.contrastive_loss import contrastive_loss
from .ops.sigmoid_loss import sigmoid_loss


def _check_parallel_args(rank: int, world_size: int, use_horovod: bool) -> None:
    if use_horovod:
        raise ValueError(
            "use_horovod=True is not supported (open_clip removed Horovod too); use torch.distributed"
        )
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


class FastContrastiveLoss(nn.Module):
    """open_clip ``ClipLoss`` drop-in: mean of the image->text and text->image cross-entropies.

    Args (as open_clip): local_loss, gather_with_grad, cache_labels (accepted; labels are never
    materialized here), rank, world_size, use_horovod (must be False). Keyword-only: ``backend``
    ("auto" | "triton" | "chunked") and ``group`` (the process group of the K = world_size ranks;
    None: the default group, ``rank`` is the rank within it).

    forward(image_features [b, D], text_features [b, D], logit_scale, logit_bias=None,
    output_dict=False) -> 0-d loss, or {"contrastive_loss": loss}.

    world_size K > 1, as open_clip: every rank all-gathers the features to [K*b, D]; then
    ``local_loss=True``: the loss of the b local rows against the K*b gathered columns (positives at
    ``rank * b + i``; the mean over ranks is the global loss); ``local_loss=False``: the global
    [K*b, K*b] loss on every rank. Parameter gradients after DDP's mean over ranks, relative to the
    single-process gradient of the global batch (open_clip's conventions, tested on gloo in fp64):

    - ``gather_with_grad=True`` (local or global loss): 1.0 for the encoders and logit_scale.
    - ``gather_with_grad=False``, global loss: encoders 1/K (gradient only through the local
      slot), logit_scale 1.0. With ``local_loss=True`` only the query side of each logit carries
      gradient (the gathered columns are constants): encoders get roughly half of the global
      gradient, not a fixed ratio; logit_scale 1.0. open_clip's advice: local_loss with
      gather_with_grad.

    ``low_comm=True`` (keyword-only) replaces both conventions by FastCLIP's scheme: ONE no-grad
    all_gather of [image | text] plus one of 5 numbers per pair, a two-pass local surrogate, and
    NO collective in the backward; gradients after DDP's mean equal the global-batch ones (ratio
    1.0, like gather_with_grad) while the bytes sent are halved: 2(K-1) b d s + 40(K-1) b versus
    4(K-1) b d s. The returned value is the global-batch loss on every rank. ``logit_bias``
    cancels in the cross-entropy and gets no gradient on this path.
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
        group=None,
        low_comm: bool = False,
    ):
        super().__init__()
        _check_parallel_args(rank, world_size, use_horovod)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.backend, self.group = rank, world_size, backend, group
        self.low_comm = (
            FastCLIPLoss(mode="clip", rank=rank, world_size=world_size, group=group, backend=backend)
            if low_comm and world_size > 1
            else None
        )

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.low_comm is not None:
            loss = self.low_comm(image_features, text_features, logit_scale)
        elif self.world_size > 1:
            loss = self._open_clip_forward(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = contrastive_loss(
                image_features, text_features, logit_scale, logit_bias, backend=self.backend
            )
        return {"contrastive_loss": loss} if output_dict else loss

    def _open_clip_forward(self, image_features, text_features, logit_scale, logit_bias):
        """open_clip's distributed ClipLoss: gather_features, then the local or the global loss."""
        all_img, all_txt = gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
            group=self.group,
        )
        if not self.local_loss:
            return contrastive_loss(all_img, all_txt, logit_scale, logit_bias, backend=self.backend)
        return contrastive_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            all_image_features=all_img,
            all_text_features=all_txt,
            label_offset=self.rank * image_features.shape[0],
            backend=self.backend,
        )


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
        if world_size > 1:
            raise NotImplementedError(
                "FastSigLipLoss: world_size > 1 is not implemented yet (open_clip's neighbour "
                "exchange is not ported); use world_size=1 or open_clip's SigLipLoss"
            )
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl, self.bidir, self.backend = dist_impl, bidir, backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = sigmoid_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss


__all__ = ["FastContrastiveLoss", "FastSigLipLoss"]
