"""CLIP towers on packed tokens (no padding) and their dense, padded references.

``PackedViT`` / ``PackedTextTransformer`` run LayerNorm, MLP and projections on the real tokens
only and attention through ``varlen_attention_qkvpacked``; ``DenseViT`` / ``DenseTextTransformer``
hold the same parameters (open_clip's names) and compute the same function on padded batches.
"""

from .naive import DenseTextTransformer, DenseViT
from .packed import PackedTextTransformer, PackedTransformer, PackedViT

__all__ = ["DenseTextTransformer", "DenseViT", "PackedTextTransformer", "PackedTransformer", "PackedViT"]
