"""The training objective: the loss of ``loss.mode`` and the temperature, owned by one object.

``Objective`` builds the loss for this rank, knows which arguments each mode takes, initializes the
temperature (``temperature_init``: SigLIP starts at tau 0.1 with bias -10), decides whether the global
temperature trains (clip, siglip: with the model's LR; rgcl_g and gcl_g: its own group at
``loss.lr_tau``, as fast_clip's ``global_learnable`` scheme puts logit_scale in a group at ``--lr_tau``;
gcl: frozen; rgcl: per-sample temperatures inside the loss state), sets the temperature's LR every step
(``loss.lr_tau_schedule``: step_thresh, const, cosine) and clamps it after each update. gcl_g (fast_clip's
v0, global_learnable without multiply_tau) trains tau by plain autograd: the loss returns the surrogate's
d/ds as the logit scale's gradient, and the optimizer steps theta like any parameter.

    >>> obj = Objective(cfg, data_size=6000, device=torch.device("cpu"))
    >>> opt = FusedAdamW(obj.param_groups(model, weight_decay=0.1), lr=1e-3)
    >>> loss = obj.loss(model, img, txt, indices); loss.backward(); opt.step(); obj.after_update(model)
"""

from __future__ import annotations

import math

import torch

from fastclip_kernels import FastCLIPLoss, FastContrastiveLoss, FastSigLipLoss

__all__ = ["Objective", "temperature_init"]

SIGLIP_TAU_INIT = 0.1  # open_clip's SigLIP init: logit_scale = log(10)
SIGLIP_BIAS_INIT = -10.0
LEARNED_GLOBAL_TAU = ("rgcl_g", "gcl_g")  # FastCLIP modes whose global temperature has its own LR group


def temperature_init(cfg) -> tuple[float, float | None]:
    """(initial tau, initial logit bias or None) of ``cfg``'s loss mode."""
    if getattr(cfg, "loss_mode", "clip") == "siglip":
        return SIGLIP_TAU_INIT, SIGLIP_BIAS_INIT
    return float(getattr(cfg, "loss_temperature", 0.07)), None


class Objective:
    """The loss and temperature rules of ``cfg`` (a TrainConfig) for one rank of ``world_size``."""

    def __init__(self, cfg, data_size: int, device, rank: int = 0, world_size: int = 1):
        self.mode, self.schedule, self.lr_tau = cfg.loss_mode, cfg.loss_lr_tau_schedule, cfg.loss_lr_tau
        backend = getattr(cfg, "train_kernels", "auto")  # "triton": the GPU kernels on any device
        if self.mode == "clip":  # K > 1: FastCLIP's low-communication gather, no collective in backward
            kw = {} if world_size == 1 else dict(rank=rank, world_size=world_size, low_comm=True)
            self.fn = FastContrastiveLoss(**kw, backend=backend)
        elif self.mode == "siglip":
            self.fn = FastSigLipLoss(rank=rank, world_size=world_size, backend=backend)  # K > 1: one gather
        else:
            self.fn = FastCLIPLoss(
                data_size, self.mode, rank=rank, world_size=world_size, gamma_min=cfg.loss_gamma_min,
                gamma_decay_epochs=cfg.loss_gamma_decay_epochs, eps=cfg.loss_eps, rho=cfg.loss_rho,
                tau_init=cfg.loss_temperature, lr_tau=cfg.loss_lr_tau, betas=tuple(cfg.optim_betas),
                device=device, backend=backend,
            )  # fmt: skip

    # -- the temperature's parameter group and LR -------------------------------------------------
    def own_lr_tau(self) -> float | None:
        """The global temperature's own LR (rgcl_g, gcl_g), else None (trained with the model, or frozen)."""
        return self.lr_tau if self.mode in LEARNED_GLOBAL_TAU else None

    def prepare(self, model) -> None:
        """Freeze the global temperature where it does not train (gcl: constant; rgcl: per sample)."""
        if self.mode in ("gcl", "rgcl"):
            model.temperature.theta.requires_grad_(False)

    def set_lr(self, optimizer, lr: float, model, step: int, total_steps: int) -> None:
        """The model's groups get ``lr``; the temperature's own group follows ``loss.lr_tau_schedule``:
        step_thresh (x1/3 once tau <= 0.03, on the device), const, or cosine from lr_tau to 0."""
        for group in optimizer.param_groups:
            if "fastclip_lr_tau" not in group:
                group["lr"] = lr
            elif self.schedule == "step_thresh":
                model.temperature.step_thresh_(group)
            elif self.schedule == "cosine":
                progress = min(step / max(1, total_steps), 1.0)
                group["lr"].fill_(group["fastclip_lr_tau"] * 0.5 * (1 + math.cos(math.pi * progress)))

    def after_update(self, model) -> None:
        model.temperature.clamp_()

    # -- the loss -----------------------------------------------------------------------------------
    def loss(self, model, img: torch.Tensor, txt: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The loss of the features [B, E] (fp32) of this rank's samples ``indices`` [B] (global)."""
        if self.mode == "clip":
            return self.fn(img, txt, model.temperature())
        if self.mode == "siglip":
            return self.fn(img, txt, model.temperature(), model.logit_bias)
        scale = None if self.mode == "rgcl" else model.temperature()
        return self.fn(img, txt, scale, indices)

    def tau(self, model) -> float:
        """The temperature for the log (rgcl: the mean of this rank's per-sample temperatures)."""
        state = getattr(self.fn, "state", None)
        if self.mode == "rgcl" and getattr(state, "tau", None) is not None:
            return float(state.tau.mean())
        return float(1 / model.temperature().detach())

    @property
    def gamma(self):
        return getattr(self.fn, "gamma", None)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.fn, "set_epoch"):
            self.fn.set_epoch(epoch)

    def state_dict(self) -> dict:
        return self.fn.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.fn.load_state_dict(state)
