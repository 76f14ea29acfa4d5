"""LLM2CLIP's text tower: an adapter over frozen, pre-computed caption embeddings.

``TextAdapter``: the L2-normalised LLM vector x [B, d] -> ``blocks`` residual blocks
x += Linear(2d -> d)(GELU(Linear(d -> 2d)(LN(x)))) -> LN -> Linear(d -> E) [B, E]
(LLM2CLIP's ``TextProj`` with its 4 ``LinearBlock``s: ~16 d^2 parameters).

``AdapterTextTower`` has the packed text tower's call signature ``(ids, lengths=...)``: with the
cache's tokenizer (``CacheTokenizer``), ``ids[:, 0]`` is each caption's row in the embedding table,
so the training loop, CLIPA's text strategies (which leave [B, 1] ids alone) and the evaluation run
unchanged.
The table is a non-persistent buffer: checkpoints hold the adapter only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AdapterTextTower", "TextAdapter"]


class _LinearBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class TextAdapter(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, blocks: int = 4):
        super().__init__()
        self.blocks = nn.Sequential(*(_LinearBlock(in_dim) for _ in range(blocks)))
        self.ln_final, self.proj = nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_dim] (any norm; normalised here) -> [B, out_dim]."""
        return self.proj(self.ln_final(self.blocks(F.normalize(x.float(), dim=-1))))


class AdapterTextTower(nn.Module):
    """Embedding-table lookup (frozen) + TextAdapter; ``forward(ids [B, L], lengths=...) -> [B, E]``.
    ``constant_buffers``: the table never changes, so DDP neither broadcasts nor syncs it
    (``training.dist.ddp``): every rank loads the same cache."""

    constant_buffers = ("table",)

    def __init__(self, table: torch.Tensor, out_dim: int, blocks: int = 4):
        super().__init__()
        if table.dim() != 2 or table.shape[0] < 1:
            raise ValueError(f"table must be [rows, dim] with rows >= 1, got {tuple(table.shape)}")
        self.register_buffer("table", table, persistent=False)
        self.adapter = TextAdapter(table.shape[1], out_dim, blocks)

    def forward(self, ids: torch.Tensor, cu_seqlens=None, max_seqlen=None, *, lengths=None) -> torch.Tensor:
        rows = ids[:, 0] if ids.dim() == 2 else ids
        return self.adapter(self.table[rows.to(self.table.device)].float())

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        pass  # a few MLP blocks: nothing worth recomputing
