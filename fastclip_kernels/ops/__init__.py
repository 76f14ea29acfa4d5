"""Kernels, launchers, autograd Functions and the functional API."""

from .contrastive_loss import contrastive_loss
from .pairwise import sigmoid_loss_sum, similarity_cross_entropy
from .sigmoid_loss import siglip_loss

__all__ = ["contrastive_loss", "siglip_loss", "similarity_cross_entropy", "sigmoid_loss_sum"]
