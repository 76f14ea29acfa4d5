"""Varlen (packed) self-attention for masked-patch ViTs, with flash-attn's argument names.

B sequences of different lengths are packed along the token axis (no padding); ``cu_seqlens``
(int32 [B + 1], cumulative lengths, starting at 0) says where each one starts. Per sequence and
head: O = softmax(s * Q K^T) V, s = softmax_scale (default d ** -0.5).

Backends (``backend=``):
    * ``"triton"``     -- ours (``triton.py``, ``triton_bwd.py``): FA2-style forward and deterministic backward;
      CUDA, or CPU under TRITON_INTERPRET=1. fp16/bf16/fp32, head dim a multiple of 8 in [16, 128].
    * ``"flash_attn"`` -- flash_attn.flash_attn_varlen_{qkvpacked_,}func (CUDA, fp16/bf16).
    * ``"xformers"``   -- memory_efficient_attention with a BlockDiagonalMask (reads cu_seqlens
      back to the host: a sync).
    * ``"torch"``      -- torch.nn.attention.varlen.varlen_attn (CUDA fp16/bf16, torch >= 2.10),
      else SDPA on nested jagged tensors (CPU too, non-causal only).
    * ``"reference"``  -- ``naive.varlen_attention_ref``: per-sequence softmax in fp32 (fp64 for
      fp64 inputs); the ground truth. Reads cu_seqlens on the host.
    * ``"sdpa"``       -- ``sdpa.varlen_attention_sdpa``: torch's scaled_dot_product_attention on
      a dense batch (all lengths equal) or a padded, masked one. Reads cu_seqlens on the host.
    * ``"auto"``       -- ``"triton"`` for CUDA (and meta) tensors it supports; CPU fp16/bf16/fp32 tensors get
      ``"sdpa"``, anything else ``"reference"``. The Triton interpreter runs one program at a time,
      so it is opt-in on CPU with ``backend="triton"``.

Sequences may be empty (cu_seqlens non-decreasing) on the triton and reference backends; the
peers may reject them. No path of ours reads a CUDA tensor back: the values of cu_seqlens (starts
at 0, non-decreasing, ends at T, longest <= max_seqlen) are checked on the host for CPU tensors
(ValueError) and for CUDA tensors with FASTCLIP_CHECK_SEQLENS=1 (one host sync per call); otherwise
by device-side asserts (``torch._assert_async``: no sync, a bad call fails with a CUDA device
assert rather than returning unwritten rows). ``max_seqlen`` is a host int; an upper bound is fine
(it only sizes the grid), a value below the longest sequence is an error.
"""

import math
import numbers

import torch
from torch import Tensor

from ..._validation import host_checks
from ..common import interpreting, is_gpu
from . import peers
from .naive import varlen_attention_ref
from .sdpa import varlen_attention_sdpa

