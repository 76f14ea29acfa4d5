"""Packed patch embedding of the kept patches only (CLIPA / FLIP-style token reduction).

For images [B, C, H, W], patch size P and a grid of gh x gw = (H/P) x (W/P) patches, each kept
patch n = y * gw + x of image b becomes one token

    token = W @ vec(images[b, :, yP:(y+1)P, xP:(x+1)P]) + bias + pos[1 + n]        [D]

where W [D, C*P*P] is nn.Conv2d(C, D, P, P)'s weight flattened in (c, ky, kx) order. Each image's
sequence is its class token ``cls + pos[0]`` followed by its kept patches in the given order; the
sequences are packed back to back into tokens [T, D] (T = B + number of kept patches, no padding)
described by cu_seqlens [B+1] int32 (sequence b is rows cu_seqlens[b]:cu_seqlens[b+1]).

Gradients (the ``autograd.Function``; images get **no** gradient on the Triton path):
    dW = dP^T @ patches   (patches re-gathered from the images in the backward, not saved)
    dbias = sum_t dP_t,   dpos[1 + n] = sum of dP_t over the tokens of patch n,
    dcls = dpos[0] = sum_b dtokens[cu_seqlens[b]]
with dP the patch rows of dtokens.

Backends: ``triton`` (one gather-GEMM kernel, ``triton.py``: pixels are read straight
from the image tensor, no unfold copy) and ``reference`` (gather + matmul in PyTorch: CPU, fp64,
ground truth; it also propagates gradients to the images). ``auto`` picks Triton on CUDA.

Position embeddings: :func:`pos_embed_2d_sincos` computes the fixed 2D sin-cos table for any grid,
:func:`interpolate_pos_embed` resizes a learned table (bicubic, class row kept) for fine-tuning at
full resolution after short-token pre-training.
"""

from typing import NamedTuple

import torch
from torch import Tensor

from ... import _validation
from ..common import TRITON_DTYPES, interpreting, is_gpu, triton_available
from .naive import gather_patches, patch_embed_ref
from .position import interpolate_pos_embed, pos_embed_2d_sincos

BACKENDS = ("auto", "triton", "reference")

__all__ = [
    "PackedTokens",
    "gather_patches",
    "interpolate_pos_embed",
    "patch_embed",
    "patch_embed_ref",
    "patch_layout",
    "pos_embed_2d_sincos",
]


class PackedTokens(NamedTuple):
    """tokens [T, D]; cu_seqlens [B+1] int32 (device); max_seqlen: host int, an upper bound."""

    tokens: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


# ----------------------------------------------------------------------------------------------
# Layout of the kept patches and the PyTorch reference
# ----------------------------------------------------------------------------------------------


def _check_cu_seqlens(cu, B: int, T_p: int, max_keep):
    if not isinstance(cu, torch.Tensor) or cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32/int64 tensor, got {getattr(cu, 'dtype', type(cu))}")
    if cu.shape != (B + 1,):
        raise ValueError(f"cu_seqlens must have shape ({B + 1},) for {B} images, got {tuple(cu.shape)}")
    if not _validation.index_checks_enabled(cu):
        return
    lengths = cu.diff()
    if int(cu[0]) != 0 or int(cu[-1]) != T_p or bool((lengths < 0).any()):
        raise ValueError(
            f"cu_seqlens must rise from 0 to len(keep_idx) = {T_p}, got {cu.tolist()[:8]}... (last {int(cu[-1])})"
        )
    if max_keep is not None and int(lengths.max()) > max_keep:
        raise ValueError(f"max_keep={max_keep} is below the longest sequence ({int(lengths.max())} patches)")


