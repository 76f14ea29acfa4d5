"""RGCL (FastCLIP-v2, per-sample tau) over several epochs against an independent dense simulation:
u update, the per-sample tau gradient, Adam with betas 0 in epoch 0 and bias correction by
epoch + 1, gradient clamp, tau clamp; model gradient with (exact) and without (reference) the
tau_i factor. Also strided and out-of-range indices."""

import pytest
import torch
from helpers import assert_rel_close, grads
from test_fastclip_loss import pairs

from fastclip_kernels.fastclip import FastCLIPLoss
from fastclip_kernels.fastclip.naive import fcco_surrogate_ref, gcl_g_ref
from fastclip_kernels.ops.state_update.naive import u_update_ref

N_DATA, EPS, RHO, LR, BETAS = 30, 1e-14, 1.5, 0.02, (0.9, 0.99)
BATCHES = [
    [0, 1, 2, 3, 4, 5],
    [6, 7, 8, 9, 10, 11],
    [3, 1, 9, 7, 12, 0],
    [11, 2, 5, 13, 4, 8],
    [0, 9, 4, 13, 6, 2],
]
EPOCHS = [0, 0, 1, 2, 3]


class DenseRGCL:
    """The RGCL state and update written out per sample from loss_anchors.md §1.5 (fp64)."""

    def __init__(self, tau_init, convention):
        self.u = torch.zeros(2, N_DATA, dtype=torch.float64)
        self.tau = torch.full((2, N_DATA), tau_init, dtype=torch.float64)
        self.m, self.v = torch.zeros_like(self.u), torch.zeros_like(self.u)
        self.convention = convention

    def step(self, x, y, idx, gamma, epoch):
        """Updates the state; returns the surrogate whose x/y gradient is the model gradient."""
        tau = self.tau[:, idx].clone().requires_grad_()
        g1, g2 = gcl_g_ref(x.detach(), y.detach(), 1 / tau[0], 1 / tau[1])
        u_new = torch.stack(
            [
                u_update_ref(self.u[0, idx], g1.detach(), gamma),
                u_update_ref(self.u[1, idx], g2.detach(), gamma),
            ]
        )
        # d/dtau_i of tau_i (log(eps + g_i) + rho) with g -> u in the denominator (FCCO):
        # log(eps + u) + rho + tau_i g_i'(tau_i) / (eps + u)
        (dg,) = torch.autograd.grad((torch.stack([g1, g2]) / (EPS + u_new)).sum(), tau)
        # both conventions: fast_clip's v2 code also takes log(u + eps) (see ops/state_update)
        grad = (torch.log(EPS + u_new) + RHO + tau.detach() * dg).clamp(-5, 5)
        b1, b2 = BETAS if epoch > 0 else (0.0, 0.0)
        m = b1 * self.m[:, idx] + (1 - b1) * grad
        v = b2 * self.v[:, idx] + (1 - b2) * grad**2
        m_hat, v_hat = m / (1 - b1 ** (epoch + 1)), v / (1 - b2 ** (epoch + 1))
        tau_used = tau.detach()
        self.tau[:, idx] = (tau_used - LR * m_hat / (v_hat.sqrt() + 1e-8)).clamp(0.01, 1.0)
        self.m[:, idx], self.v[:, idx], self.u[:, idx] = m, v, u_new
        w = tau_used if self.convention == "exact" else torch.ones_like(tau_used)
        return fcco_surrogate_ref(x, y, tau_used[0], tau_used[1], u_new[0], u_new[1], EPS, w[0], w[1])


@pytest.mark.parametrize("convention", ["exact", "reference"])
def test_rgcl_over_epochs_matches_dense_simulation(convention):
    kw = dict(rho=RHO, lr_tau=LR, betas=BETAS, tau_init=0.05, gamma_min=0.3, gamma_decay_epochs=3)
    fn = FastCLIPLoss(
        N_DATA, "rgcl", convention=convention, state_dtype=torch.float64, backend="chunked", **kw
    )
    dense = DenseRGCL(0.05, convention)
    for step, (batch, epoch) in enumerate(zip(BATCHES, EPOCHS, strict=True)):
        fn.set_epoch(epoch)
        x, y = pairs(len(batch), seed=10 + step)
        idx = torch.tensor(batch)
        loss = fn(x, y, None, idx)
        ref = dense.step(x, y, idx, fn.gamma, epoch)
        for name, got, want in zip("xy", grads(loss, [x, y]), grads(ref, [x, y]), strict=True):
            assert_rel_close(f"step {step} d{name}", got, want, 1e-10)
    seen = sorted({i for batch in BATCHES for i in batch})
    assert_rel_close("u", fn.state.log_u[:, seen].exp(), dense.u[:, seen], 1e-10)
    for name, want in (("tau", dense.tau), ("exp_avg", dense.m), ("exp_avg_sq", dense.v)):
        assert_rel_close(name, getattr(fn.state, name)[:, seen], want[:, seen], 1e-10)
    assert (fn.state.tau[:, seen] != 0.05).all(), "every visited tau must have moved"


def test_strided_indices_reach_the_right_samples():
    """A non-contiguous int64 index view must update the samples it names (Triton and chunked)."""
    from conftest import triton_device

    idx = torch.arange(0, 24, 2)[::2]  # [0, 4, ..., 20], stride 4
    assert not idx.is_contiguous()
    for backend, dev in (("triton", triton_device()), ("chunked", "cpu")):
        fn = FastCLIPLoss(N_DATA, "gcl", backend=backend, device=dev)
        x, y = (t.detach().float().to(dev) for t in pairs(6))
        fn(x, y, 10.0, idx)
        written = torch.isfinite(fn.state.log_u[0]).nonzero().flatten().cpu().tolist()
        assert written == idx.tolist(), backend
