"""FastCLIPLoss in one process against the dense fp64 references (fastclip/naive.py).

Model gradients must equal autograd of the dense surrogate/objective to rel. error 1e-10 in fp64;
u and tau state must follow the update formulas for every index seen.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close, grads, leaf

import fastclip_kernels._validation as validation
from fastclip_kernels.fastclip import FastCLIPLoss
from fastclip_kernels.fastclip.naive import fcco_surrogate_ref, gcl_g_ref, gcl_objective_ref
from fastclip_kernels.ops.contrastive_loss.naive import contrastive_loss_ref
from fastclip_kernels.ops.state_update.naive import u_update_ref

RTOL = 1e-10
N_DATA = 40


def pairs(n, d=16, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=gen, dtype=dtype), dim=-1)
    y = F.normalize(x + 0.7 * torch.randn(n, d, generator=gen, dtype=dtype), dim=-1)
    return leaf(x), leaf(y)


def make(mode, **kw):
    kw.setdefault("state_dtype", torch.float64)
    kw.setdefault("backend", "chunked")
    return FastCLIPLoss(N_DATA, mode, **kw)


def test_clip_mode_matches_open_clip():
    x, y = pairs(9)
    s = leaf(torch.tensor(14.0, dtype=torch.float64))
    loss = FastCLIPLoss(mode="clip", backend="chunked")(x, y, s)
    ref = contrastive_loss_ref(x, y, s)
    assert_rel_close("loss", loss, ref, RTOL)
    for name, got, want in zip("xys", grads(loss, [x, y, s]), grads(ref, [x, y, s]), strict=True):
        assert_rel_close(f"d{name}", got, want, RTOL)


@pytest.mark.parametrize("mode", ["gcl", "rgcl_g"])
def test_global_tau_epoch0_is_exact_objective_gradient(mode):
    """gamma = 1 in epoch 0, so u = g and the FCCO gradient is the objective's exact gradient."""
    x, y = pairs(8)
    s = leaf(torch.tensor(10.0, dtype=torch.float64))
    rho = 0.0 if mode == "gcl" else 6.5
    loss = make(mode, rho=rho)(x, y, s, torch.arange(8) * 3)
    ref = gcl_objective_ref(x, y, 1.0 / s, 1.0 / s, 1e-14, rho)
    assert_rel_close("loss", loss, ref, RTOL)
    inputs = [x, y, s] if mode == "rgcl_g" else [x, y]
    for name, got, want in zip("xys"[: len(inputs)], grads(loss, inputs), grads(ref, inputs), strict=True):
        assert_rel_close(f"d{name}", got, want, RTOL)


@pytest.mark.parametrize("convention", ["exact", "reference"])
def test_gcl_g_is_fast_clip_v0_objective_and_gradient(convention):
    """gcl_g (fast_clip's global_learnable without multiply_tau): 1/n sum_j 1/2 sum_m log(eps + g_mj),
    no tau factor, s learnable. Epoch 0 (u = g): loss and x, y, s gradients exactly the dense ones; the
    model gradient has weight 1 in both conventions (gcl's exact one carries tau)."""
    x, y = pairs(8)
    s = leaf(torch.tensor(10.0, dtype=torch.float64))
    loss = make("gcl_g", convention=convention)(x, y, s, torch.arange(8) * 3)
    g1, g2 = gcl_g_ref(x, y, s, s)
    ref = 0.5 * (torch.log(1e-14 + g1) + torch.log(1e-14 + g2)).mean()
    assert_rel_close("loss", loss, ref, RTOL)
    for name, got, want in zip("xys", grads(loss, [x, y, s]), grads(ref, [x, y, s]), strict=True):
        assert_rel_close(f"d{name}", got, want, RTOL)


