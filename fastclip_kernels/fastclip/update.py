"""The per-step FastCLIP state update over the global batch, in plain PyTorch (the reference and
CPU path; ``update_kernel.py`` is the fused Triton kernel with the same contract).

For each global anchor j < n and modality m (0 image, 1 text), given the gathered statistics
lam = log sum_{k != j} exp(s_j P_jk) - s_j P_jj  (so g = exp(lam) / (n - 1)),
delta = mean_dot - pos_dot (d lam / d s_j) and the fetched log u_old, tau:

    log g       = lam - log(n - 1)
    u_old       <- g  if gamma < 1 and (u_old < 1e-35, inf or NaN)        (FastCLIP's reset rule)
    log u_new   = logaddexp(log(1 - gamma) + log u_old, log gamma + log g)  (u <- (1-gamma) u + gamma g)
    log u~      = logaddexp(log u_new, log eps)                           (u~ = eps + u_new)
    ratio       = g / u~
    shift       = s_j P_jj + log(n - 1) + log u~   (so exp(s_j P_jk - shift) = exp(s_j d_jk) / ((n-1) u~))

and, with per-sample temperatures (RGCL), the FCCO estimate of d/d tau_j of tau_j (log(eps + g_j) + rho):

    grad_tau    = clamp(log u~ + rho - ratio * delta / tau, -clip, clip)     (``reference``: log u_new)
    Adam step   m, v with betas (0 in epoch 0), bias correction by ``step`` = epoch + 1,
    tau         <- clamp(tau - lr * m_hat / (sqrt(v_hat) + adam_eps), tau_min, tau_max)

Only the rank owning sample j writes its log u (and tau, moments); every rank gets shift, ratio
and log u~ for all n anchors (the backward needs them). No host synchronization.
"""

import math
from dataclasses import dataclass

import torch

U_RESET_BELOW = 1e-35


@dataclass(frozen=True)
class UpdateConfig:
    """Host-side scalars of one update (see the module docstring)."""

    gamma: float
    eps: float
    rho: float = 0.0
    reference: bool = False
    lr_tau: float = 0.0
    beta1: float = 0.0
    beta2: float = 0.0
    adam_eps: float = 1e-8
    step: int = 1
    tau_min: float = 0.01
    tau_max: float = 1.0
    grad_clip: float = 5.0
    write: bool = True


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _scatter_owned(buf: torch.Tensor, slot, owned, new) -> None:
    """buf[:, slot[j]] = new[:, j] for owned j, without a host sync: other entries are redirected
    to the first owned entry's slot with its value (identical duplicate writes, so no race)."""
    j0 = owned.to(torch.int32).argmax().reshape(1)  # stays on the device (no 0-d indexing: that syncs)
    slot0 = slot.index_select(0, j0)
    keep = torch.where(owned.index_select(0, j0), new.index_select(1, j0), buf.index_select(1, slot0))
    target = torch.where(owned, slot, slot0)
    buf[:, target] = torch.where(owned, new, keep).to(buf.dtype)


def log_u_update(lam, log_u_old, gamma: float, n: int):
    """(log g, log u_new) of the module docstring, elementwise on [2, n]."""
    log_g = lam - math.log(n - 1)
    if gamma >= 1.0:
        return log_g, log_g
    bad = ~(log_u_old >= math.log(U_RESET_BELOW)) | (log_u_old == math.inf)
    log_u_old = torch.where(bad, log_g, log_u_old)
    return log_g, torch.logaddexp(math.log1p(-gamma) + log_u_old, math.log(gamma) + log_g)


def _adam_tau(state, slot, owned, grad, tau, cfg: UpdateConfig) -> None:
    m = cfg.beta1 * state.exp_avg[:, slot] + (1 - cfg.beta1) * grad
    v = cfg.beta2 * state.exp_avg_sq[:, slot] + (1 - cfg.beta2) * grad * grad
    m_hat = m / (1 - cfg.beta1**cfg.step)
    v_hat = v / (1 - cfg.beta2**cfg.step)
    tau_new = (tau - cfg.lr_tau * m_hat / (v_hat.sqrt() + cfg.adam_eps)).clamp(cfg.tau_min, cfg.tau_max)
    for name, value in (("exp_avg", m), ("exp_avg_sq", v), ("tau", tau_new)):
        _scatter_owned(getattr(state, name), slot, owned, value)


def state_update_torch(state, indices, lam, delta, pos_dot, log_u_old, tau, cfg: UpdateConfig):
    """(shift, ratio, log_ut, log_u_new), each [2, n], and the in-place update of ``state``'s shard.

    indices [n] int64 global sample ids; lam, delta, log_u_old, tau [2, n] (tau may be a stride-0
    expand of the global temperature); pos_dot [n]. Arithmetic in lam's dtype.
    """
    n = indices.shape[0]
    log_g, log_u_new = log_u_update(lam, log_u_old.to(lam.dtype), cfg.gamma, n)
    log_ut = torch.logaddexp(log_u_new, torch.full_like(log_u_new, _log(cfg.eps)))
    ratio = torch.exp(log_g - log_ut)
    shift = pos_dot / tau + math.log(n - 1) + log_ut
    if cfg.write:
        owned, slot = state.owned_slots(indices)
        _scatter_owned(state.log_u, slot, owned, log_u_new)
        if state.per_sample_tau:
            log_term = log_u_new if cfg.reference else log_ut
            grad = (log_term + cfg.rho - ratio * delta / tau).clamp(-cfg.grad_clip, cfg.grad_clip)
            _adam_tau(state, slot, owned, grad, tau, cfg)
    return shift, ratio, log_ut, log_u_new


def state_update(state, indices, lam, delta, pos_dot, log_u_old, tau, cfg: UpdateConfig, backend="chunked"):
    """Dispatch: the fused Triton kernel for backend "triton", else :func:`state_update_torch`."""
    if backend == "triton":
        from .update_kernel import state_update_fused

        return state_update_fused(state, indices, lam, delta, pos_dot, log_u_old, tau, cfg)
    return state_update_torch(state, indices, lam, delta, pos_dot, log_u_old, tau, cfg)
