"""Position tables of the patch embedding: the fixed 2D sin-cos table for any grid, and bicubic
resizing of a learned table (class row kept) for fine-tuning at full resolution."""

import math

import torch
import torch.nn.functional as F


def pos_embed_2d_sincos(
    grid_h: int,
    grid_w: int,
    dim: int,
    *,
    cls_token=True,
    temperature=10000.0,
    dtype=torch.float32,
    device=None,
):
    """Fixed 2D sin-cos position embedding (MAE's layout: omega_i = T^(-i / (D/4)); big_vision's
    ``posemb_sincos_2d``, used by CLIPA's JAX code, divides by D/4 - 1 instead) for any grid.

    Patch n = y * grid_w + x gets [sin(x w), cos(x w), sin(y w), cos(y w)], w_i = temperature^(-i/(dim/4)),
    i < dim/4. Returns [1 + grid_h*grid_w, dim] with a zero class row first (``cls_token=True``),
    else [grid_h*grid_w, dim]. Computed in fp64, returned in ``dtype``.

    >>> pos_embed_2d_sincos(14, 14, 768).shape
    torch.Size([197, 768])
    """
    if dim % 4:
        raise ValueError(f"dim must be a multiple of 4 for the 2D sin-cos embedding, got {dim}")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid must be at least 1x1, got {grid_h}x{grid_w}")
    omega = temperature ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y, x = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    ax, ay = x.reshape(-1, 1) * omega, y.reshape(-1, 1) * omega
    emb = torch.cat([ax.sin(), ax.cos(), ay.sin(), ay.cos()], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb])
    return emb.to(dtype=dtype, device=device)


def interpolate_pos_embed(pos, new_grid, old_grid=None, *, antialias=True):
    """Resize a learned position table [1 + gh*gw, D] to new_grid (gh', gw'): bicubic on the grid
    (align_corners=False, antialiased when shrinking, as open_clip / timm; in fp32 or fp64), class
    row 0 kept. Identity when the grid is unchanged.

    old_grid defaults to the square grid of the table. Returns [1 + gh'*gw', D] in pos's dtype.

    >>> interpolate_pos_embed(torch.randn(1 + 4 * 4, 32), (7, 7)).shape
    torch.Size([50, 32])
    """
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[0] < 2:
        raise ValueError(f"pos must be a [1 + gh*gw, D] tensor, got {getattr(pos, 'shape', type(pos))}")
    n = pos.shape[0] - 1
    if old_grid is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"pos has {n} patch rows, not a square grid: pass old_grid=(gh, gw)")
        old_grid = (side, side)
    old_grid, new_grid = tuple(int(g) for g in old_grid), tuple(int(g) for g in new_grid)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(
            f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} cells but pos has {n} patch rows"
        )
    if min(new_grid) < 1 or len(new_grid) != 2:
        raise ValueError(f"new_grid must be two positive ints (gh, gw), got {new_grid}")
    if new_grid == old_grid:
        return pos.clone()
    work = torch.float64 if pos.dtype == torch.float64 else torch.float32
    grid = pos[1:].to(work).reshape(1, *old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=antialias)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[1]).to(pos.dtype)])
