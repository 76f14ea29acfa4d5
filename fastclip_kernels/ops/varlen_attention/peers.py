"""Other libraries' varlen attention behind our API: flash-attn, xformers and PyTorch's own.

Each import happens at call time, so a missing peer fails with the install command, never at
import of fastclip_kernels. Arguments are already validated by the public functions.
"""

import inspect

import torch
import torch.nn.functional as F


def _need(module: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RuntimeError(f"backend needs {module}: {install}") from err


def flash_attn_qkvpacked(qkv, cu_seqlens, max_seqlen, softmax_scale, causal):
    """flash_attn.flash_attn_varlen_qkvpacked_func (CUDA, fp16/bf16)."""
    fa = _need("flash_attn", "pip install flash-attn --no-build-isolation")
    return fa.flash_attn_varlen_qkvpacked_func(
        qkv, cu_seqlens, max_seqlen, 0.0, softmax_scale=softmax_scale, causal=causal
    )


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """flash_attn.flash_attn_varlen_func (CUDA, fp16/bf16)."""
    fa = _need("flash_attn", "pip install flash-attn --no-build-isolation")
    return fa.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0.0,
        softmax_scale=softmax_scale, causal=causal,
    )  # fmt: skip


def xformers_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal):
    """xformers memory_efficient_attention on [1, T, H, d] with a block-diagonal bias.

    BlockDiagonalMask takes host lengths: cu_seqlens is read back (a sync for CUDA tensors).
    """
    fmha = _need("xformers.ops.fmha", "pip install xformers")
    lens_q = torch.diff(cu_seqlens_q).tolist()
    lens_k = torch.diff(cu_seqlens_k).tolist()
    bias_cls = (
        fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if causal else fmha.attn_bias.BlockDiagonalMask
    )
    try:
        bias = bias_cls.from_seqlens(lens_q, lens_k, device=q.device)
    except TypeError:  # xformers < 0.0.25 has no device argument
        bias = bias_cls.from_seqlens(lens_q, lens_k)
    out = fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias, scale=softmax_scale)
    return out[0]


def _jagged(x, cu_seqlens, max_seqlen):
    """[T, H, d] -> nested jagged [B, H, j, d]. min/max seqlen are given so SDPA never reads them
    back; on CUDA min_seqlen = 1 is assumed (no empty sequences), on CPU it is computed.
    SDPA needs contiguous values: a strided view (e.g. of packed qkv) is copied."""
    min_seqlen = int(torch.diff(cu_seqlens).min()) if cu_seqlens.device.type == "cpu" else 1
    nt = torch.nested.nested_tensor_from_jagged(
        x.contiguous(), offsets=cu_seqlens.to(torch.int64), min_seqlen=min_seqlen, max_seqlen=max_seqlen
    )
    return nt.transpose(1, 2)


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    """torch.nn.attention.varlen.varlen_attn for CUDA fp16/bf16 (torch >= 2.10), else SDPA on
    nested jagged tensors (CPU too; no causal mask there)."""
    varlen_attn = _varlen_attn()
    if varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        params = inspect.signature(varlen_attn).parameters
        kwargs = {"scale": softmax_scale} if "scale" in params else {}
        if causal:
            kwargs.update({"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)})
        return varlen_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **kwargs)
    if causal:
        raise NotImplementedError(
            "backend='torch' with causal=True needs torch.nn.attention.varlen.varlen_attn "
            "(CUDA, fp16/bf16, torch >= 2.10); nested-tensor SDPA has no causal mask for jagged "
            "sequences. Use backend='triton' or 'reference'."
        )
    out = F.scaled_dot_product_attention(
        _jagged(q, cu_seqlens_q, max_seqlen_q),
        _jagged(k, cu_seqlens_k, max_seqlen_k),
        _jagged(v, cu_seqlens_k, max_seqlen_k),
        scale=softmax_scale,
    )
    return out.transpose(1, 2).values()
