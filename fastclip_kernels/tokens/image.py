"""CLIPA image token reduction (arXiv 2305.07017, Fig. 2): which patches of a ``gh x gw`` ViT patch
grid are kept during pre-training, or a smaller grid by resizing the images.

Index outputs are int64 positions in the row-major patch grid (patch ``(r, c)`` -> ``r * gw + c``),
sorted per image. The random draws are made on the output device from the given ``torch.Generator``
(same seed -> same mask). Nothing is read back to the host (``random_keep_varlen`` with GPU counts:
give ``total``), so a training step stays asynchronous.

* ``random_keep`` (``_varlen``: a count per image, packed): a uniformly random subset (FLIP/CLIPA).
* ``grid_keep``: one patch per 2x2 window, by default the same random corner in every window of an
  image (as CLIPA's figure shows); ``per_window=True`` draws a corner per window.
* ``block_keep``: one contiguous, near-square block at a uniformly random position (``block_shape``).
* ``resize_images`` / ``resized_grid``: CLIPA's resizing strategy (the best one in the paper).

The class token is never dropped: ``with_class_token`` maps patch indices to positions in the
``[CLS, patch_0, ...]`` token sequence (``+1``, CLS = 0 first) and ``gather_tokens`` applies them.
"""

import math

import torch
import torch.nn.functional as F

from .. import _validation

INT_DTYPES = (torch.int32, torch.int64)


