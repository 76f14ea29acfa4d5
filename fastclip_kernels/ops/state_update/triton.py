"""Fused Triton kernel of the FastCLIP state update (contract and math: ``__init__.py``).

One launch per step, grid (cdiv(n, BLOCK), 2): program (pid_n, m) updates BLOCK global anchors of
modality m. Per anchor it reads 6 values (+3 with per-sample tau), writes 4 outputs and, where
this rank owns the sample, 1 (or 4) state entries: ~60 bytes per anchor and modality in fp32,
versus ~25 separate PyTorch kernels. All arithmetic stays in the log domain; nothing overflows.
"""

import math

import torch
import triton
import triton.language as tl

from ..common import small_tiles
from .naive import U_RESET_BELOW, StateBuffers, _log


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    t = tl.exp(lo - hi)
    log1p_t = tl.where(t < 1e-4, t * (1.0 - 0.5 * t), tl.log(1.0 + t))
    return tl.where(lo == float("-inf"), hi, hi + log1p_t)


@triton.jit
def _fastclip_state_update_kernel(
    idx_ptr, lam_ptr, delta_ptr, pos_dot_ptr, log_u_old_ptr, tau_ptr,
    log_u_ptr, tau_state_ptr, exp_avg_ptr, exp_avg_sq_ptr,
    shift_ptr, ratio_ptr, log_ut_ptr, log_u_new_ptr,
    n, shard, stride_tau_m, stride_tau_n, rank, world_size,
    log1m_gamma, log_gamma, log_eps, log_nm1, log_reset, rho,
    lr_tau, beta1, beta2, bias_corr1, bias_corr2, adam_eps, tau_min, tau_max, grad_clip,
    GAMMA_ONE: tl.constexpr, PER_SAMPLE_TAU: tl.constexpr, WRITE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask_n = offs_n < n
    lam = tl.load(lam_ptr + m * n + offs_n, mask=mask_n, other=0.0)
    delta = tl.load(delta_ptr + m * n + offs_n, mask=mask_n, other=0.0).to(lam.dtype)
    pos_dot = tl.load(pos_dot_ptr + offs_n, mask=mask_n, other=0.0).to(lam.dtype)
    tau = tl.load(tau_ptr + m * stride_tau_m + offs_n * stride_tau_n, mask=mask_n, other=1.0).to(lam.dtype)
    log_g = lam - log_nm1
    if GAMMA_ONE:
        log_u_new = log_g
    else:
        log_u_old = tl.load(log_u_old_ptr + m * n + offs_n, mask=mask_n, other=0.0).to(lam.dtype)
        bad = ~(log_u_old >= log_reset) | (log_u_old == float("inf"))  # also NaN
        log_u_old = tl.where(bad, log_g, log_u_old)
        log_u_new = _logaddexp(log1m_gamma + log_u_old, log_gamma + log_g)
    log_ut = _logaddexp(log_u_new, log_eps)
    ratio = tl.exp(log_g - log_ut)
    tl.store(shift_ptr + m * n + offs_n, pos_dot / tau + log_nm1 + log_ut, mask=mask_n)
    tl.store(ratio_ptr + m * n + offs_n, ratio, mask=mask_n)
    tl.store(log_ut_ptr + m * n + offs_n, log_ut, mask=mask_n)
    tl.store(log_u_new_ptr + m * n + offs_n, log_u_new, mask=mask_n)
    if WRITE:
        idx = tl.load(idx_ptr + offs_n, mask=mask_n, other=0)
        owned = mask_n & (idx >= 0) & (idx % world_size == rank) & (idx // world_size < shard)
        slot = m * shard + idx // world_size
        tl.store(log_u_ptr + slot, log_u_new.to(log_u_ptr.dtype.element_ty), mask=owned)
        if PER_SAMPLE_TAU:
            grad = log_ut + rho - ratio * delta / tau
            grad = tl.minimum(tl.maximum(grad, -grad_clip), grad_clip)
            exp_avg = beta1 * tl.load(exp_avg_ptr + slot, mask=owned, other=0.0) + (1.0 - beta1) * grad
            exp_avg_sq = (
                beta2 * tl.load(exp_avg_sq_ptr + slot, mask=owned, other=0.0) + (1.0 - beta2) * grad * grad
            )
            step = lr_tau * (exp_avg / bias_corr1) / (tl.sqrt(exp_avg_sq / bias_corr2) + adam_eps)
            tau_new = tl.minimum(tl.maximum(tau - step, tau_min), tau_max)
            tl.store(exp_avg_ptr + slot, exp_avg.to(exp_avg_ptr.dtype.element_ty), mask=owned)
            tl.store(exp_avg_sq_ptr + slot, exp_avg_sq.to(exp_avg_sq_ptr.dtype.element_ty), mask=owned)
            tl.store(tau_state_ptr + slot, tau_new.to(tau_state_ptr.dtype.element_ty), mask=owned)


BLOCK = 1024


def state_update_fwd(state: StateBuffers, indices, lam, delta, pos_dot, log_u_old, tau, cfg):
    """Same contract as ``naive.state_update_ref``: (shift, ratio, log_ut, log_u_new) [2, n]."""
    n = indices.shape[0]
    indices = indices.contiguous()  # the kernel reads idx_ptr + offs_n
    lam, delta, pos_dot = lam.contiguous(), delta.contiguous(), pos_dot.contiguous()
    log_u_old = log_u_old.contiguous()
    shift, ratio, log_ut, log_u_new = (torch.empty_like(lam) for _ in range(4))
    per_sample = state.tau is not None
    tau_state = state.tau if per_sample else state.log_u  # never read unless per_sample
    exp_avg = state.exp_avg if per_sample else state.log_u
    exp_avg_sq = state.exp_avg_sq if per_sample else state.log_u
    block = 16 if lam.device.type == "cpu" and small_tiles() else BLOCK  # interpreter: small blocks
    grid = (triton.cdiv(n, block), 2)
    _fastclip_state_update_kernel[grid](
        indices, lam, delta, pos_dot, log_u_old, tau,
        state.log_u, tau_state, exp_avg, exp_avg_sq,
        shift, ratio, log_ut, log_u_new,
        n, state.log_u.shape[1], tau.stride(0), tau.stride(1), state.rank, state.world_size,
        math.log1p(-cfg.gamma) if cfg.gamma < 1 else 0.0, _log(cfg.gamma), _log(cfg.eps),
        math.log(n - 1), math.log(U_RESET_BELOW), cfg.rho,
        cfg.lr_tau, cfg.beta1, cfg.beta2, 1.0 - cfg.beta1**cfg.step, 1.0 - cfg.beta2**cfg.step,
        cfg.adam_eps, cfg.tau_min, cfg.tau_max, cfg.grad_clip,
        GAMMA_ONE=cfg.gamma >= 1.0, PER_SAMPLE_TAU=per_sample,
        WRITE=cfg.write, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return shift, ratio, log_ut, log_u_new
