"""Multi-tensor optimizer kernels: one AdamW or LAMB step, and the global gradient norm, over a
list of tensors of one dtype and device (math: ``naive.py``; the optimizers: ``fastclip_kernels.optim``).

Files: ``triton.py`` (Triton multi-tensor kernels; CUDA, or CPU under TRITON_INTERPRET=1),
``native.py`` (the CUDA / CPU kernels of the native library ``_C``), ``naive.py`` (plain PyTorch,
one tensor at a time: the spec and the CPU path). Registered ops (fake implementations; the
updated tensors are declared mutated, so a step traces; no autograd: optimizer steps run under
``no_grad``):

    fastclip::adamw_(params!, grads, exp_avgs!, exp_avg_sqs!, masters!, steps, lr?, lr_value,
        beta1, beta2, eps, weight_decay, grad_scale?, backend) -> ()
    fastclip::lamb_(... as adamw_ ..., bias_correction, grad_averaging, use_trust_ratio, backend) -> ()
    fastclip::global_grad_norm(grads, backend) -> norm []

``masters`` is an empty list without fp32 master weights; ``lr`` a 0-d device tensor or None (then
``lr_value``). Backends: "native", "triton", "reference" (see :func:`resolve_backend`).
"""

import torch
from torch import Tensor

from ..common import interpreting, is_gpu
from . import naive

BACKENDS = ("auto", "native", "triton", "reference")


def resolve_backend(backend: str, device, dtype: torch.dtype) -> str:
    """'auto': native where ``_C`` has kernels for the GPU, else triton, on a GPU (``is_gpu``); the
    reference on CPU and for fp64 (the kernels are fp32-math)."""
    if backend not in BACKENDS:
        raise ValueError(f"impl must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if dtype == torch.float64 or backend == "reference":
        return "reference"
    if backend == "auto":
        if not is_gpu(device):
            return "reference"
        from . import native

        return "native" if native.available(device) else "triton"
    if backend == "native":
        from . import native

        if not native.available(device):
            raise RuntimeError(f"impl='native' needs fastclip_kernels._C with kernels for {device}")
    elif device.type == "cpu" and not interpreting():
        raise ValueError("impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (or use impl='reference')")
    return backend


def _impl(backend: str):
    if backend == "native":
        from . import native

        return native
    if backend == "triton":
        from . import triton

        return triton
    return naive


def _lr(lr: Tensor | None, lr_value: float):
    return lr if lr is not None else lr_value


@torch.library.custom_op("fastclip::adamw_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "masters"))
def _adamw_op(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    masters: list[Tensor], steps: list[Tensor], lr: Tensor | None, lr_value: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, grad_scale: Tensor | None, backend: str,
) -> None:  # fmt: skip
    _impl(backend).adamw_(
        params, grads, exp_avgs, exp_avg_sqs, masters or None, steps, lr=_lr(lr, lr_value), beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay, grad_scale=grad_scale,
    )  # fmt: skip


@_adamw_op.register_fake
def _(*args):
    return None


@torch.library.custom_op("fastclip::lamb_", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "masters"))
def _lamb_op(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
    masters: list[Tensor], steps: list[Tensor], lr: Tensor | None, lr_value: float, beta1: float,
    beta2: float, eps: float, weight_decay: float, grad_scale: Tensor | None, bias_correction: bool,
    grad_averaging: bool, use_trust_ratio: bool, backend: str,
) -> None:  # fmt: skip
    _impl(backend).lamb_(
        params, grads, exp_avgs, exp_avg_sqs, masters or None, steps, lr=_lr(lr, lr_value), beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
        grad_averaging=grad_averaging, use_trust_ratio=use_trust_ratio, grad_scale=grad_scale,
    )  # fmt: skip


@_lamb_op.register_fake
def _(*args):
    return None


@torch.library.custom_op("fastclip::global_grad_norm", mutates_args=())
def _norm_op(grads: list[Tensor], backend: str) -> Tensor:
    norm = _impl(backend).global_grad_norm(grads).reshape(()).float()
    return norm.clone() if any(norm is g for g in grads) else norm


@_norm_op.register_fake
def _(grads, backend):
    return grads[0].new_empty((), dtype=torch.float32)


def adamw_(params, grads, exp_avgs, exp_avg_sqs, masters, steps, *, lr, beta1, beta2, eps, weight_decay,
           grad_scale=None, backend="auto"):  # fmt: skip
    """One AdamW step over lists of [any] tensors (params and fp32 moments updated in place).

    masters: None or fp32 copies of low-precision params (they receive the update); steps: 0-d fp32
    per-tensor step counters (already advanced); lr: float or 0-d tensor on the params' device.
    """
    backend = resolve_backend(backend, params[0].device, params[0].dtype)
    lr_t, lr_value = (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))
    torch.ops.fastclip.adamw_(
        params, grads, exp_avgs, exp_avg_sqs, masters or [], steps, lr_t, lr_value, beta1, beta2, eps,
        weight_decay, grad_scale, backend,
    )  # fmt: skip


def lamb_(params, grads, exp_avgs, exp_avg_sqs, masters, steps, *, lr, beta1, beta2, eps, weight_decay,
          bias_correction=True, grad_averaging=True, use_trust_ratio=True, grad_scale=None, backend="auto"):  # fmt: skip
    """One LAMB step (apex FusedLAMB, adam_w_mode); arguments as :func:`adamw_`."""
    backend = resolve_backend(backend, params[0].device, params[0].dtype)
    lr_t, lr_value = (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))
    torch.ops.fastclip.lamb_(
        params, grads, exp_avgs, exp_avg_sqs, masters or [], steps, lr_t, lr_value, beta1, beta2, eps,
        weight_decay, grad_scale, bias_correction, grad_averaging, use_trust_ratio, backend,
    )  # fmt: skip


def global_grad_norm(grads, backend="auto") -> Tensor:
    """0-d fp32 L2 norm over all gradients (one device), fp32 accumulation."""
    if not grads:
        return torch.zeros(())
    backend = resolve_backend(backend, grads[0].device, grads[0].dtype)
    return torch.ops.fastclip.global_grad_norm(grads, backend)


clip_coefficient = naive.clip_coefficient

__all__ = ["BACKENDS", "adamw_", "clip_coefficient", "global_grad_norm", "lamb_", "resolve_backend"]