def test_rgcl_epoch0_model_gradient_and_tau_step():
    x, y = pairs(8)
    idx = torch.arange(8) + 5
    fn = make("rgcl", rho=7.0, tau_init=0.05, lr_tau=0.01)
    tau0 = fn.state.tau[:, idx].clone()
    loss = fn(x, y, None, idx)
    t1, t2 = (leaf(t) for t in tau0)
    ref = gcl_objective_ref(x, y, t1, t2, 1e-14, 7.0, per_sample=True)
    assert_rel_close("loss", loss, ref, RTOL)
    dx, dy, dt1, dt2 = grads(ref, [x, y, t1, t2])
    for name, got, want in zip("xy", grads(loss, [x, y]), [dx, dy], strict=True):
        assert_rel_close(f"d{name}", got, want, RTOL)
    # Per-sample tau gradient: d/dtau_i of tau_i (log(eps + g_i) + rho), i.e. n * 2 x the mean's.
    # Epoch 0: betas 0, bias correction 1, so the Adam step is lr * grad / (|grad| + eps).
    d_tau = torch.stack([dt1, dt2]) * 8 * 2
    d_tau = d_tau.clamp(-5, 5)
    want = (tau0 - 0.01 * d_tau / (d_tau.abs() + 1e-8)).clamp(0.01, 1.0)
    assert_rel_close("tau after one step", fn.state.tau[:, idx], want, RTOL)


def _simulate(mode, steps, batches, gamma_epochs, convention="exact"):
    """Run FastCLIPLoss and a dense simulation of u side by side; check every step's gradient."""
    fn = make(mode, gamma_min=0.3, gamma_decay_epochs=3, convention=convention, rho=2.0)
    u = torch.zeros(2, N_DATA, dtype=torch.float64)
    s = leaf(torch.tensor(8.0, dtype=torch.float64))
    for step in range(steps):
        fn.set_epoch(gamma_epochs[step])
        x, y = pairs(len(batches[step]), seed=step)
        idx = torch.tensor(batches[step])
        loss = fn(x, y, s, idx)
        g1, g2 = gcl_g_ref(x.detach(), y.detach(), s.detach(), s.detach())
        u[0, idx] = u_update_ref(u[0, idx], g1, fn.gamma)
        u[1, idx] = u_update_ref(u[1, idx], g2, fn.gamma)
        w = 1.0 / s.detach() if convention == "exact" or mode == "rgcl_g" else 1.0
        ref = fcco_surrogate_ref(x, y, 1 / s.detach(), 1 / s.detach(), u[0, idx], u[1, idx], 1e-14, w, w)
        for name, got, want in zip("xy", grads(loss, [x, y]), grads(ref, [x, y]), strict=True):
            assert_rel_close(f"step {step} d{name}", got, want, RTOL)
    seen = sorted({i for batch in batches[:steps] for i in batch})
    assert_rel_close("u state", fn.state.log_u[:, seen].exp(), u[:, seen], RTOL)
    assert torch.isinf(fn.state.log_u[:, [i for i in range(N_DATA) if i not in seen]]).all()


@pytest.mark.parametrize("mode", ["gcl", "rgcl_g"])
@pytest.mark.parametrize("convention", ["exact", "reference"])
def test_u_state_and_fcco_gradient_over_epochs(mode, convention):
    batches = [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [3, 1, 9, 7, 12, 0], [11, 2, 5, 13, 4, 8]]
    _simulate(mode, 4, batches, [0, 0, 1, 2], convention)


@pytest.mark.parametrize("convention", ["exact", "reference"])
def test_rgcl_g_temperature_gradient_formula(convention):
    """dF/dtau = mean 1/2 sum log u~ + rho + kappa tau dPhi/dtau, u fixed after the update (kappa 1
    exact, 2 reference with log u); fast_clip's code double-counts the tau term (math over source)."""
    fn = make("rgcl_g", gamma_min=0.5, gamma_decay_epochs=2, convention=convention, rho=3.0)
    s0 = torch.tensor(9.0, dtype=torch.float64)
    x, y = pairs(7, seed=1)
    fn(x, y, s0, torch.arange(7))  # epoch 0 sets u = g
    fn.set_epoch(1)
    x, y = pairs(7, seed=2)
    s = leaf(s0)
    loss = fn(x, y, s, torch.arange(7))
    (got,) = grads(loss, [s])
    u = fn.state.log_u[:, :7].exp()
    tau = leaf(1.0 / s0)
    g1, g2 = gcl_g_ref(x.detach(), y.detach(), 1 / tau, 1 / tau)
    phi = 0.5 * (g1 / (1e-14 + u[0]) + g2 / (1e-14 + u[1])).mean()
    (dphi_dtau,) = torch.autograd.grad(phi, tau)
    log_term = torch.log(u + (1e-14 if convention == "exact" else 0.0))
    kappa = 1.0 if convention == "exact" else 2.0
    dF_dtau = 0.5 * log_term.sum(0).mean() + 3.0 + kappa * tau.detach() * dphi_dtau
    assert_rel_close("dL/ds", got, -(tau.detach() ** 2) * dF_dtau, RTOL)


