"""Kernels, launchers, autograd Functions and the functional API."""

from .attention import varlen_attention, varlen_attention_qkvpacked
from .contrastive_loss import contrastive_loss
from .pairwise import sigmoid_loss_sum, similarity_cross_entropy
from .patch_embed import patch_embed
from .sigmoid_loss import siglip_loss

__all__ = [
    "contrastive_loss",
    "patch_embed",
    "siglip_loss",
    "similarity_cross_entropy",
    "sigmoid_loss_sum",
    "varlen_attention",
    "varlen_attention_qkvpacked",
]
