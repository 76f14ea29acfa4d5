"""Learnable global temperature for FastCLIP-v3 (RGCL-g) and OpenCLIP-style training.

tau is parameterized as theta = log(1/tau) (open_clip's ``logit_scale``), learned in its own
optimizer param group with weight decay 0, and clamped to [0, ln 100] (tau in [0.01, 1]) after each
step. ``step_thresh`` divides its learning rate by 3 once tau <= 0.03. Everything here runs on the
device: the clamp is in place and the threshold rule writes a tensor learning rate on theta's
device (with CUDA, use ``fused=True`` or ``capturable=True`` optimizers, which take a device lr
without reading it back to the host).
"""

import math

import torch
from torch import nn


class GlobalTemperature(nn.Module):
    """theta = log(1/tau) as an ``nn.Parameter``; ``forward()`` returns the logit scale exp(theta).

    Args:
        tau_init (float): initial temperature (0.07 in CLIP and FastCLIP).
        tau_min, tau_max (float): clamp range of tau; theta is clamped to [log(1/tau_max), log(1/tau_min)].
    """

    def __init__(self, tau_init: float = 0.07, tau_min: float = 0.01, tau_max: float = 1.0):
        super().__init__()
        if not 0 < tau_min <= tau_init <= tau_max:
            raise ValueError(f"need 0 < tau_min <= tau_init <= tau_max, got {tau_min}, {tau_init}, {tau_max}")
        self.theta_min, self.theta_max = math.log(1.0 / tau_max), math.log(1.0 / tau_min)
        self.theta = nn.Parameter(torch.tensor(math.log(1.0 / tau_init)))

    def forward(self) -> torch.Tensor:
        return self.theta.exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Call after every optimizer step (in place, no host sync)."""
        self.theta.clamp_(self.theta_min, self.theta_max)

    def param_group(self, lr_tau: float, threshold: float | None = 0.03, factor: float = 1.0 / 3.0) -> dict:
        """An optimizer param group for theta: weight decay 0, a tensor learning rate that
        :meth:`step_thresh_` can lower on the device. ``threshold=None`` keeps lr_tau constant."""
        return {
            "params": [self.theta],
            "lr": torch.tensor(float(lr_tau), device=self.theta.device),
            "weight_decay": 0.0,
            "fastclip_lr_tau": float(lr_tau),
            "fastclip_threshold": threshold,
            "fastclip_factor": factor,
        }

    @torch.no_grad()
    def step_thresh_(self, group: dict) -> None:
        """Set ``group['lr']`` to lr_tau * factor if tau <= threshold, else lr_tau (every step)."""
        if group.get("fastclip_threshold") is None:
            return
        lr_tau, factor = group["fastclip_lr_tau"], group["fastclip_factor"]
        cold = self.theta >= math.log(1.0 / group["fastclip_threshold"])
        lr = torch.where(cold, lr_tau * factor, lr_tau).to(group["lr"].device, group["lr"].dtype)
        group["lr"].copy_(lr)
