"""Distributed composition for the losses: all-gathers (open_clip's and FastCLIP's packed one) and a
communication counter. Kernels never communicate; these helpers run around them."""

from .comm import CommCounter, CommEvent
from .gather import all_gather_packed, all_gather_with_grad, gather_features
from .sigmoid import DIST_IMPLS, check_process_group, sigmoid_loss_global

__all__ = [
    "DIST_IMPLS",
    "CommCounter",
    "CommEvent",
    "all_gather_packed",
    "all_gather_with_grad",
    "check_process_group",
    "gather_features",
    "sigmoid_loss_global",
]
