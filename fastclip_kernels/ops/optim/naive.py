"""Plain-PyTorch, one-tensor-at-a-time AdamW and LAMB steps: the CPU path and the reference that
the fused paths (Triton, native CUDA) must match. Every function updates its arguments in place.

Shared arguments (lists of equal length, one entry per parameter tensor):
    params       parameters (fp32, or bf16/fp16 when ``masters`` holds their fp32 copies)
    grads        gradients, the params' dtype
    exp_avgs, exp_avg_sqs   fp32 Adam moments m, v
    masters      fp32 master weights or None (then params must be fp32/fp64 and are updated directly)
    steps        0-d fp32 step counters, ALREADY incremented for this step (so step >= 1)
    grad_scale   0-d fp32 tensor multiplying every gradient (global-norm clipping), or None

AdamW (decoupled weight decay; the order of torch.optim.AdamW, non-amsgrad):
    g = grad * grad_scale
    p = p * (1 - lr * wd)
    m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

LAMB (You et al. 2020; apex FusedLAMB's update with adam_w_mode, no weight-norm clamp):
    g = grad * grad_scale
    m = beta1 m + c g  (c = 1 - beta1 with grad_averaging, else 1);   v = beta2 v + (1 - beta2) g^2
    m_hat, v_hat = m / (1 - beta1^t), v / (1 - beta2^t)   (m, v without bias correction)
    u = m_hat / (sqrt(v_hat) + eps) + wd p
    r = ||p|| / ||u|| if use_trust_ratio and both norms > 0, else 1
    p = p - lr r u
"""

import torch


def _target(p, master):
    return master if master is not None else p


def _write_back(p, master):
    if master is not None:
        p.copy_(master)  # round the fp32 master to the param dtype


def _scaled(g, grad_scale):
    g = g.float() if g.dtype != torch.float64 else g
    return g * grad_scale if grad_scale is not None else g


def global_grad_norm(grads) -> torch.Tensor:
    """0-d fp32 L2 norm over all gradients (fp32 accumulation), on the gradients' device."""
    squares = [g.float().pow(2).sum() for g in grads]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (total_norm + 1e-6)) as a 0-d tensor (torch's clip_grad_norm_ rule)."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


def adamw_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    masters,
    steps,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    grad_scale=None,
):
    """One AdamW step over every tensor (see the module docstring)."""
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        master = masters[i] if masters is not None else None
        w = _target(p, master)
        g = _scaled(g, grad_scale)
        t = steps[i].to(w.dtype)  # bias corrections in the weight dtype (fp64 for fp64)
        w.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = lr / (1 - beta1**t)
        denom = (v.sqrt() / (1 - beta2**t).sqrt()).add_(eps)
        w.sub_(m / denom * step_size)
        _write_back(p, master)


def lamb_(
    params, grads, exp_avgs, exp_avg_sqs, masters, steps, *, lr, beta1, beta2, eps, weight_decay,
    bias_correction=True, grad_averaging=True, use_trust_ratio=True, grad_scale=None,
):  # fmt: skip
    """One LAMB step over every tensor (see the module docstring)."""
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
        master = masters[i] if masters is not None else None
        w = _target(p, master)
        g = _scaled(g, grad_scale)
        t = steps[i].to(w.dtype)  # bias corrections in the weight dtype (fp64 for fp64)
        m.mul_(beta1).add_(g, alpha=(1 - beta1) if grad_averaging else 1.0)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        m_hat, v_hat = (m / (1 - beta1**t), v / (1 - beta2**t)) if bias_correction else (m, v)
        update = m_hat / (v_hat.sqrt() + eps) + weight_decay * w
        ratio = torch.ones((), dtype=w.dtype, device=w.device)
        if use_trust_ratio:
            w_norm, u_norm = w.norm(), update.norm()
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, ratio)
        w.sub_(lr * ratio * update)
        _write_back(p, master)
