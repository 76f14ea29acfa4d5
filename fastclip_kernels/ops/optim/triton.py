"""Triton multi-tensor AdamW / LAMB: one launch updates every tensor of a dtype bucket.

Same contract as ``reference.py`` (read it for the math). A device-resident int64 table holds one
row per tensor, [param, grad, exp_avg, exp_avg_sq, master or 0, step, numel] (addresses), and a
chunk list of (tensor index, start); program ``pid`` updates BLOCK elements of one chunk, loading
its pointers from the table. No host synchronization: steps, lr (optionally), the clip coefficient
and LAMB's trust ratios are read from device memory. Norms use per-chunk partial sums, reduced in a
fixed order (no atomics anywhere): ``global_grad_norm`` with ``sum``, LAMB's per-tensor norms with
``_segment_sum_kernel`` (one program per tensor and norm), so every result is bitwise reproducible
run to run on the same GPU and launch shapes. (The native CUDA kernels are not: see ``native.py``.)

Bytes per element and step (fp32 params): AdamW reads p, g, m, v and writes p, m, v (28 B); LAMB
adds a second pass reading p, m, v and writing p (44 B).
"""

import math

import torch
import triton
import triton.language as tl

from ..common import small_tiles

ROW = 7  # table columns
SEGMENT_BLOCK = 256  # chunk partials summed per strip by _segment_sum_kernel
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _chunk(table_ptr, chunk_ptr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    idx = tl.load(chunk_ptr + 2 * pid)
    start = tl.load(chunk_ptr + 2 * pid + 1)
    row = table_ptr + idx * 7
    numel = tl.load(row + 6)
    offs = start + tl.arange(0, BLOCK)
    return idx, row, offs, offs < numel


@triton.jit
def _ptr(row, col, DTYPE: tl.constexpr):
    return tl.load(row + col).to(tl.pointer_type(DTYPE))


@triton.jit
def _load_weight_grad(
    row, offs, mask, scale_ptr, HAS_SCALE: tl.constexpr, HAS_MASTER: tl.constexpr, P_DTYPE: tl.constexpr
):
    if HAS_MASTER:
        w = tl.load(_ptr(row, 4, tl.float32) + offs, mask=mask, other=0.0)
    else:
        w = tl.load(_ptr(row, 0, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(_ptr(row, 1, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr)
    return w, g


@triton.jit
def _round_to(w, P_DTYPE: tl.constexpr):
    """fp32 -> param dtype, round to nearest even. bf16 is rounded on the bits: the Triton
    interpreter's bf16 cast truncates, and this is exact and cheap on a GPU too."""
    if P_DTYPE == tl.bfloat16:
        bits = w.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(w != w, 0x7FC0, rounded)  # NaN stays NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return w.to(P_DTYPE)


@triton.jit
def _store_weight(row, offs, mask, w, HAS_MASTER: tl.constexpr, P_DTYPE: tl.constexpr):
    if HAS_MASTER:
        tl.store(_ptr(row, 4, tl.float32) + offs, w, mask=mask)
    tl.store(_ptr(row, 0, P_DTYPE) + offs, _round_to(w, P_DTYPE), mask=mask)


@triton.jit
def _bias_corrections(row, log_beta1, log_beta2):
    t = tl.load(_ptr(row, 5, tl.float32))
    return 1.0 - tl.exp(t * log_beta1), 1.0 - tl.exp(t * log_beta2)


@triton.jit
def _sq_norm_kernel(table_ptr, chunk_ptr, partial_ptr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    # partial[pid] = sum of g^2 over one chunk of one tensor's gradient.
    idx, row, offs, mask = _chunk(table_ptr, chunk_ptr, P_DTYPE, BLOCK)
    g = tl.load(_ptr(row, 1, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


@triton.jit
def _segment_sum_kernel(partial_ptr, starts_ptr, sums_ptr, num_chunks, num_tensors, BLOCK: tl.constexpr):
    # sums[r, t] = sum of partial[r, starts[t] : starts[t + 1]] (tensor t's chunks), in a fixed order:
    # one program per (tensor t, row r), BLOCK-wide strips then one tree sum. Grid: (num_tensors, 2).
    t = tl.program_id(0)
    r = tl.program_id(1)
    start = tl.load(starts_ptr + t)
    end = tl.load(starts_ptr + t + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(start, end, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        acc += tl.load(partial_ptr + r * num_chunks + offs, mask=offs < end, other=0.0)
    tl.store(sums_ptr + r * num_tensors + t, tl.sum(acc, axis=0))


@triton.jit
def _adamw_kernel(
    table_ptr, chunk_ptr, lr_ptr, scale_ptr, lr, log_beta1, log_beta2, beta1, beta2, eps, weight_decay,
    LR_FROM_PTR: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_MASTER: tl.constexpr,
    P_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    idx, row, offs, mask = _chunk(table_ptr, chunk_ptr, P_DTYPE, BLOCK)
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr)
    w, g = _load_weight_grad(row, offs, mask, scale_ptr, HAS_SCALE, HAS_MASTER, P_DTYPE)
    m_ptr, v_ptr = _ptr(row, 2, tl.float32), _ptr(row, 3, tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    bc1, bc2 = _bias_corrections(row, log_beta1, log_beta2)
    w = w * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)
    v = beta2 * v + (1.0 - beta2) * g * g
    w = w - (lr / bc1) * (m / (tl.sqrt(v) / tl.sqrt(bc2) + eps))
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    _store_weight(row, offs, mask, w, HAS_MASTER, P_DTYPE)


@triton.jit
def _lamb_update(m, v, w, bc1, bc2, eps, weight_decay, BIAS_CORRECTION: tl.constexpr):
    if BIAS_CORRECTION:
        m = m / bc1
        v = v / bc2
    return m / (tl.sqrt(v) + eps) + weight_decay * w


@triton.jit
def _lamb_stage1_kernel(
    table_ptr, chunk_ptr, scale_ptr, partial_ptr, num_chunks, log_beta1, log_beta2, beta1, beta2, eps,
    weight_decay, grad_coef, BIAS_CORRECTION: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_MASTER: tl.constexpr, P_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # m, v update; partial[0|1, pid] = sum over the chunk of w^2 and of u^2 (u: the LAMB update).
    idx, row, offs, mask = _chunk(table_ptr, chunk_ptr, P_DTYPE, BLOCK)
    w, g = _load_weight_grad(row, offs, mask, scale_ptr, HAS_SCALE, HAS_MASTER, P_DTYPE)
    m_ptr, v_ptr = _ptr(row, 2, tl.float32), _ptr(row, 3, tl.float32)
    m = beta1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + grad_coef * g
    v = beta2 * tl.load(v_ptr + offs, mask=mask, other=0.0) + (1.0 - beta2) * g * g
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    bc1, bc2 = _bias_corrections(row, log_beta1, log_beta2)
    u = tl.where(mask, _lamb_update(m, v, w, bc1, bc2, eps, weight_decay, BIAS_CORRECTION), 0.0)
    pid = tl.program_id(0)
    tl.store(partial_ptr + pid, tl.sum(w * w, axis=0))
    tl.store(partial_ptr + num_chunks + pid, tl.sum(u * u, axis=0))


@triton.jit
def _lamb_stage2_kernel(
    table_ptr, chunk_ptr, lr_ptr, ratio_ptr, lr, log_beta1, log_beta2, eps, weight_decay,
    LR_FROM_PTR: tl.constexpr, BIAS_CORRECTION: tl.constexpr, HAS_MASTER: tl.constexpr,
    P_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # Recompute u from the updated m, v (no temp buffer), then w -= lr * ratio[tensor] * u.
    idx, row, offs, mask = _chunk(table_ptr, chunk_ptr, P_DTYPE, BLOCK)
    if LR_FROM_PTR:
        lr = tl.load(lr_ptr)
    if HAS_MASTER:
        w = tl.load(_ptr(row, 4, tl.float32) + offs, mask=mask, other=0.0)
    else:
        w = tl.load(_ptr(row, 0, P_DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(_ptr(row, 2, tl.float32) + offs, mask=mask, other=0.0)
    v = tl.load(_ptr(row, 3, tl.float32) + offs, mask=mask, other=0.0)
    bc1, bc2 = _bias_corrections(row, log_beta1, log_beta2)
    u = _lamb_update(m, v, w, bc1, bc2, eps, weight_decay, BIAS_CORRECTION)
    w = w - lr * tl.load(ratio_ptr + idx) * u
    _store_weight(row, offs, mask, w, HAS_MASTER, P_DTYPE)


# ----------------------------------------------------------------------------------------------
# Host side: pointer tables (cached), launches. Same signatures as reference.py.
# ----------------------------------------------------------------------------------------------

_CACHE: dict = {}
_CACHE_SIZE = 16


INTERPRETER_PROGRAMS = 256  # about this many programs per launch under the interpreter


def _block(device: torch.device, numels) -> int:
    """Elements per program: 1024 on a GPU. The interpreter runs programs one after another in Python,
    so there the block grows with the total size (powers of two from 64) to keep the program count near
    ``INTERPRETER_PROGRAMS``: tiny test tensors still span several chunks, a model's step stays fast."""
    if device.type != "cpu" or not small_tiles():
        return 1024
    return max(64, triton.next_power_of_2(-(-sum(numels) // INTERPRETER_PROGRAMS)))


def _log(beta: float) -> float:
    return math.log(beta) if beta > 0 else -math.inf


def _addr(t) -> int:
    return t.data_ptr() if t is not None else 0


def _tables(columns, numels, device, block):
    """(table [T, 7] int64, chunks [C, 2] int64, starts [T + 1] int64: tensor t's chunks are
    starts[t] : starts[t + 1]) on ``device``; cached by addresses, so a loop whose tensors keep their
    storage builds it once (an LRU bounds the cache)."""
    rows = [
        [_addr(c) for c in cols] + [n] for cols, n in zip(zip(*columns, strict=True), numels, strict=True)
    ]
    key = (device, block, tuple(map(tuple, rows)))
    if key in _CACHE:
        _CACHE[key] = _CACHE.pop(key)  # most recently used last
        return _CACHE[key]
    chunks = [(i, start) for i, n in enumerate(numels) for start in range(0, n, block)]
    starts = [0]
    for n in numels:
        starts.append(starts[-1] + -(-n // block))
    host = [torch.tensor(rows, dtype=torch.int64), torch.tensor(chunks, dtype=torch.int64)]
    host.append(torch.tensor(starts, dtype=torch.int64))
    if device.type == "cuda":
        host = [t.pin_memory() for t in host]
    entry = tuple(t.to(device, non_blocking=True) for t in host)
    _CACHE[key] = entry
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.pop(next(iter(_CACHE)))
    return entry


def _columns(params, grads, exp_avgs, exp_avg_sqs, masters, steps):
    n = len(params)
    masters = masters if masters is not None else [None] * n
    return (params, grads, exp_avgs, exp_avg_sqs, masters, steps), [p.numel() for p in params]


def global_grad_norm(grads) -> torch.Tensor:
    """0-d fp32 L2 norm over all gradients (one launch per gradient dtype), on their device."""
    device = grads[0].device
    total = torch.zeros((), device=device, dtype=torch.float32)
    for dtype in sorted({g.dtype for g in grads}, key=str):  # a fixed order: the fp32 sum is reproducible
        bucket = [g for g in grads if g.dtype == dtype]
        block = _block(device, [g.numel() for g in bucket])
        none = [None] * len(bucket)
        table, chunks, _ = _tables(
            (none, bucket, none, none, none, none), [g.numel() for g in bucket], device, block
        )
        partial = torch.empty(chunks.shape[0], device=device, dtype=torch.float32)
        _sq_norm_kernel[(chunks.shape[0],)](table, chunks, partial, P_DTYPE=_TL[dtype], BLOCK=block)
        total = total + partial.sum()
    return total.sqrt()


def _lr_args(lr, device):
    if isinstance(lr, torch.Tensor):
        return lr, 0.0, True
    return torch.empty(0, device=device), float(lr), False


def adamw_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    masters,
    steps,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_scale=None,
):
    """One AdamW step over all tensors (one dtype, one device) in a single launch."""
    device, block = params[0].device, _block(params[0].device, [p.numel() for p in params])
    table, chunks, _ = _tables(*_columns(params, grads, exp_avgs, exp_avg_sqs, masters, steps), device, block)
    lr_ptr, lr_value, lr_from_ptr = _lr_args(lr, device)
    _adamw_kernel[(chunks.shape[0],)](
        table, chunks, lr_ptr, grad_scale if grad_scale is not None else lr_ptr, lr_value,
        _log(beta1), _log(beta2), beta1, beta2, eps, weight_decay,
        LR_FROM_PTR=lr_from_ptr, HAS_SCALE=grad_scale is not None, HAS_MASTER=masters is not None,
        P_DTYPE=_TL[params[0].dtype], BLOCK=block,
    )  # fmt: skip


def lamb_(
    params, grads, exp_avgs, exp_avg_sqs, masters, steps, *, lr, beta1, beta2, eps, weight_decay,
    bias_correction=True, grad_averaging=True, use_trust_ratio=True, grad_scale=None,
):  # fmt: skip
    """One LAMB step: stage 1 (moments, per-tensor norms), trust ratios, stage 2 (update)."""
    device, block = params[0].device, _block(params[0].device, [p.numel() for p in params])
    table, chunks, starts = _tables(
        *_columns(params, grads, exp_avgs, exp_avg_sqs, masters, steps), device, block
    )
    num_chunks, p_dtype, has_master = chunks.shape[0], _TL[params[0].dtype], masters is not None
    partial = torch.empty((2, num_chunks), device=device, dtype=torch.float32)
    lr_ptr, lr_value, lr_from_ptr = _lr_args(lr, device)
    _lamb_stage1_kernel[(num_chunks,)](
        table, chunks, grad_scale if grad_scale is not None else partial, partial, num_chunks,
        _log(beta1), _log(beta2), beta1, beta2, eps, weight_decay,
        (1.0 - beta1) if grad_averaging else 1.0,
        BIAS_CORRECTION=bias_correction, HAS_SCALE=grad_scale is not None, HAS_MASTER=has_master,
        P_DTYPE=p_dtype, BLOCK=block,
    )  # fmt: skip
    sums = torch.empty((2, len(params)), device=device, dtype=torch.float32)
    _segment_sum_kernel[(len(params), 2)](partial, starts, sums, num_chunks, len(params), BLOCK=SEGMENT_BLOCK)
    w_norm, u_norm = sums.sqrt()
    ratio = torch.ones_like(w_norm)
    if use_trust_ratio:
        ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, ratio)
    _lamb_stage2_kernel[(num_chunks,)](
        table, chunks, lr_ptr, ratio, lr_value, _log(beta1), _log(beta2), eps, weight_decay,
        LR_FROM_PTR=lr_from_ptr, BIAS_CORRECTION=bias_correction, HAS_MASTER=has_master,
        P_DTYPE=p_dtype, BLOCK=block,
    )  # fmt: skip
