"""FastCLIP's per-step state update over the global batch: one registered op, two implementations
(``triton.py``: one fused kernel; ``naive.py``: the plain-PyTorch spec, also the CPU path).

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

    grad_tau    = clamp(log u~ + rho - ratio * delta / tau, -clip, clip)

in both conventions: fast_clip's v2 code (``FastCLIPLossIndividual``) also takes log(u + eps), in its
bound-shifted form log(u e^-b + eps) + b = log(u + eps e^b) with b >= 0 its per-sample running max of
s_j (P_jk - P_jj). Our state has no b: the two agree while b = 0 (no negative ever scored above the
positive) and differ by log(1 + eps (e^b - 1) / (u + eps)) otherwise (tests/test_fastclip_rgcl.py).
``reference`` (in the op's arguments) therefore does not change this update.
    Adam step   m, v with betas (0 in epoch 0), bias correction by ``step`` = epoch + 1,
    tau         <- clamp(tau - lr * m_hat / (sqrt(v_hat) + adam_eps), tau_min, tau_max)

Only the rank owning sample j writes its log u (and tau, moments); every rank gets shift, ratio
and log u~ for all n anchors (the backward needs them). No host synchronization.

Registered op (fake implementation; the state tensors are declared mutated, so it traces):

    fastclip::state_update(indices, lam, delta, pos_dot, log_u_old, tau, log_u!, tau_state!?,
        exp_avg!?, exp_avg_sq!?, rank, world_size, data_size, hparams: float[10], step, reference, write,
        backend) -> (shift, ratio, log_ut, log_u_new)   each [2, n]
It takes tensors and plain numbers, never the ``FastCLIPState`` module that owns the buffers.
Its indices are checked like the loss's (``_validation.check_global_indices``): [n] int32/int64, in
[0, data_size) and distinct; CPU values on the host (ValueError), device values with device-side asserts
(``torch._assert_async``, no host sync) unless FASTCLIP_CHECK_INDICES=1 (then on the host). A bad
index would otherwise update the wrong sample's u (one past the shard aliases the other modality's row)
or let two programs race on one slot.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from ..._validation import check_global_indices
from ..common import resolve_backend
from . import naive
from .naive import U_RESET_BELOW

_FLOATS = ("gamma", "eps", "rho", "lr_tau", "beta1", "beta2", "adam_eps", "tau_min", "tau_max", "grad_clip")


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

    def floats(self) -> list[float]:
        return [float(getattr(self, name)) for name in _FLOATS]

    @classmethod
    def from_op_args(cls, hparams, step: int, reference: bool, write: bool) -> "UpdateConfig":
        return cls(**dict(zip(_FLOATS, hparams, strict=True)), step=step, reference=reference, write=write)


def _check_indices(indices, lam: Tensor, data_size: int, values: bool = True) -> None:
    """indices: [n] int32/int64 on lam's device for lam [2, n]; with ``values``, in range and distinct."""
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor of global sample ids, got {type(indices).__name__}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int64 (or int32) global sample ids, got {indices.dtype}")
    if lam.dim() != 2 or lam.shape[0] != 2 or indices.shape != (lam.shape[1],):
        raise ValueError(
            f"indices must be [n] for lam [2, n], got indices {tuple(indices.shape)}, lam {tuple(lam.shape)}"
        )
    if indices.device != lam.device:
        raise ValueError(f"indices are on {indices.device}, expected {lam.device} (as lam)")
    if values:
        check_global_indices("indices", indices, data_size)


@torch.library.custom_op(
    "fastclip::state_update", mutates_args=("log_u", "tau_state", "exp_avg", "exp_avg_sq")
)
def _state_update_op(
    indices: Tensor,
    lam: Tensor,
    delta: Tensor,
    pos_dot: Tensor,
    log_u_old: Tensor,
    tau: Tensor,
    log_u: Tensor,
    tau_state: Tensor | None,
    exp_avg: Tensor | None,
    exp_avg_sq: Tensor | None,
    rank: int,
    world_size: int,
    data_size: int,
    hparams: list[float],
    step: int,
    reference: bool,
    write: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_indices(indices, lam, data_size)
    cfg = UpdateConfig.from_op_args(hparams, step, reference, write)
    buffers = naive.StateBuffers(log_u, tau_state, exp_avg, exp_avg_sq, rank, world_size)
    if backend == "triton":
        from .triton import state_update_fwd

        return state_update_fwd(buffers, indices, lam, delta, pos_dot, log_u_old, tau, cfg)
    return naive.state_update_ref(buffers, indices, lam, delta, pos_dot, log_u_old, tau, cfg)


@_state_update_op.register_fake
def _(
    indices,
    lam,
    delta,
    pos_dot,
    log_u_old,
    tau,
    log_u,
    tau_state,
    exp_avg,
    exp_avg_sq,
    rank,
    world_size,
    data_size,
    *rest,
):
    _check_indices(indices, lam, data_size, values=False)
    return tuple(torch.empty_like(lam, memory_format=torch.contiguous_format) for _ in range(4))


def state_update(state, indices, lam, delta, pos_dot, log_u_old, tau, cfg: UpdateConfig, backend="auto"):
    """(shift, ratio, log_ut, log_u_new), each [2, n], and the in-place update of ``state``'s shard.

    Args:
        state: a ``FastCLIPState`` (its buffers and placement are read here and handed to the op).
        indices (torch.Tensor): [n] int64 global sample ids of the global batch.
        lam, delta, log_u_old, tau (torch.Tensor): [2, n] (tau may be a stride-0 expand of the global
            temperature); pos_dot [n]. Arithmetic in lam's dtype.
        cfg (UpdateConfig): the step's scalars. backend: "auto", "triton" or "reference".
    """
    backend = resolve_backend(backend, lam, "reference")
    per_sample = state.per_sample_tau
    opt = (state.tau, state.exp_avg, state.exp_avg_sq) if per_sample else (None, None, None)
    return torch.ops.fastclip.state_update(
        indices, lam, delta, pos_dot, log_u_old, tau, state.log_u, *opt, state.rank, state.world_size,
        state.data_size, cfg.floats(), cfg.step, cfg.reference, cfg.write, backend,
    )  # fmt: skip


__all__ = ["UpdateConfig", "U_RESET_BELOW", "state_update"]
