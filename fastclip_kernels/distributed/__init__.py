"""Distributed composition for the losses: all-gathers (open_clip's and FastCLIP's packed one) and a
communication counter. Kernels never communicate; these helpers run around them."""

from .comm import CommCounter, CommEvent
from .gather import all_gather_packed, all_gather_with_grad, gather_features

__all__ = ["CommCounter", "CommEvent", "all_gather_packed", "all_gather_with_grad", "gather_features"]
