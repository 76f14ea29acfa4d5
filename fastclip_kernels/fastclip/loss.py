"""``FastCLIPLoss``: FastCLIP's global contrastive losses with device-resident u / tau state and a
low-communication distributed scheme (one stacked no-grad all-gather, no collective in backward).

Per step on rank k (b local pairs, n = K b global, rows o = k b .. o + b - 1):
    1. ONE all_gather of [image | text | sample indices] (bit-packed, no autograd).
    2. gcl family: ONE all_reduce fetching log u (and tau) of the n global samples from the ranks
       that own them (``FastCLIPState``).
    3. Per-anchor statistics of the b local image and text anchors against all n columns
       (``anchor_stats``), and ONE all_gather of them (5 numbers per pair).
    4. The state update for all n anchors (one fused kernel); owners write their entries.
    5. Backward, no collective: one ``anchor_grad`` per modality gives the full gradient of the
       local features, as local anchors (row term) and as negatives of every anchor (column term).
See ``objective.py`` for the objectives, the gradient-scale convention and the two conventions.
"""

import torch
import torch.distributed as dist
from torch import nn

from .._validation import (
    as_scalar_tensor,
    check_features,
    check_global_indices,
    check_indices,
    check_same_batch,
)
from ..ops.anchor import anchor_grad, anchor_stats
from ..ops.common import resolve_backend
from ..ops.state_update import UpdateConfig, state_update
from . import objective
from .schedules import gamma_at
from .state import FastCLIPState


def _gather(parts, world_size, group):
    if world_size == 1:
        return list(parts)
    from ..distributed.gather import all_gather_packed

    return all_gather_packed(parts, group=group)


class _FastCLIPGrad(torch.autograd.Function):
    """Attaches FastCLIP's gradient estimator to a loss value computed without autograd.

    forward(x, y, scale, value, dscale, X, Y, scale_all, shift, coef, pos_coef, rank,
    exclude_positive, backend) returns ``value``; backward gives x, y (one ``anchor_grad`` per
    modality, no collective) and scale (``dscale``). Tensors and plain numbers only: it never calls
    back into the ``FastCLIPLoss`` that created it.
    """

    @staticmethod
    def forward(ctx, x, y, scale, value, dscale, X, Y, scale_all, shift, coef, pos_coef, rank, excl, backend):
        ctx.save_for_backward(x, y, X, Y, scale_all, shift, coef, pos_coef, dscale)
        ctx.rank, ctx.exclude_positive, ctx.backend = rank, excl, backend
        return value.clone()

    @staticmethod
    def backward(ctx, grad_out):
        x, y, X, Y, scale, shift, coef, pos_coef, dscale = ctx.saved_tensors
        b = x.shape[0]
        o = ctx.rank * b
        kw = dict(label_offset=o, exclude_positive=ctx.exclude_positive, backend=ctx.backend)
        coef, pos_coef = coef * grad_out, pos_coef * grad_out
        local = slice(o, o + b)
        grad_x = anchor_grad(
            x, Y, pos_coef, row=(scale[0, local], shift[0, local], coef[0, local]),
            col=(scale[1], shift[1], coef[1]), **kw,
        )  # fmt: skip
        grad_y = anchor_grad(
            y, X, pos_coef, row=(scale[1, local], shift[1, local], coef[1, local]),
            col=(scale[0], shift[0], coef[0]), **kw,
        )  # fmt: skip
        grad_scale = grad_out * dscale if dscale is not None and ctx.needs_input_grad[2] else None
        return (grad_x, grad_y, grad_scale) + (None,) * 11


