"""``FusedAdamW`` and ``FusedLAMB``: ``torch.optim.Optimizer`` subclasses over multi-tensor kernels.

Per step: optional global grad-norm clipping (norm and clip coefficient stay on the device), the
per-tensor step counters advance with one foreach op, then each (device, dtype) bucket of a param
group is updated by one launch of the chosen implementation:

    "native"    CUDA multi-tensor-apply kernels in csrc/ (``fastclip_kernels._C``)
    "triton"    Triton multi-tensor kernels (CUDA, or CPU under TRITON_INTERPRET=1)
    "reference" plain PyTorch, one tensor at a time (the CPU path and the ground truth)
    "auto"      native on CUDA if built with nvcc, else triton; reference on CPU

State per parameter: ``exp_avg``, ``exp_avg_sq`` (fp32; fp64 for fp64 params, which always take
the reference path), ``step`` (0-d fp32 on the param's device,
so a step needs no host value and can be captured in a CUDA graph when lr is a tensor) and, with
``master_weights=True`` for fp16/bf16 params, an fp32 ``master`` copy that receives the update.
"""

import torch

from ..ops import optim as kernels

IMPLS = kernels.BACKENDS
TRUST_RATIO = ("weight_decay_only", "all", "none")
LOW_PRECISION = (torch.float16, torch.bfloat16)


class _MultiTensorOptimizer(torch.optim.Optimizer):
    """Shared bookkeeping: validation, state, clipping, bucketing. Subclasses define ``_update``."""

    def __init__(self, params, defaults, *, max_grad_norm=None, master_weights=False, impl="auto"):
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")
        lr = defaults["lr"]
        if not isinstance(lr, torch.Tensor) and not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        for i, beta in enumerate(defaults["betas"]):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] must be in [0, 1), got {beta!r}")
        if not defaults["eps"] >= 0:
            raise ValueError(f"eps must be >= 0, got {defaults['eps']!r}")
        if not defaults["weight_decay"] >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {defaults['weight_decay']!r}")
        super().__init__(params, defaults)
        self.max_grad_norm, self.master_weights, self.impl = max_grad_norm, master_weights, impl
        self.last_grad_norm = None  # 0-d device tensor after a clipped step

    def load_state_dict(self, state_dict) -> None:
        """torch's loader casts floating state to each param's dtype (fp32 moments and masters of a
        bf16 param would become bf16): load, then put back the saved tensors in their own dtype."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)

    def _state_for(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            moment_dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            if self.master_weights and p.dtype in LOW_PRECISION:
                state["master"] = p.detach().float()
        return state

    def _live_params(self, group) -> list:
        live = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"{type(self).__name__} does not support sparse gradients")
            if p.dtype in LOW_PRECISION and not self.master_weights:
                raise TypeError(f"{p.dtype} parameters need master_weights=True (fp32 copies of the weights)")
            if p.dtype not in (torch.float32, torch.float64) + LOW_PRECISION:
                raise TypeError(f"parameters must be floating point, got {p.dtype}")
            live.append(p)
        return live

    def _grad_scale(self, groups_live):
        if self.max_grad_norm is None:
            return {}
        by_device: dict = {}
        for live in groups_live:
            for p in live:
                by_device.setdefault(p.device, []).append(p.grad)
        if len(by_device) > 1:
            raise ValueError(
                f"max_grad_norm needs all parameters on one device, got {sorted(map(str, by_device))}"
            )
        scales = {}
        for device, grads in by_device.items():
            fp64 = any(g.dtype == torch.float64 for g in grads)
            impl = "reference" if fp64 else self.impl
            self.last_grad_norm = kernels.global_grad_norm(grads, impl)
            scales[device] = kernels.clip_coefficient(self.last_grad_norm, self.max_grad_norm)
        return scales

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups_live = [self._live_params(group) for group in self.param_groups]
        scales = self._grad_scale(groups_live)
        for group, live in zip(self.param_groups, groups_live, strict=True):
            buckets: dict = {}
            for p in live:
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for (device, _), bucket in buckets.items():
                states = [self._state_for(p) for p in bucket]
                steps = [s["step"] for s in states]
                torch._foreach_add_(steps, 1.0)
                masters = [s["master"] for s in states] if "master" in states[0] else None
                tensors = (
                    bucket, [p.grad for p in bucket], [s["exp_avg"] for s in states],
                    [s["exp_avg_sq"] for s in states], masters, steps,
                )  # fmt: skip
                # fp64 (tests, CPU) always takes the reference path: the kernels are fp32-math.
                self._update(group, tensors, scales.get(device))
        return loss


class FusedAdamW(_MultiTensorOptimizer):
    """AdamW (decoupled weight decay), multi-tensor. Same update as ``torch.optim.AdamW`` (non-amsgrad).

    Args: params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2 (per group), and
    keyword-only max_grad_norm (global clipping, on the device), master_weights (fp32 masters for
    fp16/bf16 params), impl ("auto" | "native" | "triton" | "reference"). ``lr`` may be a 0-d tensor
    on the params' device (read in the kernel: no host value per step).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kwargs):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), **kwargs)

    def _update(self, group, tensors, grad_scale):
        beta1, beta2 = group["betas"]
        kernels.adamw_(
            *tensors, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], grad_scale=grad_scale, backend=self.impl,
        )  # fmt: skip


class FusedLAMB(_MultiTensorOptimizer):
    """LAMB, multi-tensor: Adam moments, update u = m_hat/(sqrt(v_hat)+eps) + wd w, trust ratio
    ||w|| / ||u|| per tensor (norms reduced on the device), w -= lr * ratio * u.

    Args: params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
    grad_averaging=True (per group), and keyword-only trust_ratio: "weight_decay_only" (default;
    apex FusedLAMB and FastCLIP's LAMB: groups with weight_decay == 0, e.g. biases, norms and the
    temperature, take plain Adam steps), "all" (apex's use_nvlamb) or "none"; max_grad_norm,
    master_weights, impl as :class:`FusedAdamW`.
    """

    def __init__(
        self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, bias_correction=True,
        grad_averaging=True, *, trust_ratio="weight_decay_only", **kwargs,
    ):  # fmt: skip
        if trust_ratio not in TRUST_RATIO:
            raise ValueError(f"trust_ratio must be one of {TRUST_RATIO}, got {trust_ratio!r}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
            grad_averaging=grad_averaging,
        )  # fmt: skip
        super().__init__(params, defaults, **kwargs)
        self.trust_ratio = trust_ratio

    def _update(self, group, tensors, grad_scale):
        beta1, beta2 = group["betas"]
        use = self.trust_ratio == "all" or (
            self.trust_ratio == "weight_decay_only" and group["weight_decay"] != 0
        )
        kernels.lamb_(
            *tensors, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], bias_correction=group["bias_correction"],
            grad_averaging=group["grad_averaging"], use_trust_ratio=use, grad_scale=grad_scale,
            backend=self.impl,
        )  # fmt: skip