BACKENDS = ("auto", "triton", "flash_attn", "xformers", "torch", "sdpa", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (*TRITON_DTYPES, torch.float64)
MAX_GRID_Z = 65535  # CUDA's limit on gridDim.z, which holds the sequence index

__all__ = ["varlen_attention", "varlen_attention_qkvpacked", "varlen_attention_ref", "BACKENDS"]


def _check_tokens(name: str, x, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be fp16/bf16/fp32 (fp64 on backend='reference'), got {x.dtype}")


def _check_max_seqlen(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be a Python int (a host value: reading it from a device tensor would "
            f"synchronize), got {type(value).__name__}"
        )
    if value <= 0:
        raise ValueError(f"{name} must be a positive int (an upper bound of the lengths), got {value}")
    return int(value)


def seqlens_checked(cu_seqlens: torch.Tensor) -> bool:
    """Values of cu_seqlens are read on the host for CPU tensors, or with FASTCLIP_CHECK_SEQLENS=1."""
    return host_checks(cu_seqlens, "FASTCLIP_CHECK_SEQLENS")


def _check_cu_seqlens(name: str, cu, total: int, device, max_name: str, max_seqlen: int) -> None:
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype torch.int32, got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32 (as flash-attn), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} must be 1-D [B + 1] with B >= 1, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device}, expected {device} (as the tokens)")
    if not seqlens_checked(cu):
        _assert_cu_seqlens_async(name, cu, total, max_name, max_seqlen)
        return
    bounds = cu.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {bounds[0]}")
    lens = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    bad = next((i for i, n in enumerate(lens) if n < 0), None)
    if bad is not None:
        raise ValueError(
            f"{name} must be non-decreasing (cumulative lengths), got {name}[{bad}] = {bounds[bad]} "
            f"> {name}[{bad + 1}] = {bounds[bad + 1]}"
        )
    if bounds[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens T = {total}, got {bounds[-1]}")
    if max(lens) > max_seqlen:
        raise ValueError(
            f"{max_name} = {max_seqlen} is smaller than the longest sequence in {name} ({max(lens)})"
        )


def _assert_cu_seqlens_async(name: str, cu, total: int, max_name: str, max_seqlen: int) -> None:
    """The value checks of ``_check_cu_seqlens`` as device-side asserts, for tensors not read on the host
    (CUDA): no host sync, and a launch with cu_seqlens[-1] != T or a sequence longer than max_seqlen
    fails (device assert) instead of leaving output rows (and dK/dV rows) unwritten. Raises
    RuntimeError at once on CPU (under torch.compile, where the host checks are off)."""
    lens = cu[1:] - cu[:-1]
    torch._assert_async(cu[0] == 0, f"{name}[0] must be 0")
    torch._assert_async(lens.min() >= 0, f"{name} must be non-decreasing (cumulative lengths)")
    torch._assert_async(cu[-1] == total, f"{name}[-1] must equal the number of packed tokens T = {total}")
    torch._assert_async(
        lens.max() <= max_seqlen, f"{max_name} = {max_seqlen} is smaller than the longest sequence in {name}"
    )


def _check_scalars(dropout_p, softmax_scale, head_dim: int) -> float:
    """The softmax scale to use; dropout must be 0."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0: attention dropout is not supported, got {dropout_p}")
    if softmax_scale is None:
        return head_dim**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return float(softmax_scale)


def _triton_head_dim_ok(d: int) -> bool:
    return d % 8 == 0 and 16 <= d <= 128


def _check_triton(x: torch.Tensor, batch: int) -> None:
    d = x.shape[-1]
    if x.dtype not in TRITON_DTYPES:
        raise TypeError(f"backend='triton' supports fp16/bf16/fp32 tokens, got {x.dtype}")
    if not _triton_head_dim_ok(d):
        raise ValueError(
            f"backend='triton' needs a head dim (last dim) that is a multiple of 8 in [16, 128], got {d}"
        )
    if x.device.type == "cpu" and not interpreting():
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
    if batch > MAX_GRID_Z:
        raise ValueError(f"backend='triton' takes at most {MAX_GRID_Z} sequences per call, got {batch}")


def resolve_backend(backend: str, x: torch.Tensor, batch: int) -> str:
    """The backend to run for tokens ``x`` (see the module docstring for 'auto')."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        ok = (
            is_gpu(x)
            and x.dtype in TRITON_DTYPES
            and _triton_head_dim_ok(x.shape[-1])
            and batch <= MAX_GRID_Z
        )
        cpu_fast = x.device.type == "cpu" and x.dtype in TRITON_DTYPES
        backend = "triton" if ok else "sdpa" if cpu_fast else "reference"
    if backend == "triton":
        _check_triton(x, batch)
    elif backend not in ("reference", "sdpa") and x.dtype == torch.float64:
        raise TypeError(f"backend={backend!r} does not take fp64 tokens; use backend='reference'")
    return backend


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _fwd_impl(q, k, v, cu_q, cu_k, max_q, scale, causal):
    from .triton import varlen_attention_fwd

    q, k, v = (_unit_last_stride(x) for x in (q, k, v))
    return varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, scale, causal)


def _bwd_impl(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, scale, causal, dq, dk, dv):
    from .triton_bwd import varlen_attention_bwd

    varlen_attention_bwd(
        _unit_last_stride(do), q, k, v, o, lse, cu_q, cu_k, max_q, max_k, scale, causal, dq, dk, dv
    )


