"""Plain-PyTorch reference of the patch embedding (math: ``__init__.py``): gather + matmul in the
weight's dtype, fp64-capable, differentiable in every floating input. Also the CPU path."""

import math

import torch


def gather_patches(images, idx, batch, patch_size: int):
    """[T_p, C*P*P] pixels of patch idx[t] of image batch[t], (c, ky, kx) order (a strided view
    is indexed: only the kept patches are copied)."""
    B, C, H, W = images.shape
    P = patch_size
    grid_w = W // P
    view = images.unflatten(2, (H // P, P)).unflatten(4, (grid_w, P)).permute(0, 2, 4, 1, 3, 5)
    return view[batch.long(), idx // grid_w, idx % grid_w].reshape(idx.shape[0], C * P * P)


def patch_embed_ref(images, weight, bias, pos, cls, idx, batch, cu_seqlens):
    """PyTorch reference in weight's dtype: gather + matmul + bias + pos, class tokens in front.

    weight [D, C*P*P]; idx/batch [T_p] as :func:`patch_layout`; cu_seqlens [B+1] token offsets.
    Differentiable in every floating input (images included). Returns tokens [T, D].
    """
    D, K = weight.shape
    P = math.isqrt(K // images.shape[1])
    dtype = weight.dtype
    x = gather_patches(images, idx, batch, P).to(dtype) @ weight.T + pos[1 + idx].to(dtype)
    if bias is not None:
        x = x + bias.to(dtype)
    B, T_p = cu_seqlens.shape[0] - 1, idx.shape[0]
    rows = torch.arange(T_p, device=idx.device) + batch.long() + 1
    out = x.new_zeros(T_p + B, D).index_copy(0, rows, x)
    cls_rows = cu_seqlens[:-1].long()
    return out.index_copy(0, cls_rows, (cls.to(dtype) + pos[0].to(dtype)).expand(B, D))
