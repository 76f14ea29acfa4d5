"""Every op in one layout: ``ops/<op>/`` with ``__init__.py`` (public function, checks, dispatch,
registered torch ops), ``triton.py`` (kernels, ``<op>_fwd`` / ``<op>_bwd``), ``naive.py`` (``<op>_ref``)
and ``chunked.py`` where a CPU algorithm exists. ``common/`` holds the dispatch rule and shared tile
math. See CONTRIBUTING.md for the table of ops, tests and benchmarks."""

from .anchor import anchor_grad, anchor_stats
from .contrastive_loss import contrastive_loss, similarity_cross_entropy
from .patch_embed import patch_embed
from .sigmoid_loss import sigmoid_loss, sigmoid_loss_sum
from .varlen_attention import varlen_attention, varlen_attention_qkvpacked

__all__ = [
    "anchor_grad",
    "anchor_stats",
    "contrastive_loss",
    "patch_embed",
    "sigmoid_loss",
    "similarity_cross_entropy",
    "sigmoid_loss_sum",
    "varlen_attention",
    "varlen_attention_qkvpacked",
]
