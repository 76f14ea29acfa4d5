"""Plain-PyTorch varlen attention, one sequence at a time: the ground truth for tests and benchmarks.

Materializes each sequence's [H, n_q, n_k] scores, so it is for checking, CPU runs and small
batches. It reads ``cu_seqlens`` on the host (a device synchronization for CUDA tensors).
"""

import torch


def varlen_attention_ref(
    q, k, v, cu_seqlens_q, cu_seqlens_k=None, softmax_scale=None, causal=False, upcast=True
):
    """softmax(s * Q K^T) V per packed sequence, differentiable through autograd.

    Args:
        q (torch.Tensor): [T_q, H, d] packed queries; k, v: [T_k, H, d] packed keys and values.
        cu_seqlens_q (torch.Tensor): [B + 1] cumulative query lengths (any integer dtype);
            cu_seqlens_k: the same for k and v (default: cu_seqlens_q).
        softmax_scale (float, optional): s, default d ** -0.5.
        causal (bool): key j is kept for query i iff j <= i + n_k - n_q (bottom-right aligned).
        upcast (bool): compute in fp32 (fp64 for fp64 inputs); False computes in q's dtype, the
            "same-dtype PyTorch" run of the tolerance rule.
    Returns:
        [T_q, H, d] in q's dtype. A query row without keys outputs 0 (flash-attn's convention).

    Example:
        >>> q = k = v = torch.randn(5, 2, 32, dtype=torch.float64)
        >>> cu = torch.tensor([0, 2, 5], dtype=torch.int32)
        >>> varlen_attention_ref(q, k, v, cu).shape
        torch.Size([5, 2, 32])
    """
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_k.tolist()
    compute = q.dtype
    if upcast:
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    outs = []
    for b in range(len(bounds_q) - 1):
        qb = q[bounds_q[b] : bounds_q[b + 1]].to(compute).transpose(0, 1)  # [H, n_q, d]
        kb = k[bounds_k[b] : bounds_k[b + 1]].to(compute).transpose(0, 1)
        vb = v[bounds_k[b] : bounds_k[b + 1]].to(compute).transpose(0, 1)
        n_q, n_k = qb.shape[1], kb.shape[1]
        keep = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device)
        if causal:
            keep = keep.tril(diagonal=n_k - n_q)
        scores = (qb * scale) @ kb.transpose(1, 2)
        has_keys = keep.any(dim=-1, keepdim=True)  # rows with no key: finite softmax, then zeroed
        scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~has_keys, 0.0)
        p = torch.softmax(scores, dim=-1) * has_keys
        outs.append((p @ vb).transpose(0, 1))
    return torch.cat(outs).to(q.dtype)