def _fake_fwd(q):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastclip::varlen_attention_fwd", mutates_args=())
def _fwd_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
    max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    return _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, softmax_scale, causal)


@_fwd_op.register_fake
def _(q, k, v, *args):
    return _fake_fwd(q)


@torch.library.custom_op("fastclip::varlen_attention_bwd", mutates_args=())
def _bwd_op(
    do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    q, k, v = (_unit_last_stride(x) for x in (q, k, v))
    dq, dk, dv = (torch.empty(x.shape, device=x.device, dtype=x.dtype) for x in (q, k, v))
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)
    _bwd_impl(do, q, k, v, o, lse, *args, dq, dk, dv)
    return dq, dk, dv


@_bwd_op.register_fake
def _(do, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
    ctx.config = (max_q, max_k, scale, causal)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.fastclip.varlen_attention_bwd(do, q, k, v, o, lse, cu_q, cu_k, *ctx.config)
    return dq, dk, dv, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("fastclip::varlen_attention_qkvpacked_fwd", mutates_args=())
def _packed_fwd_op(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, softmax_scale: float, causal: bool
) -> tuple[Tensor, Tensor]:
    q, k, v = qkv.unbind(1)  # views: no copies
    return _fwd_impl(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, softmax_scale, causal)


@_packed_fwd_op.register_fake
def _(qkv, *args):
    return _fake_fwd(qkv[:, 0])


@torch.library.custom_op("fastclip::varlen_attention_qkvpacked_bwd", mutates_args=())
def _packed_bwd_op(
    do: Tensor, qkv: Tensor, o: Tensor, lse: Tensor, cu_seqlens: Tensor, max_seqlen: int,
    softmax_scale: float, causal: bool,
) -> Tensor:  # fmt: skip
    """d(qkv) written in place of one [T, 3, H, d] buffer (no concatenation)."""
    qkv = _unit_last_stride(qkv)
    grad = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    args = (cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, softmax_scale, causal)
    _bwd_impl(do, *qkv.unbind(1), o, lse, *args, *grad.unbind(1))
    return grad


@_packed_bwd_op.register_fake
def _(do, qkv, *args):
    return qkv.new_empty(qkv.shape)


def _setup_packed(ctx, inputs, output):
    qkv, cu, max_seqlen, scale, causal = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, o, lse, cu)
    ctx.config = (max_seqlen, scale, causal)


def _backward_packed(ctx, do, _dlse):
    qkv, o, lse, cu = ctx.saved_tensors
    return (
        torch.ops.fastclip.varlen_attention_qkvpacked_bwd(do, qkv, o, lse, cu, *ctx.config),
        None,
        None,
        None,
        None,
    )


_packed_fwd_op.register_autograd(_backward_packed, setup_context=_setup_packed)


