"""Per-mode loss value, backward coefficients and temperature gradient from per-anchor statistics.

Global batch of n = K b pairs; rank k holds rows o = k b .. o + b - 1. For anchor j and modality m
(0: image anchor x_j against texts, 1: text anchor y_j against images), the statistics are
lam_mj = log sum_{k in S_j} exp(s_mj P_jk) - s_mj P_jj and delta_mj = mean_dot_mj - P_jj (see
``fastclip_kernels.ops.anchor``), gathered for all n anchors. Objectives (1/2 convention: the mean
of the two directions, like CLIP's loss; g as in FastCLIP, normalized by n - 1):

    clip    1/n sum_j 1/2 sum_m CE_mj                              CE = lse - s P_jj = lam
    gcl     tau/n sum_j 1/2 sum_m log(eps + g_mj)                  tau constant
    gcl_g   1/n sum_j 1/2 sum_m log(eps + g_mj)                    global learnable tau, no tau factor
    rgcl    1/n sum_j 1/2 sum_m tau_mj (log(eps + g_mj) + rho)      per-sample tau
    rgcl_g  tau/n sum_j 1/2 sum_m log(eps + g_mj) + rho tau         global learnable tau

The returned value is the objective on the global batch (the same on every rank). The model
gradient is FastCLIP's FCCO estimator: that of c_mj g_mj / (eps + u_mj) with u held fixed,
c_mj = tau_mj / (2n) (``exact``) or, for gcl and rgcl, 1 / (2n) (``reference``: the fast_clip
code runs v1/v2 without ``--multiply_tau``; its RGCL gradient lacks the tau_i factor). With gamma = 1 (u = g) it is
exactly the gradient of the objective. gcl_g is fast_clip's ``--temperature_scheme global_learnable``
without ``--multiply_tau`` (its "v0"): the FCCO surrogate 1/n sum 1/2 sum g / u~ trained in both the
model and s, i.e. weight 1 (no tau factor) and dF/ds = dPhi/ds = 1/n sum_j 1/2 sum_m ratio_mj delta_mj.

Gradient scale: each rank's backward returns K x the global gradient of its own features, so
after DDP's mean over K ranks parameters get exactly the single-process global-batch gradient
(open_clip gather_with_grad's convention). The scale gradient is the global one on every rank.

Temperature gradient (rgcl_g), with Phi = 1/n sum_j 1/2 sum_m g_mj / u~_mj:
    dF/dtau = 1/n sum_j 1/2 sum_m log u~_mj + rho + kappa tau dPhi/dtau,   tau dPhi/dtau = -s dPhi/ds
with kappa = 1 (``exact``) or 2 and log u instead of log u~ (``reference``: fast_clip counts the
tau-term of both surrogate halves). dF/ds = -tau^2 dF/dtau is returned for s = logit_scale.
"""

import math
from dataclasses import dataclass

import torch

MODES = ("clip", "gcl", "gcl_g", "rgcl", "rgcl_g")
CONVENTIONS = ("exact", "reference")


@dataclass
class BackwardTerms:
    """Everything the backward needs: per-anchor [2, n] scale/shift/coef and local pos_coef [b]."""

    scale: torch.Tensor
    shift: torch.Tensor
    coef: torch.Tensor
    pos_coef: torch.Tensor


def clip_terms(lam, delta, pos_dot, s, world_size: int, offset: int, b: int):
    """(loss, dL/ds, BackwardTerms) of the InfoNCE loss from gathered stats (lam = CE here)."""
    n = lam.shape[1]
    scale = s.expand(2, n)
    coef = (world_size / (2 * n)) * scale
    pos_coef = -(coef[0] + coef[1])[offset : offset + b]
    terms = BackwardTerms(scale, lam + scale * pos_dot, coef, pos_coef)
    return 0.5 * lam.sum(0).mean(), 0.5 * delta.sum(0).mean(), terms


def gcl_terms(
    mode, convention, lam, delta, tau, ratio, shift, log_u_new, log_ut, eps, rho, world_size, offset, b
):
    """(loss, dL/ds or None, BackwardTerms) of gcl / rgcl / rgcl_g after the u update.

    tau [2, n] (a stride-0 expand for the global modes); ratio, shift, log_u_new, log_ut [2, n].
    """
    n = lam.shape[1]
    scale = 1.0 / tau
    # fast_clip runs v3 with --multiply_tau, so only gcl / rgcl lack the tau factor in "reference";
    # gcl_g (v0) has no tau factor in its objective at all.
    tau_factor = mode == "rgcl_g" or (mode != "gcl_g" and convention == "exact")
    weight = tau if tau_factor else torch.ones_like(tau)
    coef = (world_size / (2 * n)) * weight * scale
    pos_coef = -(coef * ratio).sum(0)[offset : offset + b]
    terms = BackwardTerms(scale, shift, coef, pos_coef)
    log_g = lam - math.log(n - 1)
    log_eps_g = torch.logaddexp(log_g, torch.full_like(log_g, math.log(eps) if eps > 0 else -math.inf))
    if mode == "rgcl":
        return 0.5 * (tau * (log_eps_g + rho)).sum(0).mean(), None, terms
    if mode == "gcl_g":
        return 0.5 * log_eps_g.sum(0).mean(), 0.5 * (ratio * delta).sum(0).mean(), terms
    t = tau[0, 0]
    loss = t * 0.5 * log_eps_g.sum(0).mean()
    if mode == "gcl":
        return loss, None, terms
    kappa, log_term = (1.0, log_ut) if convention == "exact" else (2.0, log_u_new)
    s = 1.0 / t
    dphi_ds = 0.5 * (ratio * delta).sum(0).mean()
    dF_dtau = 0.5 * log_term.sum(0).mean() + rho - kappa * s * dphi_ds
    return loss + rho * t, -t * t * dF_dtau, terms