def patch_layout(keep_idx, num_images: int, num_patches: int, device, cu_seqlens=None, max_keep=None):
    """(idx [T_p] int64, batch [T_p] int32, token cu_seqlens [B+1] int32, max_seqlen) of the kept
    patches, all computed on ``device`` without reading it back.

    keep_idx: None (every patch), [B, k] ints (k patches per image), or [T_p] ints packed image by
    image with ``cu_seqlens`` [B+1] (host or device) of the patch counts. ``max_seqlen`` is
    1 + max_keep, max_keep from the host: given, k, read from a CPU cu_seqlens, else num_patches.
    """
    B, N = num_images, num_patches
    if max_keep is not None and (isinstance(max_keep, bool) or not isinstance(max_keep, int) or max_keep < 0):
        raise TypeError(f"max_keep must be a host int >= 0 (never a device value), got {max_keep!r}")
    if keep_idx is None:
        idx = torch.arange(N, device=device).repeat(B)
        cu_p, max_keep = torch.arange(B + 1, device=device, dtype=torch.int32) * N, N
    else:
        if not isinstance(keep_idx, torch.Tensor) or keep_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"keep_idx must be an int64 (or int32) tensor, got {getattr(keep_idx, 'dtype', keep_idx)}"
            )
        if keep_idx.device != torch.device(device):
            raise ValueError(f"keep_idx is on {keep_idx.device}, expected {device} (as images)")
        if keep_idx.dim() == 2:
            if keep_idx.shape[0] != B or cu_seqlens is not None:
                raise ValueError(
                    f"keep_idx [B, k] must have B = {B} rows (and no cu_seqlens), got {tuple(keep_idx.shape)}"
                )
            k = keep_idx.shape[1]
            idx, max_keep = keep_idx.reshape(-1), k
            cu_p = torch.arange(B + 1, device=device, dtype=torch.int32) * k
        elif keep_idx.dim() == 1:
            if cu_seqlens is None:
                raise ValueError("packed keep_idx [T_p] needs cu_seqlens [B+1] of the per-image patch counts")
            _check_cu_seqlens(cu_seqlens, B, keep_idx.shape[0], max_keep)
            if max_keep is None:
                readable = cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling()
                max_keep = int(cu_seqlens.diff().max()) if readable and B else N
            idx = keep_idx
            cu_p = cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)
        else:
            raise ValueError(f"keep_idx must be [B, k] or packed [T_p], got shape {tuple(keep_idx.shape)}")
        if (
            _validation.index_checks_enabled(idx)
            and idx.numel()
            and (int(idx.min()) < 0 or int(idx.max()) >= N)
        ):
            raise ValueError(
                f"keep_idx must hold patch indices in [0, {N}), got min {int(idx.min())}, max {int(idx.max())}"
            )
    idx = idx.to(torch.int64).contiguous()
    T_p = idx.shape[0]
    steps = torch.arange(T_p, device=device, dtype=torch.int32)
    batch = torch.searchsorted(cu_p[1:].contiguous(), steps, right=True).to(torch.int32)
    cu_tokens = cu_p + torch.arange(B + 1, device=device, dtype=torch.int32)
    return idx, batch, cu_tokens, 1 + int(max_keep)


# ----------------------------------------------------------------------------------------------
# autograd.Function (Triton forward; PyTorch backward) and the public function
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fastclip::patch_embed_fwd", mutates_args=())
def _fwd_op(
    images: Tensor, weight: Tensor, bias: Tensor | None, pos: Tensor, cls: Tensor, idx: Tensor,
    batch: Tensor, cls_rows: Tensor, patch_size: int,
) -> Tensor:  # fmt: skip
    from .triton import patch_embed_fwd

    T = idx.shape[0] + cls_rows.shape[0]
    out = patch_embed_fwd(images, weight, bias, pos, idx, batch, T, patch_size)
    out[cls_rows] = (cls.float() + pos[0].float()).to(out.dtype)
    return out


@_fwd_op.register_fake
def _(images, weight, bias, pos, cls, idx, batch, cls_rows, patch_size):
    return weight.new_empty((idx.shape[0] + cls_rows.shape[0], weight.shape[0]))