class FastCLIPLoss(nn.Module):
    """FastCLIP's losses (``mode``): clip (InfoNCE), gcl (v1, constant tau), gcl_g (v0: gcl with a
    global learnable tau, fast_clip's global_learnable without multiply_tau), rgcl (v2, per-sample
    tau), rgcl_g (v3, global learnable tau), on the global batch of ``world_size`` ranks.

    Args:
        data_size (int): number of samples N (global indices are in [0, N)); not needed for clip.
        mode (str): "clip" | "gcl" | "gcl_g" | "rgcl" | "rgcl_g".
        rank, world_size, group: torch.distributed placement (group None: the default group).
        gamma_min, gamma_decay_epochs, gamma_schedule: inner-LR schedule (``schedules.gamma_at``).
        eps (float): the epsilon in log(eps + g) and u~ = eps + u (fast_clip: 1e-14; LAION 1e-6).
        rho (float): the rho of RGCL / RGCL-g (6.5 CC3M, 8.5 CC12M, 16 LAION in FastCLIP-v3).
        convention (str): "exact" (default) or "reference" (fast_clip's code; see objective.py).
        tau_init, lr_tau, betas, adam_eps, tau_min, tau_max, grad_clip: per-sample tau (rgcl).
        state_dtype: dtype of the u / tau state (fp32; fp64 for exactness tests).
        backend (str): "auto" | "triton" | "chunked" for the tile kernels and the state update.

    forward(image_features [b, D], text_features [b, D], logit_scale=None, indices=None,
    output_dict=False) -> 0-d loss (global-batch objective, equal on all ranks).
        logit_scale: s = 1/tau, 0-d (required for clip, gcl, gcl_g, rgcl_g; None for rgcl). In gcl
            it is a constant: it gets no gradient (use requires_grad=False, or DDP will complain).
        indices: [b] int64 global sample indices (required except for clip); distinct, in range.
    Call ``set_epoch(e)`` at the start of each epoch (gamma and the per-sample Adam depend on it).

    Gradients: FastCLIP's estimator (u held fixed), which is the gradient of the returned value
    only when gamma = 1. Each rank's feature gradient is K x its share of the global one, so after
    DDP's mean over ranks parameters get exactly the single-process global-batch gradient; the
    logit_scale gradient is the global one on every rank. The u / tau state is written only in
    training mode with grad enabled (``eval()`` or ``torch.no_grad()`` leave it untouched).
    """

    def __init__(
        self,
        data_size: int | None = None,
        mode: str = "rgcl_g",
        *,
        rank: int = 0,
        world_size: int = 1,
        group=None,
        gamma_min: float = 0.8,
        gamma_decay_epochs: int = 10,
        gamma_schedule: str = "cosine",
        eps: float = 1e-14,
        rho: float = 0.0,
        convention: str = "exact",
        tau_init: float = 0.07,
        lr_tau: float = 0.0133,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        tau_min: float = 0.01,
        tau_max: float = 1.0,
        grad_clip: float = 5.0,
        state_dtype=torch.float32,
        device=None,
        backend: str = "auto",
    ):
        super().__init__()
        if mode not in objective.MODES:
            raise ValueError(f"mode must be one of {objective.MODES}, got {mode!r}")
        if convention not in objective.CONVENTIONS:
            raise ValueError(f"convention must be one of {objective.CONVENTIONS}, got {convention!r}")
        if (
            not isinstance(world_size, int)
            or world_size < 1
            or not isinstance(rank, int)
            or not 0 <= rank < world_size
        ):
            raise ValueError(
                f"need an int world_size >= 1 and rank in [0, world_size), got {rank!r}, {world_size!r}"
            )
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        gamma_at(1, gamma_min, gamma_decay_epochs, gamma_schedule)  # validates the schedule now
        if mode == "rgcl" and not 0 < tau_min <= tau_init <= tau_max:
            raise ValueError(f"need 0 < tau_min <= tau_init <= tau_max, got {tau_min}, {tau_init}, {tau_max}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        self.mode, self.convention, self.rank, self.world_size, self.group = (
            mode,
            convention,
            rank,
            world_size,
            group,
        )
        self.gamma_min, self.gamma_decay_epochs, self.gamma_schedule = (
            gamma_min,
            gamma_decay_epochs,
            gamma_schedule,
        )
        self.eps, self.rho, self.backend, self.epoch = eps, rho, backend, 0
        self.tau_hparams = dict(
            lr_tau=lr_tau, beta1=betas[0], beta2=betas[1], adam_eps=adam_eps,
            tau_min=tau_min, tau_max=tau_max, grad_clip=grad_clip,
        )  # fmt: skip
        self.state = None
        if mode != "clip":
            if data_size is None:
                raise ValueError(f"mode={mode!r} needs data_size (the number of samples)")
            self.state = FastCLIPState(
                data_size, rank=rank, world_size=world_size, per_sample_tau=mode == "rgcl",
                tau_init=tau_init, device=device, dtype=state_dtype,
            )  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    @property
    def gamma(self) -> float:
        return gamma_at(self.epoch, self.gamma_min, self.gamma_decay_epochs, self.gamma_schedule)

    def update_config(self, write: bool = True) -> UpdateConfig:
        warm = self.epoch > 0  # fast_clip: both betas are 0 in epoch 0, bias correction by epoch + 1
        hp = dict(self.tau_hparams)
        hp["beta1"], hp["beta2"] = (hp["beta1"], hp["beta2"]) if warm else (0.0, 0.0)
        return UpdateConfig(
            gamma=self.gamma, eps=self.eps, rho=self.rho, reference=self.convention == "reference",
            step=self.epoch + 1, write=write, **hp,
        )  # fmt: skip

    def forward(self, image_features, text_features, logit_scale=None, indices=None, output_dict=False):
        x, y, scale, indices = self._check(image_features, text_features, logit_scale, indices)
        backend = resolve_backend(self.backend, x)
        write = self.training and torch.is_grad_enabled()  # the u / tau state is written in training only
        with torch.no_grad():
            value, dscale, saved = self._forward_pass(x, y, scale, indices, backend, write)
        rank, excl = self.rank, self.mode != "clip"
        loss = _FastCLIPGrad.apply(x, y, scale, value, dscale, *saved, rank, excl, backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def _check_group(self) -> None:
        """world_size / rank must describe the process group (host-side, no device work)."""
        if self.world_size == 1:
            return
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                f"world_size={self.world_size} needs an initialized torch.distributed process group"
            )
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if (size, rank) != (self.world_size, self.rank):
            raise ValueError(
                f"rank={self.rank}, world_size={self.world_size} do not match the process group "
                f"(rank {rank} of {size})"
            )

    def _check(self, x, y, logit_scale, indices):
        self._check_group()
        check_features("image_features", x)
        check_features("text_features", y, x.shape[1], x.device, x.dtype)
        check_same_batch("text_features", y, "image_features", x)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self.mode == "rgcl":
            if logit_scale is not None:
                raise ValueError(
                    "mode='rgcl' keeps per-sample temperatures in its state; pass logit_scale=None"
                )
            scale = None
        else:
            if logit_scale is None:
                raise ValueError(f"mode={self.mode!r} needs logit_scale (s = 1/tau)")
            scale = as_scalar_tensor("logit_scale", logit_scale, x.device, acc, positive=True)
        if self.world_size * x.shape[0] < 2:
            raise ValueError("the global batch must have at least 2 pairs")
        if self.state is None:
            return x, y, scale, None
        if self.state.log_u.device != x.device:
            raise ValueError(
                f"the loss state is on {self.state.log_u.device} but the features are on {x.device}: "
                "move the loss with loss_fn.to(device) (or pass device= when constructing it)"
            )
        if indices is None:
            raise ValueError(f"mode={self.mode!r} needs indices: the [b] global sample indices of the batch")
        indices = check_indices("indices", indices, x.shape[0], self.state.data_size)
        return x, y, scale, indices.to(x.device, non_blocking=True)

    def _forward_pass(self, x, y, scale, indices, backend: str, write: bool):
        """(loss, dL/dscale or None, tensors the backward needs); runs the forward collectives."""
        K, b = self.world_size, x.shape[0]
        n, o = K * b, self.rank * b
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        parts = [x.detach(), y.detach()] + ([indices] if indices is not None else [])
        X, Y, *idx_all = _gather(parts, K, self.group)
        if self.state is not None:
            check_global_indices("indices (global batch)", idx_all[0], self.state.data_size)
            fetched = self.state.fetch(idx_all[0], self.group)
        if self.mode == "rgcl":
            tau = fetched["tau"].to(acc)
            s_all = 1.0 / tau
        else:
            s_all = scale.detach().reshape(()).to(acc).expand(2, n)
            tau = 1.0 / s_all
        lam, delta, pos_dot = self._anchor_statistics(x, y, X, Y, s_all[:, o : o + b], backend)
        if self.mode == "clip":
            loss, dscale, terms = objective.clip_terms(lam, delta, pos_dot, s_all[0, 0], K, o, b)
        else:
            shift, ratio, log_ut, log_u_new = state_update(
                self.state, idx_all[0], lam, delta, pos_dot, fetched["log_u"], tau, self.update_config(write),
                backend="triton" if backend == "triton" else "reference",
            )  # fmt: skip
            loss, dscale, terms = objective.gcl_terms(
                self.mode, self.convention, lam, delta, tau, ratio, shift, log_u_new, log_ut,
                self.eps, self.rho, K, o, b,
            )  # fmt: skip
        if dscale is not None:
            dscale = dscale.reshape(scale.shape).to(scale.dtype)
        return loss, dscale, (X, Y, terms.scale, terms.shift, terms.coef, terms.pos_coef)

    def _anchor_statistics(self, x, y, X, Y, scale_local, backend: str):
        """Gathered (lam [2, n], delta [2, n], pos_dot [n]) of all n anchors (one all_gather)."""
        kw = dict(label_offset=self.rank * x.shape[0], exclude_positive=self.mode != "clip", backend=backend)
        lse_x, mean_x, pos_x = anchor_stats(x, Y, scale_local[0], **kw)
        lse_y, mean_y, pos_y = anchor_stats(y, X, scale_local[1], **kw)
        local = torch.stack(
            [
                lse_x - scale_local[0] * pos_x,
                lse_y - scale_local[1] * pos_y,
                mean_x - pos_x,
                mean_y - pos_y,
                pos_x,
            ],
            dim=1,
        )  # [b, 5]: one row per pair, so the gather keeps rank-major order
        (stats,) = _gather([local], self.world_size, self.group)
        stats = stats.T
        return stats[0:2], stats[2:4], stats[4]
