"""Triton device functions shared by the pairwise kernels (``pairwise.py``, the losses, the anchor ops): the similarity tile,
numerically safe softplus / sigmoid, the positive-pair mask, the per-tile dL/dz (W) and the per-row power-of-two
rescaling of W that keeps an fp16 second GEMM from underflowing (``_rescale_rows``)."""

import triton
import triton.language as tl

# Rows per int64 step of ``_rows``: offsets inside a chunk, below (ROW_CHUNK + BLOCK) * stride, stay
# under 2^31 for row strides below MAX_ROW_STRIDE (~490K) (launchers check: ``pairwise.check_row_strides``).
ROW_CHUNK = 4096
MAX_ROW_STRIDE = 2**31 // (ROW_CHUNK + 256)


@triton.jit
def _rows(ptr, row_start, stride_row, ROWS: tl.constexpr, CHUNK: tl.constexpr = 4096):
    """(base pointer, int32 offsets [ROWS]) of rows row_start .. row_start + ROWS - 1 of a matrix with
    row stride ``stride_row``: row row_start + i is at base + offsets[i]; add column offsets to the
    int32 offsets before the pointer (``base + (offsets[:, None] + offs_col[None, :])``).

    row * stride passes 2^31 once rows x D >= 2^31 (2.1M rows at D = 1024), so the base of row_start's
    CHUNK-aligned chunk (CHUNK <= ROW_CHUNK) is computed in int64 (one scalar) and only the offset
    inside the chunk in int32: no int64 [ROWS, C] tensors, which spill in the backward kernels (48 B
    and more on sm_90).
    """
    row_in_chunk = row_start % CHUNK
    base = ptr + tl.cast(row_start - row_in_chunk, tl.int64) * stride_row
    return base, (row_in_chunk + tl.arange(0, ROWS)) * stride_row


@triton.jit
def _rows_again(ptr, row_start, stride_row, ROWS: tl.constexpr):
    """``_rows`` for a second read of the same rows later in a loop body (the C tile of the backward's
    second GEMM): the same addresses split at ROW_CHUNK / 2, so the compiler does not share (and keep
    live across the similarity tile) the first read's offsets, which spills 16-32 B in the fp32 anchor
    backward on sm_90 (as does calling it just before the load instead of right after the tile)."""
    return _rows(ptr, row_start, stride_row, ROWS, 2048)


@triton.jit
def _similarity_tile(
    a_base,
    a_offs,
    c_base,
    c_offs,
    mask_m,
    mask_n,
    D,
    BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """<a_i, c_j> for one [BLOCK_M, BLOCK_N] tile, fp32 accumulation over D in BLOCK_D steps.

    (a_base, a_offs [BLOCK_M]) / (c_base, c_offs [BLOCK_N]): the tile's rows of A / C (``_rows``).
    """
    acc = tl.zeros((a_offs.shape[0], c_offs.shape[0]), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        a = tl.load(
            a_base + a_offs[:, None] + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0
        )
        c = tl.load(
            c_base + c_offs[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
        )
        acc = tl.dot(a, tl.trans(c), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _softplus(z):
    """log(1 + exp(z)) without overflow, accurate where exp(-|z|) is below fp32 epsilon."""
    t = tl.exp(-tl.abs(z))
    log1p_t = tl.where(t < 1e-4, t * (1.0 - 0.5 * t), tl.log(1.0 + t))
    return tl.maximum(z, 0.0) + log1p_t


@triton.jit
def _sigmoid(z):
    """1 / (1 + exp(-z)) from exp(-|z|) <= 1, so no exp ever overflows."""
    t = tl.exp(-tl.abs(z))
    return tl.where(z >= 0, 1.0 / (1.0 + t), t / (1.0 + t))


@triton.jit
def _is_positive(offs_m, offs_n, label_offset):
    return offs_n[None, :] == offs_m[:, None] + label_offset


@triton.jit
def _pairwise_weight(
    z,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    label_offset,
    lse_row_ptr,
    g_row_ptr,
    lse_col_ptr,
    g_col_ptr,
    g_ptr,
    LOSS: tl.constexpr,
    HAS_ROW_TERM: tl.constexpr,
    HAS_COL_TERM: tl.constexpr,
):
    """W_ij = dL/dz_ij for one tile (see the module docstring), zero outside the matrix."""
    w = tl.zeros(z.shape, dtype=tl.float32)
    pos = _is_positive(offs_m, offs_n, label_offset).to(tl.float32)
    if LOSS == 0:
        if HAS_ROW_TERM:
            lse_row = tl.load(lse_row_ptr + offs_m, mask=mask_m, other=0.0)
            g_row = tl.load(g_row_ptr + offs_m, mask=mask_m, other=0.0)
            w += g_row[:, None] * (tl.exp(z - lse_row[:, None]) - pos)
        if HAS_COL_TERM:
            lse_col = tl.load(lse_col_ptr + offs_n, mask=mask_n, other=0.0)
            g_col = tl.load(g_col_ptr + offs_n, mask=mask_n, other=0.0)
            w += g_col[None, :] * (tl.exp(z - lse_col[None, :]) - pos)
    else:
        w += tl.load(g_ptr).to(tl.float32) * (_sigmoid(z) - pos)
    return tl.where(mask_m[:, None] & mask_n[None, :], w, 0.0)


@triton.jit
def _rescale_rows(w, acc, row_log2):
    """Online per-row power-of-two rescale of W before ``tl.dot(w.to(fp16), c, acc)``.

    fp16 W underflows once |W| < 2^-24 (W ~ 1/(2 b N) at batch b and N columns: b = N = 4096 is enough),
    so each row of W is scaled to max |W| <= 2^14 and the fp32 accumulator carries the same row scale,
    raised as larger tiles arrive (as flash attention raises its running max). ``row_log2`` [BLOCK_M]
    is the running log2 of the row's scale (start at -126); unscale the result with ``_unscale_rows``.
    Returns (scaled w, rescaled acc, new row_log2).
    """
    w_max = tl.max(tl.abs(w), axis=1)
    tile_log2 = tl.ceil(tl.log2(tl.maximum(w_max, 1e-30)))
    new_log2 = tl.maximum(row_log2, tile_log2)
    acc = acc * tl.exp2(row_log2 - new_log2)[:, None]
    # Scaled row max |W| <= 2^14: below fp16's largest finite value (65504 < 2^16), so values down to
    # 2^-28 of the row max stay in fp16's normal range (smallest normal 2^-14).
    w = w * tl.exp2(14.0 - new_log2)[:, None]
    return w, acc, new_log2


@triton.jit
def _unscale_rows(acc, row_log2):
    """The true W @ C from an accumulator of row-scaled W (see ``_rescale_rows``)."""
    return acc * tl.exp2(row_log2 - 14.0)[:, None]
