"""FastCLIP (Wei et al. 2024): global contrastive losses with per-sample u estimators, the cosine
inner-LR schedule, learnable global or per-sample temperatures and low-communication all-gather."""

from .loss import FastCLIPLoss
from .schedules import gamma_at
from .state import FastCLIPState
from .temperature import GlobalTemperature

__all__ = ["FastCLIPLoss", "FastCLIPState", "GlobalTemperature", "gamma_at"]
