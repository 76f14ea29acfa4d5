"""The FastCLIP state update op (``fastclip_kernels.ops.state_update``): the fused Triton kernel
against the PyTorch spec (``naive.state_update_ref``), the textbook u update, and that only the
owned state entries (and no out-of-range index) are ever written."""

import copy
import math

import pytest
import torch
from conftest import triton_device
from helpers import assert_rel_close

import fastclip_kernels._validation as validation
import fastclip_kernels.ops.state_update as state_update_module
from fastclip_kernels.fastclip import FastCLIPState
from fastclip_kernels.ops.state_update import UpdateConfig, state_update
from fastclip_kernels.ops.state_update.naive import log_u_update, u_update_ref


def _random_state(per_sample, rank=1, world_size=3, data_size=50, device="cpu"):
    st = FastCLIPState(data_size, rank=rank, world_size=world_size, per_sample_tau=per_sample, device=device)
    st.log_u.normal_()
    st.log_u[0, 3], st.log_u[1, 5], st.log_u[0, 7] = math.nan, -math.inf, -100.0  # all reset by gamma < 1
    if per_sample:
        st.tau.uniform_(0.02, 0.5)
        st.exp_avg.normal_()
        st.exp_avg_sq.uniform_(0, 1)
    return st


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("gamma", [1.0, 0.4])
@pytest.mark.parametrize("reference", [False, True])
def test_fused_update_matches_torch(per_sample, gamma, reference):
    device = triton_device()
    st = _random_state(per_sample, device=device)
    st_fused = copy.deepcopy(st)
    n = 21
    idx = torch.randperm(50)[:n].to(device)
    lam = torch.randn(2, n, device=device) * 3 + 2
    delta = -torch.rand(2, n, device=device)
    pos = torch.randn(n, device=device)
    log_u_old = torch.randn(2, n, device=device)
    log_u_old[0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    tau = (
        torch.rand(2, n, device=device) * 0.3 + 0.02
        if per_sample
        else torch.tensor(0.07, device=device).expand(2, n)
    )
    cfg = UpdateConfig(
        gamma=gamma, eps=1e-6, rho=2.0, reference=reference, lr_tau=0.01, beta1=0.9, beta2=0.99, step=3
    )
    before = st.log_u.clone()
    want = state_update(st, idx, lam, delta, pos, log_u_old, tau, cfg, backend="reference")
    got = state_update(st_fused, idx, lam, delta, pos, log_u_old, tau, cfg, backend="triton")
    for name, g, w in zip(("shift", "ratio", "log_ut", "log_u_new"), got, want, strict=True):
        assert torch.isfinite(g).all(), name
        assert_rel_close(name, g, w, 1e-5)
    for name in ("log_u", "tau", "exp_avg", "exp_avg_sq") if per_sample else ("log_u",):
        a, b = getattr(st_fused, name), getattr(st, name)
        assert torch.equal(a.isnan(), b.isnan()), name
        assert_rel_close(name, a.nan_to_num(), b.nan_to_num(), 1e-5)
    owned, slot = st.owned_slots(idx)
    same = (st_fused.log_u == before) | (st_fused.log_u.isnan() & before.isnan())  # NaN != NaN
    changed = (~same).any(0)
    assert changed[slot[owned]].all() and changed.sum() == owned.sum(), "must write exactly the owned entries"


def test_update_writes_only_owned_entries():
    st = FastCLIPState(30, rank=2, world_size=4)
    idx = torch.tensor([2, 6, 7, 10, 13, 29])  # owned by rank 2: 2, 6, 10
    lam = torch.zeros(2, 6)
    state_update(st, idx, lam, lam, lam[0], lam, torch.ones(2, 6), UpdateConfig(gamma=1.0, eps=0.0))
    written = torch.isfinite(st.log_u[0]).nonzero().flatten().tolist()
    assert written == [0, 1, 2]  # slots idx // 4 of 2, 6, 10


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_out_of_range_indices_are_never_written(backend, monkeypatch):
    """With the op's index checks off, bad indices must still not write anywhere (the kernel's mask)."""
    monkeypatch.setattr(state_update_module, "check_global_indices", lambda *args: None)
    dev = triton_device() if backend == "triton" else "cpu"
    st = FastCLIPState(10, rank=0, world_size=1, device=dev)
    idx = torch.tensor([3, 13, -2, 25], device=dev)  # 13 would alias (text, 3); 25 is past the buffer
    lam = torch.zeros(2, 4, device=dev)
    tau = torch.ones(2, 4, device=dev)
    cfg = UpdateConfig(gamma=1.0, eps=0.0)
    state_update(st, idx, lam, lam, lam[0], lam, tau, cfg, backend=backend)
    assert torch.isfinite(st.log_u).nonzero().tolist() == [[0, 3], [1, 3]]


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_log_domain_update_is_the_textbook_u_update(gamma):
    """exp(log_u_update) == u_update_ref (fast_clip's rule, reset of tiny / inf / NaN u) in fp64."""
    g = torch.rand(2, 9, dtype=torch.float64) + 0.1
    u_old = torch.rand(2, 9, dtype=torch.float64) + 0.1
    u_old[0, :3] = torch.tensor([math.nan, math.inf, 1e-40], dtype=torch.float64)
    n = 9
    lam = torch.log(g * (n - 1))
    _, log_u_new = log_u_update(lam, torch.log(u_old), gamma, n)
    assert_rel_close("u", log_u_new.exp(), u_update_ref(u_old, g, gamma), 1e-12)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("reference", [False, True])
def test_per_sample_tau_gradient_takes_log_u_plus_eps(backend, reference):
    """grad_tau = log(u + eps) + rho - ratio delta / tau in both conventions, as fast_clip's v2 code
    (``FastCLIPLossIndividual``: log(u e^-b + eps) + b). Planted bug this catches: log u (no eps) in
    the reference convention, which differs by log(1 + eps / u) = 6.9 here (u = 1e-9, eps = 1e-6)."""
    device = triton_device() if backend == "triton" else "cpu"
    st = FastCLIPState(8, per_sample_tau=True, device=device)
    n, tau, rho, beta1 = 4, 0.05, 16.0, 0.5
    idx = torch.arange(n, device=device)
    log_u = math.log(1e-9)
    lam = torch.full((2, n), log_u + math.log(n - 1), device=device)  # gamma = 1: u = g = 1e-9
    zeros = torch.zeros(2, n, device=device)
    cfg = UpdateConfig(gamma=1.0, eps=1e-6, rho=rho, reference=reference, lr_tau=0.01, beta1=beta1, beta2=0.9)
    state_update(st, idx, lam, zeros, zeros[0], zeros, torch.full((2, n), tau, device=device), cfg, backend)
    grad = st.exp_avg[:, :n] / (1 - beta1)  # epoch-0 moments start at 0
    want = math.log(1e-9 + 1e-6) + rho  # delta = 0: no ratio term
    assert_rel_close("grad_tau", grad.double(), torch.full_like(grad, want, dtype=torch.float64), 1e-5)


def test_fast_clip_running_bound_difference_is_bounded():
    """What our state cannot express: fast_clip's v2 log term is log(u e^-b + eps) + b = log(u + eps e^b),
    b >= 0 its per-sample running max of s (P_jk - P_jj); ours is log(u + eps). Equal while b = 0; else
    they differ by log(1 + eps (e^b - 1) / (u + eps)), which matters only where u e^-b nears eps. With
    fast_clip's eps = 1e-14 and b = 13 (tau = 0.07, a negative 0.9 above the positive): 4e-9 at u = 1,
    4e-6 at u = 1e-3; at b = 30 and u = 1e-12 it is 25 (fast_clip's bound-scaled eps dominates)."""
    eps = 1e-14
    u = torch.tensor([1e-8, 1.0, 1e-3, 1e-12], dtype=torch.float64)
    b = torch.tensor([0.0, 13.0, 13.0, 30.0], dtype=torch.float64)
    ours = torch.log(u + eps)
    fast_clip = torch.log(u * torch.exp(-b) + eps) + b
    diff = fast_clip - ours
    assert torch.allclose(diff, torch.log1p(eps * torch.expm1(b) / (u + eps)), rtol=1e-6, atol=1e-12)
    assert diff[0] == 0.0  # b = 0: identical
    assert (diff[1:3] < 1e-5).all()  # u not tiny: negligible
    assert diff[3] > 1.0  # u e^-b far below eps: fast_clip's bound-scaled eps dominates


BAD_INDICES = {
    "negative": ([3, -2, 5], "in \\[0, 10\\)"),
    "past the state": ([3, 10, 5], "in \\[0, 10\\)"),
    "duplicate": ([3, 5, 3], "duplicate"),
}


def _update_with(idx, backend="reference"):
    st = FastCLIPState(10, rank=0, world_size=1)
    lam = torch.zeros(2, len(idx))
    cfg = UpdateConfig(gamma=1.0, eps=0.0)
    return torch.ops.fastclip.state_update(
        torch.tensor(idx), lam, lam, lam[0], lam, torch.ones(2, len(idx)), st.log_u, None, None, None,
        0, 1, 10, cfg.floats(), 1, False, True, backend,
    )  # fmt: skip


@pytest.mark.parametrize("case", BAD_INDICES)
def test_raw_op_rejects_bad_indices(case):
    """The registered op itself checks its indices (the loss's check does not cover direct callers):
    CPU values on the host, ValueError."""
    idx, match = BAD_INDICES[case]
    with pytest.raises(ValueError, match=match):
        _update_with(idx)


@pytest.mark.parametrize("case", BAD_INDICES)
def test_raw_op_asserts_bad_indices_on_the_device(case, monkeypatch):
    """Without host checks (as for CUDA indices): torch._assert_async, which fails at once on CPU and
    as a device assert on CUDA, with no host sync."""
    monkeypatch.setattr(validation, "host_checks", lambda t, env: False)
    idx, _ = BAD_INDICES[case]
    with pytest.raises(RuntimeError, match="duplicate" if case == "duplicate" else "in \\[0, 10\\)"):
        _update_with(idx)
    _update_with([3, 9, 0])  # good indices pass the same path


def test_raw_op_rejects_bad_index_shapes():
    st, lam = FastCLIPState(10, rank=0, world_size=1), torch.zeros(2, 3)
    buffers = (st.log_u, None, None, None)
    args = (lam, lam, lam[0], lam, torch.ones(2, 3), *buffers, 0, 1, 10, [0.0] * 10, 1, False, True)
    with pytest.raises(TypeError, match="indices must be int64"):
        torch.ops.fastclip.state_update(torch.tensor([0.0, 1.0, 2.0]), *args, "reference")
    with pytest.raises(ValueError, match="indices must be \\[n\\]"):
        torch.ops.fastclip.state_update(torch.tensor([0, 1]), *args, "reference")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_raw_op_device_index_checks_read_nothing_back(backend, monkeypatch):
    """The device path of the op's index checks (as for CUDA indices) reads no value back."""
    from test_no_host_sync import HostReads

    monkeypatch.setattr(validation, "host_checks", lambda t, env: False)
    with HostReads() as reads:
        _update_with([3, 9, 0, 5], backend)
    assert reads.ops == [], reads.ops
