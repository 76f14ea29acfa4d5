"""fastclip_kernels: fast, memory-lean kernels for CLIP training.

from fastclip_kernels import FastContrastiveLoss   # drop-in for open_clip's ClipLoss
from fastclip_kernels import FastCLIPLoss          # FastCLIP's global contrastive losses (v0-v3)
"""

__version__ = "0.1.0"

from .fastclip import FastCLIPLoss, FastCLIPState, GlobalTemperature, gamma_at
from .nn import FastContrastiveLoss, FastSigLipLoss
from .ops import contrastive_loss, sigmoid_loss, sigmoid_loss_sum, similarity_cross_entropy

__all__ = [
    "FastCLIPLoss",
    "FastCLIPState",
    "GlobalTemperature",
    "gamma_at",
    "FastContrastiveLoss",
    "FastSigLipLoss",
    "contrastive_loss",
    "sigmoid_loss",
    "similarity_cross_entropy",
    "sigmoid_loss_sum",
    "__version__",
]