def _stable_gcl_objective(x, y, s):
    """tau mean 1/2 (log g1 + log g2) via logsumexp (eps = 0): finite where exp(s d) is not."""
    n = x.shape[0]
    sim = s * (x @ y.T)
    off = torch.eye(n, dtype=torch.bool)
    diag = sim.diagonal()
    lg1 = torch.logsumexp(sim.masked_fill(off, -math.inf), 1) - diag
    lg2 = torch.logsumexp(sim.T.masked_fill(off, -math.inf), 1) - diag
    return 0.5 * (lg1 + lg2).mean() / s - math.log(n - 1) / s


@pytest.mark.parametrize("mode", ["gcl", "rgcl_g"])
def test_no_overflow_at_scale_100_with_adversarial_pairs(mode):
    """s = 100, y = -x, |x| = 3: s (P_ij - P_ii) reaches 1800; fast_clip's exp would overflow."""
    x, _ = pairs(6)
    x = leaf(3 * x.detach())
    y = leaf(-x.detach())
    s = leaf(torch.tensor(100.0, dtype=torch.float64))
    fn = make(mode, eps=0.0)
    loss = fn(x, y, s, torch.arange(6))
    dense = gcl_g_ref(x.detach(), y.detach(), 100.0, 100.0)
    assert not torch.isfinite(dense[0]).all(), "the naive reference should overflow here"
    ref = _stable_gcl_objective(x, y, s)
    assert_rel_close("loss", loss, ref, RTOL)
    for name, got, want in zip("xy", grads(loss, [x, y]), grads(ref, [x, y]), strict=True):
        assert_rel_close(f"d{name}", got, want, RTOL)
    assert torch.isfinite(fn.state.log_u[:, :6]).all() and fn.state.log_u[:, :6].max() > 88.7


def _call(fn, b=4, **kw):
    x, y = pairs(b)
    args = dict(logit_scale=torch.tensor(10.0, dtype=torch.float64), indices=torch.arange(b)) | kw
    return fn(x, y, **args)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(indices=torch.tensor([0, 1, 2, 40])), ValueError, "indices must be global sample indices in"),
        (dict(indices=torch.tensor([0, -1, 2, 3])), ValueError, "indices must be global sample indices in"),
        (dict(indices=torch.tensor([0, 1, 1, 3])), ValueError, "duplicate"),
        (dict(indices=torch.tensor([0.0, 1.0, 2.0, 3.0])), TypeError, "int64"),
        (dict(indices=torch.arange(5)), ValueError, r"shape \(4,\)"),
        (dict(indices=[0, 1, 2, 3]), TypeError, "indices must be a torch.Tensor"),
        (dict(indices=None), ValueError, "needs indices"),
        (dict(logit_scale=None), ValueError, "needs logit_scale"),
        (dict(logit_scale=torch.tensor(math.inf)), ValueError, "logit_scale must be finite"),
        (dict(logit_scale=torch.tensor(-5.0, dtype=torch.float64)), ValueError, "logit_scale must be > 0"),
        (dict(logit_scale=0.0), ValueError, "logit_scale must be > 0"),
    ],
)
def test_bad_input_names_the_argument_and_leaves_state_alone(kwargs, error, match):
    fn = make("rgcl_g")
    _call(fn)
    before = fn.state.log_u.clone()
    with pytest.raises(error, match=match):
        _call(fn, **kwargs)
    assert torch.equal(fn.state.log_u, before)


