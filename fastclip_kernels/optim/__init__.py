"""Fused multi-tensor optimizers (AdamW, LAMB) that install without apex."""

from .optimizers import FusedAdamW, FusedLAMB

__all__ = ["FusedAdamW", "FusedLAMB"]
