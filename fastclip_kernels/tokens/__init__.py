"""CLIPA token reduction (arXiv 2305.07017): shorter image and text sequences for CLIP pre-training,
computed on the device, seeded by a ``torch.Generator``, without host synchronization.

Image (indices into a row-major ``gh x gw`` patch grid, CLS never dropped):
``random_keep``, ``random_keep_varlen``, ``grid_keep``, ``block_keep``, ``resize_images``,
then ``with_class_token`` and ``gather_tokens``.
Text (token ids ``[B, L]`` with lengths, SOT and EOT always kept): ``truncate``, ``random_mask``,
``block_mask``, ``syntax_mask`` (with ``build_syntax_rank``'s table), then ``pack`` for varlen.

    >>> import torch
    >>> from fastclip_kernels import tokens
    >>> g = torch.Generator().manual_seed(0)
    >>> tok, cu = tokens.with_class_token(tokens.random_keep(4, (14, 14), 49, generator=g))
    >>> tokens.gather_tokens(torch.randn(4, 197, 64), tok).shape
    torch.Size([4, 50, 64])
"""

from .image import (
    block_keep,
    block_shape,
    gather_tokens,
    grid_keep,
    random_keep,
    random_keep_varlen,
    resize_images,
    resized_grid,
    with_class_token,
)
from .syntax_table import (
    ADJ,
    NOUN,
    OTHER,
    VERB,
    build_syntax_rank,
    load_syntax_rank,
    save_syntax_rank,
    tag_rank,
)
from .text import block_mask, lengths_from_pad, pack, random_mask, syntax_mask, truncate

__all__ = [
    "ADJ",
    "NOUN",
    "OTHER",
    "VERB",
    "block_keep",
    "block_mask",
    "block_shape",
    "build_syntax_rank",
    "gather_tokens",
    "grid_keep",
    "lengths_from_pad",
    "load_syntax_rank",
    "pack",
    "random_keep",
    "random_keep_varlen",
    "random_mask",
    "resize_images",
    "resized_grid",
    "save_syntax_rank",
    "syntax_mask",
    "tag_rank",
    "truncate",
    "with_class_token",
]
