"""Dense, padded implementations of the packed towers in :mod:`.packed`: the ground truth for the
tests and the "what people do today" baseline of the benchmarks.

Same parameters and ``state_dict`` names as ``PackedViT`` / ``PackedTextTransformer`` (open_clip's
names), but the classic computation: a Conv2d patch embedding of the whole image, then padded
[B, N, D] sequences through torch's ``scaled_dot_product_attention`` with a key-padding mask
(images with different keep counts) or a causal mask (text). Padded rows are computed and thrown
away; valid rows never attend to them, so the results equal the packed towers' exactly in fp64.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.patch_embed import pos_embed_2d_sincos


class DenseAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [B, H, L, d] each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class DenseResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = DenseAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, hidden)),
                    ("gelu", nn.GELU()),
                    ("c_proj", nn.Linear(hidden, width)),
                ]
            )
        )

    def forward(self, x, attn_mask=None, is_causal=False):
        x = x + self.attn(self.ln_1(x), attn_mask, is_causal)
        return x + self.mlp(self.ln_2(x))


class DenseTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.resblocks = nn.ModuleList(DenseResidualBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x, attn_mask=None, is_causal=False):
        for block in self.resblocks:
            x = block(x, attn_mask, is_causal)
        return x


def padded_keep(keep_idx, cu_seqlens, batch: int):
    """(idx [B, k_max] int64, valid [B, k_max] bool) from [B, k] or packed [T_p] + cu_seqlens.
    Reads cu_seqlens on the host (a reference, not a training path)."""
    if keep_idx.dim() == 2:
        return keep_idx.long(), None
    bounds = cu_seqlens.tolist()
    counts = [bounds[b + 1] - bounds[b] for b in range(batch)]
    k_max = max(counts)
    idx = torch.zeros(batch, k_max, dtype=torch.int64, device=keep_idx.device)
    valid = torch.zeros(batch, k_max, dtype=torch.bool, device=keep_idx.device)
    for b in range(batch):
        idx[b, : counts[b]] = keep_idx[bounds[b] : bounds[b + 1]]
        valid[b, : counts[b]] = True
    return idx, valid


class DenseViT(nn.Module):
    """ViT on padded [B, 1 + k_max, D] sequences; arguments and parameters as ``PackedViT``."""

    def __init__(
        self, image_size, patch_size: int, width: int, layers: int, heads: int, output_dim: int, *,
        pos_embed: str = "learned", patch_bias: bool = False, mlp_ratio: float = 4.0,
    ):  # fmt: skip
        super().__init__()
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        grid = (h // patch_size, w // patch_size)
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=patch_bias)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        if pos_embed == "learned":
            self.positional_embedding = nn.Parameter(scale * torch.randn(1 + grid[0] * grid[1], width))
        else:
            self.register_buffer("positional_embedding", pos_embed_2d_sincos(*grid, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = DenseTransformer(width, layers, heads, mlp_ratio)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, images, keep_idx=None, *, cu_seqlens=None):
        """images [B, 3, H, W]; keep_idx None, [B, k] or packed [T_p] + cu_seqlens -> [B, output_dim]."""
        B = images.shape[0]
        x = self.conv1(images.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, N, D]
        x = x + self.positional_embedding[1:].to(x.dtype)
        mask = None
        if keep_idx is not None:
            idx, valid = padded_keep(keep_idx, cu_seqlens, B)
            x = torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[-1]))
            if valid is not None:  # key padding mask [B, 1, 1, 1 + k_max]: True = may be attended
                mask = torch.cat([valid.new_ones(B, 1), valid], dim=1)[:, None, None, :]
        cls = (self.class_embedding + self.positional_embedding[0]).to(x.dtype)
        x = torch.cat([cls.expand(B, 1, -1), x], dim=1)
        x = self.transformer(self.ln_pre(x), attn_mask=mask)
        return self.ln_post(x[:, 0]) @ self.proj


class DenseTextTransformer(nn.Module):
    """Causal text transformer on padded ids [B, L]; pools token lengths[b] - 1 (the EOT)."""

    def __init__(
        self, vocab_size: int, context_length: int, width: int, layers: int, heads: int, output_dim: int, *,
        mlp_ratio: float = 4.0,
    ):  # fmt: skip
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = DenseTransformer(width, layers, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def forward(self, ids, lengths=None):
        """ids [B, L] (padding after each caption), lengths [B] (list or tensor; default L)."""
        B, L = ids.shape
        x = self.token_embedding(ids) + self.positional_embedding[:L]
        x = self.transformer(x, is_causal=True)  # causal: real tokens never see the padding after them
        last = torch.as_tensor(lengths if lengths is not None else [L] * B, device=ids.device) - 1
        pooled = x[torch.arange(B, device=ids.device), last.long()]
        return self.ln_final(pooled) @ self.text_projection
