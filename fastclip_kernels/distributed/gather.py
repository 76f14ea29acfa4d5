"""All-gathers for the distributed CLIP losses: open_clip's ``gather_features`` and a packed gather.

``gather_features`` reproduces open_clip ``ClipLoss``'s gather (src/open_clip/loss.py):

- ``gather_with_grad=True``: an autograd all-gather, forward all_gather of the [b, D] features to
  [K*b, D], backward a reduce-scatter(SUM) of the [K*b, D] gradient to [b, D] (the sum over ranks,
  as ``torch.distributed.nn.all_gather`` and ``all_gather_tensor_autograd`` on NCCL).
- ``gather_with_grad=False``: a plain all_gather (no gradient); for the global loss
  (``local_loss=False``) the local slot is replaced by the grad-carrying local tensor, so gradient
  flows only through it (after DDP's mean: feature-path gradients are 1/K of the global ones).

``all_gather_packed`` is FastCLIP's low-communication gather: several [b, ...] tensors of any dtypes
(features, sample indices) bit-packed into one uint8 [b, bytes] buffer and gathered in ONE collective.

Collectives go through attributes of ``torch.distributed`` at call time, so
:class:`~fastclip_kernels.distributed.comm.CommCounter` sees them.
"""

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

# Backends with a single-tensor all-gather and reduce-scatter (gloo: checked on torch 2.13 CPU, where
# its reduce-scatter runs as an all-reduce; older gloo builds may lack them).
_SINGLE_TENSOR_BACKENDS = ("nccl", "xccl", "gloo")


def _world_size(group) -> int:
    """Size of ``group``, or 1 when torch.distributed is unavailable or not initialized."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _single_tensor_ok(group) -> bool:
    return str(dist.get_backend(group)).lower() in _SINGLE_TENSOR_BACKENDS


def _all_gather_into(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """out [K*b, ...] <- rank-major concatenation of every rank's x [b, ...] (one collective)."""
    if _single_tensor_ok(group):
        # torch 2.13 renamed all_gather_into_tensor (now deprecated, with a FutureWarning per call).
        fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        fn(out, x, group=group)
    else:
        dist.all_gather(list(out.chunk(dist.get_world_size(group))), x, group=group)


def _reduce_scatter_sum(out: torch.Tensor, x: torch.Tensor, group) -> None:
    """out [b, ...] <- sum over ranks of this rank's [b, ...] slice of x [K*b, ...] (one collective)."""
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, x, group=group)