def check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` as a Python int in [lo, hi] (no upper bound when ``hi`` is None)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _pair(name: str, value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in pair)
    ):
        raise TypeError(f"{name} must be a positive int or a pair of positive ints (h, w), got {value!r}")
    return int(pair[0]), int(pair[1])


def draw_device(generator, device) -> torch.device:
    """The device to draw on: ``device``, else the generator's, else CPU; they must agree."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator is on {generator.device} but device is {device}; they must match")
    return device


def random_keep(batch: int, grid, keep: int, *, generator=None, device=None) -> torch.Tensor:
    """A uniformly random subset of ``keep`` patches per image: ``idx [batch, keep]`` int64, sorted.

    ``argsort`` of ``U(0, 1)`` noise ``[batch, gh * gw]`` drawn on ``device``; the first ``keep``
    of each row are kept (CLIPA/FLIP random masking; open_clip ``PatchDropout``).

    >>> g = torch.Generator().manual_seed(0)
    >>> random_keep(2, (14, 14), 49, generator=g).shape
    torch.Size([2, 49])
    """
    batch = check_int("batch", batch, 1)
    gh, gw = _pair("grid", grid)
    keep = check_int("keep", keep, 1, gh * gw)
    noise = torch.rand(batch, gh * gw, generator=generator, device=draw_device(generator, device))
    return noise.argsort(dim=1)[:, :keep].sort(dim=1).values


def _keep_counts(keep_counts, batch: int, n: int, device: torch.device, total):
    """keep_counts as an int64 tensor on ``device`` plus their sum as a host int."""
    if isinstance(keep_counts, (list, tuple)):
        for k in keep_counts:
            check_int("keep_counts[i]", k, 1, n)
        total = sum(keep_counts) if total is None else total  # a mismatch is caught below
        keep_counts = torch.tensor(keep_counts, dtype=torch.int64)  # on the host: checked there
    if not isinstance(keep_counts, torch.Tensor):
        raise TypeError(f"keep_counts must be a list of ints or a tensor, got {type(keep_counts).__name__}")
    check_int_tensor("keep_counts", keep_counts, 1, (batch,))  # one count per image
    if _validation.index_checks_enabled(keep_counts):
        lo, hi, count = int(keep_counts.min()), int(keep_counts.max()), int(keep_counts.sum())
        if lo < 1 or hi > n:
            raise ValueError(f"keep_counts must be in [1, {n}] (gh * gw), got min {lo}, max {hi}")
        if total is not None and total != count:
            raise ValueError(f"total must be the sum of keep_counts, {count}, got {total}")
    if total is None:  # a host read for a device tensor; pass total= to avoid it
        total = int(keep_counts.sum())
    if keep_counts.device.type == "cpu" and device.type == "cuda":  # pinned: a non-blocking upload
        keep_counts = keep_counts.pin_memory().to(device, non_blocking=True)
    return keep_counts.to(device, torch.int64), total


def random_keep_varlen(
    batch: int, grid, keep_counts, *, total: int | None = None, generator=None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniformly random subset of ``keep_counts[b]`` patches for image ``b``, packed.

    Returns ``idx [T]`` int64 (each image's indices sorted, images one after the other,
    ``T = sum(keep_counts)``) and ``cu_seqlens [batch + 1]`` int32. ``keep_counts`` is a host list
    or an int tensor ``[batch]``; for a GPU tensor give ``total`` (its sum) or the sum is read back.
    The longest image has ``max(keep_counts)`` patches (flash-attention's ``max_seqlen``).

    >>> idx, cu = random_keep_varlen(3, 4, [2, 5, 16])
    >>> cu.tolist()
    [0, 2, 7, 23]
    """
    batch = check_int("batch", batch, 1)
    gh, gw = _pair("grid", grid)
    n = gh * gw
    if device is None and generator is None and isinstance(keep_counts, torch.Tensor):
        device = keep_counts.device
    device = draw_device(generator, device)
    counts, total = _keep_counts(keep_counts, batch, n, device, total)
    total = check_int("total", total, 1, batch * n)
    rank = torch.rand(batch, n, generator=generator, device=device).argsort(dim=1).argsort(dim=1)
    order = (rank >= counts[:, None]).to(torch.int8).argsort(dim=1, stable=True)  # kept first, ascending
    cu = torch.zeros(batch + 1, dtype=torch.int64, device=device)
    cu[1:] = counts.cumsum(0)
    row = torch.repeat_interleave(torch.arange(batch, device=device), counts, output_size=total)
    col = torch.arange(total, device=device) - cu[row]
    return order[row, col], cu.to(torch.int32)


def grid_keep(batch: int, grid, *, per_window: bool = False, generator=None, device=None) -> torch.Tensor:
    """One patch per 2x2 window: ``idx [batch, ceil(gh/2) * ceil(gw/2)]`` int64, sorted.

    The kept patch of window ``(i, j)`` is ``(min(2i + dy, gh - 1), min(2j + dx, gw - 1))``, with
    ``(dy, dx)`` uniform in {0, 1}^2 drawn once per image (CLIPA's figure: the same corner in every
    window) or, with ``per_window=True``, once per window.

    >>> grid_keep(1, 4, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([1, 4])
    """
    batch = check_int("batch", batch, 1)
    gh, gw = _pair("grid", grid)
    device = draw_device(generator, device)
    wy, wx = (gh + 1) // 2, (gw + 1) // 2
    shape = (batch, wy, wx) if per_window else (batch, 1, 1)
    dy = torch.randint(0, 2, shape, generator=generator, device=device)
    dx = torch.randint(0, 2, shape, generator=generator, device=device)
    rows = (2 * torch.arange(wy, device=device).view(1, wy, 1) + dy).clamp_max(gh - 1)
    cols = (2 * torch.arange(wx, device=device).view(1, 1, wx) + dx).clamp_max(gw - 1)
    return (rows * gw + cols).reshape(batch, wy * wx).sort(dim=1).values


def block_shape(grid, keep: int) -> tuple[int, int]:
    """``(bh, bw)`` of the block ``block_keep`` keeps: as square as the grid allows.

    ``bw = ceil(sqrt(keep))``, raised to ``ceil(keep / gh)`` and capped at ``gw`` so it fits;
    ``bh = ceil(keep / bw)``. When ``keep`` is not ``bh * bw`` the block's last row is partial
    (its first ``keep - (bh - 1) * bw`` patches), so exactly ``keep`` patches are kept:
    ``keep=16 -> 4x4``, ``keep=12 -> 3x4``, ``keep=50 -> 7x8`` with 2 patches in the last row.
    """
    gh, gw = _pair("grid", grid)
    keep = check_int("keep", keep, 1, gh * gw)
    bw = min(max(math.isqrt(keep - 1) + 1, -(-keep // gh)), gw)
    return -(-keep // bw), bw


def block_keep(batch: int, grid, keep: int, *, generator=None, device=None) -> torch.Tensor:
    """One contiguous block of ``keep`` patches per image: ``idx [batch, keep]`` int64, sorted.

    The block has the shape ``block_shape(grid, keep)`` (square when ``keep`` is a square) and a
    top-left corner uniform over the positions where it fits, drawn per image.

    >>> block_keep(2, 4, 4, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([2, 4])
    """
    batch = check_int("batch", batch, 1)
    gh, gw = _pair("grid", grid)
    bh, bw = block_shape((gh, gw), keep)
    device = draw_device(generator, device)
    y0 = torch.randint(0, gh - bh + 1, (batch, 1), generator=generator, device=device)
    x0 = torch.randint(0, gw - bw + 1, (batch, 1), generator=generator, device=device)
    t = torch.arange(keep, device=device)
    return (y0 + t // bw) * gw + x0 + t % bw


def resize_images(images: torch.Tensor, size) -> torch.Tensor:
    """CLIPA's resizing: ``images [B, C, H, W]`` -> ``[B, C, h, w]``, bilinear with antialiasing.

    ``size`` is an int (square) or ``(h, w)``. Every pixel still contributes, unlike masking.

    >>> resize_images(torch.rand(2, 3, 224, 224), 112).shape
    torch.Size([2, 3, 112, 112])
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"images must be a floating [B, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}"
        )
    size = _pair("size", size)
    return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)


def resized_grid(size, patch_size) -> tuple[int, int]:
    """The patch grid ``(h // p, w // p)`` of images resized to ``size`` (the stride-p patch
    embedding drops trailing pixels, as open_clip's ``image_size // patch_size``)."""
    h, w = _pair("size", size)
    ph, pw = _pair("patch_size", patch_size)
    if ph > h or pw > w:
        raise ValueError(f"size {(h, w)} must be at least patch_size {(ph, pw)}")
    return h // ph, w // pw


def check_int_tensor(name: str, t, dims: int, shape: tuple | None = None) -> None:
    """``t`` must be an int64 (or int32) tensor with ``dims`` dims (and ``shape`` if given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name} must be int64 (or int32), got {t.dtype}")
    if t.dim() != dims or (shape is not None and tuple(t.shape) != shape):
        raise ValueError(f"{name} must have shape {shape or f'of {dims} dims'}, got {tuple(t.shape)}")


def _check_cu_seqlens(cu_seqlens, total: int, device, batch: int | None = None) -> None:
    check_int_tensor("cu_seqlens", cu_seqlens, 1)
    n = cu_seqlens.numel()
    if n < 2 or (batch is not None and n != batch + 1) or cu_seqlens.device != device:
        entries = "B + 1 (B >= 1)" if batch is None else f"{batch + 1} (B + 1)"
        raise ValueError(f"cu_seqlens must have {entries} entries on {device}, got {tuple(cu_seqlens.shape)}")
    if _validation.index_checks_enabled(cu_seqlens):
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total or (cu_seqlens.diff() < 0).any():
            raise ValueError(f"cu_seqlens must rise from 0 to {total} (the packed length)")


def _check_range(name: str, idx: torch.Tensor, n: int, what: str) -> None:
    if idx.numel() and _validation.index_checks_enabled(idx):
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} must be in [0, {n}) ({what}), got min {lo}, max {hi}")


def _rows(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """The sequence each packed position belongs to."""
    t = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True)


def with_class_token(idx: torch.Tensor, cu_seqlens: torch.Tensor | None = None, *, grid=None):
    """Patch indices -> token indices of ``[CLS, patch_0, ...]``: ``+1``, and CLS (0) first.

    Padded: ``idx [B, k]`` -> ``(tokens [B, k + 1], cu_seqlens [B + 1])``.
    Packed: ``(idx [T], cu_seqlens [B + 1])`` -> ``(tokens [T + B], cu_seqlens [B + 1])``.
    Returned ``cu_seqlens`` (int32) delimit the token sequences. ``grid`` checks the index range.

    >>> with_class_token(torch.tensor([[3, 5]]))[0].tolist()
    [[0, 4, 6]]
    """
    check_int_tensor("idx", idx, 1 if cu_seqlens is not None else 2)
    if grid is not None:
        gh, gw = _pair("grid", grid)
        _check_range("idx", idx, gh * gw, "patch indices of the grid")
    idx = idx.to(torch.int64)
    if cu_seqlens is None:
        b, k = idx.shape
        cu = torch.arange(b + 1, device=idx.device, dtype=torch.int32) * (k + 1)
        return torch.cat([idx.new_zeros(b, 1), idx + 1], dim=1), cu
    _check_cu_seqlens(cu_seqlens, idx.shape[0], idx.device)
    cu = cu_seqlens.to(torch.int64)
    b, total = cu.shape[0] - 1, idx.shape[0]
    tokens = idx.new_zeros(total + b)
    tokens[torch.arange(total, device=idx.device) + _rows(cu, total) + 1] = idx + 1
    return tokens, (cu + torch.arange(b + 1, device=idx.device)).to(torch.int32)


def gather_tokens(x: torch.Tensor, token_idx: torch.Tensor, cu_seqlens: torch.Tensor | None = None):
    """Keep the tokens ``token_idx`` of ``x [B, S, D]``: ``[B, k, D]``, or packed ``[T, D]``
    when ``cu_seqlens`` is given (``token_idx [T]``, e.g. from ``with_class_token``).

    >>> x = torch.randn(2, 197, 8)
    >>> tok, _ = with_class_token(random_keep(2, 14, 49))
    >>> gather_tokens(x, tok).shape
    torch.Size([2, 50, 8])
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a [B, S, D] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    check_int_tensor("token_idx", token_idx, 1 if cu_seqlens is not None else 2)
    if token_idx.device != x.device:
        raise ValueError(f"token_idx is on {token_idx.device}, expected {x.device} (as x)")
    _check_range("token_idx", token_idx, x.shape[1], "tokens of x")
    if cu_seqlens is None:
        if token_idx.shape[0] != x.shape[0]:
            raise ValueError(f"token_idx has batch {token_idx.shape[0]}, expected {x.shape[0]} (as x)")
        index = token_idx.to(torch.int64).unsqueeze(-1).expand(-1, -1, x.shape[2])
        return torch.gather(x, 1, index)
    _check_cu_seqlens(cu_seqlens, token_idx.shape[0], x.device, batch=x.shape[0])
    return x[_rows(cu_seqlens.to(torch.int64), token_idx.shape[0]), token_idx.to(torch.int64)]
