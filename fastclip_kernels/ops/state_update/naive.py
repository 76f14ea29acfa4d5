"""Plain-PyTorch spec of the FastCLIP state update (the CPU path; math: ``__init__.py``), and the
textbook u update ``u_update_ref`` the tests check both implementations against."""

import math
from typing import NamedTuple

import torch

U_RESET_BELOW = 1e-35


class StateBuffers(NamedTuple):
    """The state shard an update writes: log_u [2, shard] (and tau, Adam moments with per-sample
    tau, else None) of rank ``rank`` of ``world_size``."""

    log_u: torch.Tensor
    tau: torch.Tensor | None
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None
    rank: int
    world_size: int


def owned_slots(indices: torch.Tensor, rank: int, world_size: int, shard: int):
    """(owned [n] bool, slot [n] int64): which global indices rank ``rank`` stores, and where.
    Out-of-range indices are owned by no rank (never written); slots of indices this rank does
    not own are clamped into range (read, never used unmasked)."""
    slot = indices // world_size
    owned = (indices % world_size == rank) & (indices >= 0) & (slot < shard)
    return owned, slot.clamp(0, max(shard - 1, 0))


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


def _adam_tau(state, slot, owned, grad, tau, cfg) -> None:
    m = cfg.beta1 * state.exp_avg[:, slot] + (1 - cfg.beta1) * grad
    v = cfg.beta2 * state.exp_avg_sq[:, slot] + (1 - cfg.beta2) * grad * grad
    m_hat = m / (1 - cfg.beta1**cfg.step)
    v_hat = v / (1 - cfg.beta2**cfg.step)
    tau_new = (tau - cfg.lr_tau * m_hat / (v_hat.sqrt() + cfg.adam_eps)).clamp(cfg.tau_min, cfg.tau_max)
    for name, value in (("exp_avg", m), ("exp_avg_sq", v), ("tau", tau_new)):
        _scatter_owned(getattr(state, name), slot, owned, value)


def state_update_ref(state, indices, lam, delta, pos_dot, log_u_old, tau, cfg):
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
        owned, slot = owned_slots(indices, state.rank, state.world_size, state.log_u.shape[1])
        _scatter_owned(state.log_u, slot, owned, log_u_new)
        if state.tau is not None:
            grad = (log_ut + cfg.rho - ratio * delta / tau).clamp(-cfg.grad_clip, cfg.grad_clip)
            _adam_tau(state, slot, owned, grad, tau, cfg)
    return shift, ratio, log_ut, log_u_new


def u_update_ref(u_old, g, gamma):
    """u <- (1 - gamma) u + gamma g, with fast_clip's reset of u < 1e-35, inf or NaN to g (gamma < 1)."""
    if gamma >= 1.0:
        return g.clone()
    bad = ~(u_old >= 1e-35) | torch.isinf(u_old)
    return (1 - gamma) * torch.where(bad, g, u_old) + gamma * g