class _AllGatherWithGrad(torch.autograd.Function):
    """[b, ...] -> [K*b, ...]; backward: reduce-scatter(SUM) of the [K*b, ...] gradient to [b, ...].

    One collective each way on NCCL and gloo. ``torch.distributed.nn.functional.all_gather`` computes
    the same gradient but is deprecated in torch 2.13 (a FutureWarning per call) and on gloo emulates
    the reduce-scatter with K ``dist.scatter`` calls; it remains the fallback for other backends.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        _all_gather_into(out, x, group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_out = grad_out.contiguous()
        grad_x = grad_out.new_empty(
            (grad_out.shape[0] // dist.get_world_size(ctx.group), *grad_out.shape[1:])
        )
        _reduce_scatter_sum(grad_x, grad_out, ctx.group)
        return grad_x, None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Autograd all-gather: x [b, ...] -> [K*b, ...] rank-major; the gradient is summed over ranks."""
    if _single_tensor_ok(group):
        return _AllGatherWithGrad.apply(x, group)
    import torch.distributed.nn.functional as dist_nn  # the generic (all_to_all) fallback

    return torch.cat(dist_nn.all_gather(x, group=group or dist.group.WORLD), dim=0)


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    local_loss: bool,
    gather_with_grad: bool,
    rank: int,
    world_size: int,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ``gather_features``: every rank's [b, D] features concatenated to [K*b, D].

    Args:
        image_features, text_features (torch.Tensor): [b, D] local features (same b on every rank).
        local_loss (bool): open_clip's flag; without ``gather_with_grad`` it decides whether the
            local slot carries gradient (False: yes, the global loss; True: no, open_clip's local
            loss differentiates only its local rows).
        gather_with_grad (bool): gather through autograd (gradient = sum over ranks, reduce-scatter).
        rank, world_size (int): this rank within ``group`` and the group's size K.
        group (ProcessGroup, optional): None for the default group.
    Returns:
        (all_image_features, all_text_features), each [K*b, D], rank-major (rows r*b .. r*b+b-1
        come from rank r). world_size 1 returns the inputs unchanged, with no collective.

    Example (on every rank, after ``dist.init_process_group``):
        >>> all_img, all_txt = gather_features(img, txt, local_loss=True, gather_with_grad=True,
        ...                                    rank=dist.get_rank(), world_size=dist.get_world_size())
    """
    if world_size == 1:
        return image_features, text_features
    actual = _world_size(group)
    if actual != world_size:
        raise ValueError(
            f"world_size={world_size} but the process group has {actual} rank(s) "
            "(initialize torch.distributed and pass the group's size)"
        )
    if gather_with_grad:
        return all_gather_with_grad(image_features, group), all_gather_with_grad(text_features, group)
    gathered = []
    for x in (image_features, text_features):
        slots = [torch.zeros_like(x) for _ in range(world_size)]
        dist.all_gather(slots, x.contiguous(), group=group)
        if not local_loss:
            slots[rank] = x  # gradient flows through the local slot only
        gathered.append(torch.cat(slots, dim=0))
    return gathered[0], gathered[1]


def _check_parts(parts) -> int:
    if isinstance(parts, torch.Tensor) or not isinstance(parts, Sequence) or len(parts) == 0:
        raise TypeError("parts must be a non-empty sequence of tensors")
    for i, p in enumerate(parts):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parts[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if p.dim() == 0:
            raise ValueError(f"parts[{i}] must have a leading batch dim, got a 0-d tensor")
        if p.shape[0] != parts[0].shape[0] or p.device != parts[0].device:
            raise ValueError(
                f"parts[{i}] is [{p.shape[0]}, ...] on {p.device}; every part must have the "
                f"leading size and device of parts[0] ([{parts[0].shape[0]}, ...] on {parts[0].device})"
            )
    return parts[0].shape[0]


def all_gather_packed(parts: Sequence[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Gather several same-leading-size tensors in ONE collective, bit-exact, without autograd.

    Each part [b, ...] (any dtype) is bit-cast to uint8 rows [b, nbytes_i], the rows are
    concatenated to one [b, sum_i nbytes_i] buffer, gathered to [K*b, sum_i nbytes_i] (one
    all-gather: single-tensor on NCCL/XCCL/gloo, into a list elsewhere) and cut back.

    Args:
        parts (Sequence[torch.Tensor]): e.g. ([b, D] bf16 image features, [b, D] bf16 text
            features, [b] int64 sample indices); same b and device; gradients are not tracked.
        group (ProcessGroup, optional): None for the default group.
    Returns:
        list of [K*b, ...] tensors, part i in its original dtype and trailing shape, rank-major.
        Not initialized or K = 1: the parts themselves, with no collective.

    Example (on every rank):
        >>> img, txt, idx = all_gather_packed([img, txt, idx])  # one all_gather, (K-1)*b*row bytes
    """
    b = _check_parts(parts)
    k = _world_size(group)
    if k == 1:
        return list(parts)
    rows = [p.detach().contiguous().reshape(b, math.prod(p.shape[1:])).view(torch.uint8) for p in parts]
    packed = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]
    out = packed.new_empty((k * b, packed.shape[1]))
    _all_gather_into(out, packed, group)
    gathered, start = [], 0
    for p, r in zip(parts, rows, strict=True):
        cols = out[:, start : start + r.shape[1]].contiguous()
        gathered.append(cols.view(p.dtype).reshape(k * b, *p.shape[1:]))
        start += r.shape[1]
    return gathered