def varlen_attention_qkvpacked(
    qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, *, backend="auto"
):
    """Self-attention over packed sequences, q, k, v packed in one tensor (flash-attn's layout).

    Args:
        qkv (torch.Tensor): [T, 3, H, d] fp16/bf16/fp32 (fp64 on backend='reference'); only the
            last dim must be contiguous (read through strides, no copy).
        cu_seqlens (torch.Tensor): [B + 1] int32 on qkv's device, cu_seqlens[b] = first token of
            sequence b, cu_seqlens[0] = 0, cu_seqlens[B] = T.
        max_seqlen (int): host int >= the longest sequence (an upper bound is fine).
        dropout_p (float): must be 0.0 (no attention dropout).
        softmax_scale (float, optional): s in softmax(s * Q K^T), default d ** -0.5.
        causal (bool): token i attends to tokens j <= i of its sequence.
        backend (str): see the module docstring.
    Returns:
        [T, H, d] in qkv's dtype; backward gives d(qkv) [T, 3, H, d].

    Example:
        >>> qkv = torch.randn(5, 3, 2, 32, requires_grad=True)
        >>> cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        >>> out = varlen_attention_qkvpacked(qkv, cu, max_seqlen=3)  # CPU: backend 'reference'
        >>> out.sum().backward(); qkv.grad.shape
        torch.Size([5, 3, 2, 32])
    """
    _check_tokens("qkv", qkv, 4, "[T, 3, H, d]")
    if qkv.shape[1] != 3:
        raise ValueError(f"qkv must be [T, 3, H, d], got shape {tuple(qkv.shape)} (dim 1 is not 3)")
    max_seqlen = _check_max_seqlen("max_seqlen", max_seqlen)
    scale = _check_scalars(dropout_p, softmax_scale, qkv.shape[-1])
    _check_cu_seqlens("cu_seqlens", cu_seqlens, qkv.shape[0], qkv.device, "max_seqlen", max_seqlen)
    backend = resolve_backend(backend, qkv, cu_seqlens.numel() - 1)
    if backend == "triton":
        out, _ = torch.ops.fastclip.varlen_attention_qkvpacked_fwd(qkv, cu_seqlens, max_seqlen, scale, causal)
        return out
    if backend == "flash_attn":
        return peers.flash_attn_qkvpacked(qkv, cu_seqlens, max_seqlen, scale, causal)
    q, k, v = qkv.unbind(1)
    return _run_unpacked(backend, q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale, causal)


def varlen_attention(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    *,
    backend="auto",
):
    """Attention over packed sequences with separate q, k, v (flash_attn_varlen_func's arguments).

    Args:
        q (torch.Tensor): [T_q, H, d]; k, v: [T_k, H, d], same dtype and device (no GQA).
        cu_seqlens_q, cu_seqlens_k (torch.Tensor): [B + 1] int32 cumulative lengths of q and of
            k/v (the same tensor for self-attention).
        max_seqlen_q, max_seqlen_k (int): host ints >= the longest query / key sequence.
        dropout_p, softmax_scale, backend: as :func:`varlen_attention_qkvpacked`.
        causal (bool): key j is kept for query i iff j <= i + n_k - n_q (bottom-right aligned, as
            flash-attn >= 2.1); a query row without keys outputs 0.
    Returns:
        [T_q, H, d] in q's dtype.

    Example:
        >>> q = k = v = torch.randn(5, 2, 32)
        >>> cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        >>> varlen_attention(q, k, v, cu, cu, 3, 3, causal=True).shape
        torch.Size([5, 2, 32])
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tokens(name, x, 3, "[T, H, d]")
        if x.dtype != q.dtype or x.device != q.device:
            raise TypeError(f"{name} is {x.dtype} on {x.device}, expected {q.dtype} on {q.device} (as q)")
    if k.shape[1:] != q.shape[1:] or v.shape != k.shape:
        raise ValueError(
            f"k and v must be [T_k, H, d] with q's H and d, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    max_seqlen_q = _check_max_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _check_max_seqlen("max_seqlen_k", max_seqlen_k)
    scale = _check_scalars(dropout_p, softmax_scale, q.shape[-1])
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], q.device, "max_seqlen_q", max_seqlen_q)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], q.device, "max_seqlen_k", max_seqlen_k)
    if cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(
            f"cu_seqlens_k has {cu_seqlens_k.numel() - 1} sequences, cu_seqlens_q {cu_seqlens_q.numel() - 1}"
        )
    backend = resolve_backend(backend, q, cu_seqlens_q.numel() - 1)
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, causal)
    return _run_unpacked(backend, q, k, v, *args)


def _run_unpacked(backend, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    if backend == "triton":
        out, _ = torch.ops.fastclip.varlen_attention_fwd(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)
        return out
    if backend == "flash_attn":
        return peers.flash_attn_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)
    if backend == "xformers":
        return peers.xformers_varlen(q, k, v, cu_q, cu_k, scale, causal)
    if backend == "torch":
        return peers.torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)
    if backend == "sdpa":
        return varlen_attention_sdpa(q, k, v, cu_q, cu_k, scale, causal)
    return varlen_attention_ref(q, k, v, cu_q, cu_k, softmax_scale=scale, causal=causal)