@pytest.mark.parametrize("mode", ["gcl", "rgcl"])
@pytest.mark.parametrize(
    "indices, match",
    [
        ([0, 1, 2, 40], r"indices \(global batch\) must be global sample indices in \[0, 40\)"),
        ([0, -1, 2, 3], r"indices \(global batch\) must be global sample indices in \[0, 40\)"),
        ([0, 1, 3, 1], r"indices \(global batch\) has duplicate sample indices"),
    ],
    ids=["past-end", "negative", "duplicate"],
)
def test_bad_indices_fail_on_device_without_host_checks(monkeypatch, mode, indices, match):
    """As on CUDA (indices never read on the host): torch._assert_async, raised at once on CPU. Without
    it a duplicate is silently wrong on CUDA (gcl: one dx row off, a u row never written; rgcl: NaN)."""
    monkeypatch.setattr(validation, "index_checks_enabled", lambda t: False)
    fn = make(mode)
    _call(fn, logit_scale=None if mode == "rgcl" else torch.tensor(10.0, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=match):
        _call(fn, indices=torch.tensor(indices), **({"logit_scale": None} if mode == "rgcl" else {}))


def test_bad_construction_and_mode_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        FastCLIPLoss(10, "sogclr")
    with pytest.raises(ValueError, match="convention must be one of"):
        FastCLIPLoss(10, "gcl", convention="paper")
    with pytest.raises(ValueError, match="needs data_size"):
        FastCLIPLoss(mode="gcl")
    with pytest.raises(ValueError, match="rank in"):
        FastCLIPLoss(10, "gcl", rank=2, world_size=2)
    with pytest.raises(ValueError, match="pass logit_scale=None"):
        _call(make("rgcl"))
    with pytest.raises(ValueError, match="at least 2 pairs"):
        _call(make("gcl"), b=1)
    with pytest.raises(ValueError, match="epoch"):
        make("gcl").set_epoch(-1)
    with pytest.raises(ValueError, match="loss_fn.to"):
        _call(make("gcl", device="meta"))
    with pytest.raises(ValueError, match="tau_min <= tau_init"):
        make("rgcl", tau_init=2.0)
    with pytest.raises(ValueError, match="needs an initialized torch.distributed"):
        _call(FastCLIPLoss(N_DATA, "gcl", rank=0, world_size=2))


def test_eval_mode_leaves_state_unchanged():
    fn = make("rgcl")
    before = {k: v.clone() for k, v in fn.state.state_dict().items() if torch.is_tensor(v)}
    fn.eval()
    with torch.no_grad():
        loss = _call(fn, logit_scale=None)
    assert torch.isfinite(loss)
    for k, v in before.items():
        assert torch.equal(fn.state.state_dict()[k], v), k


@pytest.mark.parametrize("mode", ["clip", "gcl", "rgcl", "rgcl_g"])
def test_triton_backend_matches_chunked(mode):
    """Tile kernels + fused state update (interpreter on CPU) vs the chunked fp64 path, 2 steps."""
    from conftest import triton_device

    dev = triton_device()
    fns = {
        "triton": FastCLIPLoss(N_DATA, mode, backend="triton", gamma_min=0.5, rho=2.0, device=dev),
        "chunked": make(mode, gamma_min=0.5, rho=2.0),
    }
    for epoch in (0, 1):
        x, y = pairs(12, seed=epoch)
        out = {}
        for name, fn in fns.items():
            fn.set_epoch(epoch)
            dtype, device = (torch.float32, dev) if name == "triton" else (torch.float64, "cpu")
            xx, yy = leaf(x, dtype).to(device), leaf(y, dtype).to(device)
            xx.retain_grad(), yy.retain_grad()
            s = None if mode == "rgcl" else torch.tensor(12.0, dtype=dtype, device=device)
            loss = fn(xx, yy, s, torch.arange(12) + 3 * epoch)
            out[name] = [loss, *torch.autograd.grad(loss, [xx, yy])]
        for what, got, want in zip(("loss", "dx", "dy"), out["triton"], out["chunked"], strict=True):
            assert_rel_close(f"epoch {epoch} {what}", got.cpu(), want, 1e-4)
    if mode != "clip":
        got, want = fns["triton"].state.log_u.cpu(), fns["chunked"].state.log_u
        seen = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), seen) and seen.sum() == 2 * 15
        assert_rel_close("u state", got[seen], want[seen], 1e-5, 1e-5)