@torch.library.custom_op("fastclip::patch_embed_bwd", mutates_args=())
def _bwd_op(
    dout: Tensor, images: Tensor, weight: Tensor, pos: Tensor, cls: Tensor, idx: Tensor, batch: Tensor,
    cls_rows: Tensor, patch_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    from .triton import patch_embed_bwd

    return patch_embed_bwd(dout, images, weight, pos, cls, idx, batch, cls_rows, patch_size)


@_bwd_op.register_fake
def _(dout, images, weight, pos, cls, idx, batch, cls_rows, patch_size):
    return (
        weight.new_empty(weight.shape),
        weight.new_empty(weight.shape[0]),
        pos.new_empty(pos.shape),
        cls.new_empty(cls.shape),
    )


def _setup(ctx, inputs, output):
    images, weight, bias, pos, cls, idx, batch, cls_rows, patch_size = inputs
    # The images (as nn.Conv2d saves them) but no [T_p, C*P*P] patch matrix: dW re-gathers them.
    ctx.save_for_backward(images, weight, pos, cls, idx, batch, cls_rows)
    ctx.patch_size, ctx.has_bias = patch_size, bias is not None


def _backward(ctx, dout):
    images, weight, pos, cls, idx, batch, cls_rows = ctx.saved_tensors
    dw, db, dpos, dcls = torch.ops.fastclip.patch_embed_bwd(
        dout, images, weight, pos, cls, idx, batch, cls_rows, ctx.patch_size
    )
    return None, dw, db if ctx.has_bias else None, dpos, dcls, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


def resolve_backend(backend: str, dtype: torch.dtype, device: torch.device) -> str:
    """'triton' or 'reference' for a compute dtype; 'auto' picks Triton on CUDA for fp16/bf16/fp32."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        ok = is_gpu(device) and dtype in TRITON_DTYPES and triton_available()
        return "triton" if ok else "reference"
    if backend == "triton":
        if dtype not in TRITON_DTYPES:
            raise ValueError(f"backend='triton' computes in {TRITON_DTYPES}, got weight of {dtype}")
        if device.type == "cpu" and not interpreting():
            raise ValueError(
                "backend='triton' on CPU needs TRITON_INTERPRET=1 set before import (or 'reference')"
            )
    return backend


def _check_params(images, weight, bias, pos, cls, patch_size):
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a floating [B, C, H, W] tensor, got {getattr(images, 'shape', images)}"
        )
    if weight.dim() == 4:
        if weight.shape[2] != weight.shape[3] or (patch_size not in (None, weight.shape[2])):
            raise ValueError(
                f"conv weight must be [D, C, P, P] with P = patch_size, got {tuple(weight.shape)}"
            )
        patch_size = weight.shape[2]
        weight = weight.reshape(weight.shape[0], -1)
    elif weight.dim() != 2 or patch_size is None:
        raise ValueError("weight must be a conv weight [D, C, P, P], or [D, C*P*P] with patch_size=P")
    B, C, H, W = images.shape
    D, P = weight.shape[0], patch_size
    if weight.shape[1] != C * P * P:
        raise ValueError(
            f"weight has {weight.shape[1]} inputs per feature, images with C={C}, P={P} need {C * P * P}"
        )
    if H % P or W % P:
        raise ValueError(f"images are {H}x{W}, not a multiple of patch_size {P}")
    grid = (H // P, W // P)
    if pos.dim() != 2 or pos.shape != (1 + grid[0] * grid[1], D):
        raise ValueError(
            f"images of {H}x{W} with patch {P} make a {grid[0]}x{grid[1]} grid: pos must be "
            f"[{1 + grid[0] * grid[1]}, {D}], got {tuple(pos.shape)} (resize it with interpolate_pos_embed)"
        )
    for name, t, shape in (("bias", bias, (D,)), ("cls", cls, (D,))):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    for name, t in (("weight", weight), ("bias", bias), ("pos", pos), ("cls", cls)):
        if t is not None and t.device != images.device:
            raise ValueError(f"{name} is on {t.device}, expected {images.device} (as images)")
    return weight, P, grid


def patch_embed(
    images,
    weight,
    bias,
    pos,
    cls,
    keep_idx=None,
    *,
    cu_seqlens=None,
    max_keep=None,
    patch_size=None,
    backend="auto",
) -> PackedTokens:
    """Packed tokens of the kept patches with class tokens in front, without any padding.

    Args:
        images: [B, C, H, W] float tensor (any float dtype, NCHW or channels-last). No gradient
            on the Triton path (a ValueError if it requires one); the reference path gives one.
        weight: [D, C, P, P] conv weight (or [D, C*P*P] with ``patch_size``); its dtype (or the
            autocast dtype) is the compute and output dtype. bias: [D] or None.
        pos: [1 + gh*gw, D] position table (row 0: class), gh x gw = (H/P) x (W/P);
            see :func:`pos_embed_2d_sincos` and :func:`interpolate_pos_embed`.  cls: [D] class token.
        keep_idx: None (all patches), [B, k] patch indices in [0, gh*gw), or packed [T_p] with
            ``cu_seqlens`` [B+1] (int32/int64, host or device) of the per-image counts.
        max_keep: host int bound on the per-image count (packed form; default from a CPU
            cu_seqlens, else gh*gw). Never read back from the device.
    Returns:
        PackedTokens(tokens [T, D], cu_seqlens [B+1] int32, max_seqlen int), T = B + T_p, token
        cu_seqlens[b] is image b's class token; its patches follow in keep_idx order.

    >>> img, w = torch.randn(2, 3, 32, 32), torch.randn(64, 3, 8, 8)
    >>> out = patch_embed(img, w, None, pos_embed_2d_sincos(4, 4, 64), torch.zeros(64),
    ...                   torch.tensor([[0, 5, 9], [1, 2, 15]]))
    >>> out.tokens.shape, out.cu_seqlens.tolist(), out.max_seqlen
    (torch.Size([8, 64]), [0, 4, 8], 4)
    """
    weight2d, P, grid = _check_params(images, weight, bias, pos, cls, patch_size)
    dev = images.device
    idx, batch, cu_tokens, max_seqlen = patch_layout(
        keep_idx, images.shape[0], grid[0] * grid[1], dev, cu_seqlens, max_keep
    )
    autocast = dev.type != "meta" and torch.is_autocast_enabled(dev.type)  # meta has no autocast
    dtype = torch.get_autocast_dtype(dev.type) if autocast else weight2d.dtype
    backend = resolve_backend(backend, dtype, dev)
    weight2d = weight2d.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    if backend == "reference":
        tokens = patch_embed_ref(images, weight2d, bias, pos, cls, idx, batch, cu_tokens)
        return PackedTokens(tokens, cu_tokens, max_seqlen)
    if images.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "images require grad, but the Triton patch embedding gives them none: use backend='reference'"
        )
    tokens = torch.ops.fastclip.patch_embed_fwd(
        images, weight2d.contiguous(), bias, pos if pos.stride(1) == 1 else pos.contiguous(), cls,
        idx, batch, cu_tokens[:-1].long(), P,
    )  # fmt: skip
    return PackedTokens(tokens, cu_tokens, max_seqlen)
