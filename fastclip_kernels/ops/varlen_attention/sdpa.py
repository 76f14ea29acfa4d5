"""Varlen attention through ``torch.nn.functional.scaled_dot_product_attention`` (the fast CPU path).

One function, ``varlen_attention_sdpa``: when every query and key sequence has one length n (a ViT's
packed images), the packed tokens are a dense [B, H, n, d] batch and SDPA runs without a mask; else
the sequences are scattered into a zero-padded [B, H, L, d] batch with a key-padding (and causal)
mask and gathered back. Same conventions as ``naive.varlen_attention_ref`` (the test oracle): causal
is bottom-right aligned and a query row without keys outputs 0. Reads ``cu_seqlens`` on the host.
"""

import torch
import torch.nn.functional as F


def varlen_attention_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale: float, causal: bool):
    """softmax(s * Q K^T) V per packed sequence via SDPA; q [T_q, H, d], k/v [T_k, H, d] -> [T_q, H, d].

    Args:
        cu_seqlens_q, cu_seqlens_k (torch.Tensor): [B + 1] cumulative lengths (read on the host).
        softmax_scale (float): s; causal (bool): key j kept for query i iff j <= i + n_k - n_q.
    """
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    n_q = [b - a for a, b in zip(bq[:-1], bq[1:], strict=True)]
    n_k = [b - a for a, b in zip(bk[:-1], bk[1:], strict=True)]
    batch, heads, d = len(n_q), q.shape[1], q.shape[2]
    if batch == 0 or q.shape[0] == 0:
        return q.new_zeros(q.shape)
    if len(set(n_q) | set(n_k)) == 1 and n_q[0] > 0:  # dense: [B, H, n, d], no mask
        dense = [x.reshape(batch, n_q[0], heads, d).transpose(1, 2) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*dense, is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2).reshape(q.shape)
    dev, lq, lk = q.device, max(n_q), max(n_k)
    len_q, len_k = torch.tensor(n_q, device=dev), torch.tensor(n_k, device=dev)
    rows_q, rows_k = torch.arange(lq, device=dev), torch.arange(lk, device=dev)
    valid_q = rows_q < len_q[:, None]  # [B, Lq]
    valid_k = rows_k < len_k[:, None]  # [B, Lk]
    slot_q = (torch.arange(batch, device=dev)[:, None] * lq + rows_q)[valid_q]  # padded row of each token
    slot_k = (torch.arange(batch, device=dev)[:, None] * lk + rows_k)[valid_k]
    pad_q = q.new_zeros(batch * lq, heads, d).index_copy(0, slot_q, q)
    pad_k = k.new_zeros(batch * lk, heads, d).index_copy(0, slot_k, k)
    pad_v = v.new_zeros(batch * lk, heads, d).index_copy(0, slot_k, v)
    keep = valid_k[:, None, :].expand(batch, lq, lk)  # [B, Lq, Lk]
    if causal:
        shift = (len_k - len_q)[:, None, None]
        keep = keep & (rows_k[None, None, :] <= rows_q[None, :, None] + shift)
    has_keys = keep.any(dim=-1, keepdim=True)  # rows without keys attend everywhere, then are zeroed
    mask = keep | ~has_keys
    dense = [x.view(batch, n, heads, d).transpose(1, 2) for x, n in ((pad_q, lq), (pad_k, lk), (pad_v, lk))]
    out = F.scaled_dot_product_attention(*dense, attn_mask=mask[:, None], scale=softmax_scale)
    out = out.transpose(1, 2) * has_keys[..., None].to(out.dtype)  # [B, Lq, H, d]
    return out.reshape(batch * lq, heads, d).index_select(0, slot_q)
