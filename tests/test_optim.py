"""FusedAdamW / FusedLAMB: the reference path against torch.optim.AdamW and hand-derived LAMB steps,
the Triton path against the reference over 20 steps (fp32 within 1e-6 relative), mixed precision
with fp32 masters, clipping, state_dict round trips and bad input."""

import copy

import pytest
import torch
from conftest import triton_device
from helpers import assert_rel_close

from fastclip_kernels.optim import FusedAdamW, FusedLAMB

SHAPES = [(33, 17), (7,), (1,), (130,), (5, 3, 2)]


def _model(dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in SHAPES]


def _grads(params, step, zero_one=False):
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        g = torch.randn(p.shape, generator=gen)
        p.grad = (torch.zeros_like(g) if zero_one and i == 1 else g).to(p.device, p.dtype)


def _groups(params, wd=(0.1, 0.0)):
    return [
        {"params": params[:3], "weight_decay": wd[0]},
        {"params": params[3:], "weight_decay": wd[1], "lr": 3e-3},
    ]


def _run(opt_cls, params, steps=20, **kw):
    opt = opt_cls(_groups(params), lr=1e-2, **kw)
    for step in range(steps):
        _grads(params, step)
        opt.step()
    return opt


def test_reference_adamw_matches_torch_adamw():
    ours, theirs = _model(), _model()
    _run(FusedAdamW, ours, betas=(0.9, 0.98), eps=1e-6, impl="reference")
    opt = torch.optim.AdamW(_groups(theirs), lr=1e-2, betas=(0.9, 0.98), eps=1e-6)
    for step in range(20):
        _grads(theirs, step)
        opt.step()
    for a, b in zip(ours, theirs, strict=True):
        assert_rel_close("param", a, b, 1e-6)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_reference_lamb_first_step_by_hand(bias_correction):
    """Step 1: m = (1-b1) g, v = (1-b2) g^2; with bias correction m_hat = g, v_hat = g^2."""
    w0 = torch.tensor([3.0, -4.0], dtype=torch.float64)
    g = torch.tensor([0.5, 2.0], dtype=torch.float64)
    p = w0.clone().requires_grad_()
    p.grad = g.clone()
    opt = FusedLAMB(
        [p], lr=0.1, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.01, bias_correction=bias_correction
    )
    opt.step()
    m, v = (g, g * g) if bias_correction else (0.1 * g, 0.01 * g * g)
    u = m / (v.sqrt() + 1e-6) + 0.01 * w0
    want = w0 - 0.1 * (w0.norm() / u.norm()) * u
    assert_rel_close("w", p, want, 1e-14)


IMPL_CASES = [
    (FusedAdamW, dict()),
    (FusedAdamW, dict(max_grad_norm=1.0)),
    (FusedLAMB, dict()),
    (FusedLAMB, dict(bias_correction=False, grad_averaging=False, max_grad_norm=2.0)),
    (FusedLAMB, dict(trust_ratio="all")),
    (FusedLAMB, dict(trust_ratio="none")),
]


@pytest.mark.parametrize("opt_cls, kw", IMPL_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_triton_matches_reference_over_20_steps(opt_cls, kw):
    dev = triton_device()
    ref, fused = _model(), _model(device=dev)
    ref_opt = _run(opt_cls, ref, impl="reference", **kw)
    fused_opt = _run(opt_cls, fused, impl="triton", **kw)
    for a, b in zip(fused, ref, strict=True):
        assert_rel_close("param", a.cpu(), b, 1e-6)
    if "max_grad_norm" in kw:
        assert_rel_close("grad norm", fused_opt.last_grad_norm.cpu(), ref_opt.last_grad_norm, 1e-6)
    assert not torch.equal(ref[0], _model()[0]), "the parameters must have moved"


def test_lr_tensor_and_zero_gradient_tensor():
    """A 0-d tensor lr is read on the device; a tensor with zero gradient (LAMB: ||u|| may be
    only wd * ||w||) and a zero weight keep finite trust ratios."""
    dev = triton_device()
    ref, fused = _model(), _model(device=dev)
    with torch.no_grad():
        ref[2].zero_(), fused[2].zero_()
    for params, impl, lr in ((ref, "reference", 1e-2), (fused, "triton", torch.tensor(1e-2, device=dev))):
        opt = FusedLAMB(_groups(params), lr=lr, impl=impl, trust_ratio="all")
        for step in range(5):
            _grads(params, step, zero_one=True)
            opt.step()
    for a, b in zip(fused, ref, strict=True):
        assert torch.isfinite(a).all()
        assert_rel_close("param", a.cpu(), b, 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opt_cls", [FusedAdamW, FusedLAMB])
def test_mixed_precision_master_weights(opt_cls, dtype):
    dev = triton_device()
    ref, fused = _model(dtype), _model(dtype, device=dev)
    ref_opt = _run(opt_cls, ref, impl="reference", master_weights=True)
    fused_opt = _run(opt_cls, fused, impl="triton", master_weights=True)
    for p_ref, p_fused in zip(ref, fused, strict=True):
        m_ref, m_fused = ref_opt.state[p_ref]["master"], fused_opt.state[p_fused]["master"]
        assert m_fused.dtype == torch.float32
        assert_rel_close("master", m_fused.cpu(), m_ref, 1e-6)
        assert torch.equal(p_fused, m_fused.to(dtype)), "params must be the rounded masters"


@pytest.mark.parametrize("opt_cls", [FusedAdamW, FusedLAMB])
def test_state_dict_round_trip(opt_cls):
    params = _model(torch.bfloat16)
    opt = _run(opt_cls, params, steps=5, master_weights=True)
    clone = [p.detach().clone().requires_grad_() for p in params]
    restored = opt_cls(_groups(clone), lr=1e-2, master_weights=True)
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert restored.state[clone[0]]["exp_avg"].dtype == torch.float32, "state must stay fp32 on load"
    assert restored.state[clone[0]]["master"].dtype == torch.float32
    for step in range(5, 10):
        _grads(params, step)
        _grads(clone, step)
        opt.step()
        restored.step()
    for a, b in zip(params, clone, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("opt_cls", [FusedAdamW, FusedLAMB])
def test_load_moves_group_tensors_to_the_params_device(opt_cls):
    """A GPU run saves its temperature group's 0-d tensor lr; the checkpoint loads on the CPU
    (map_location="cpu"). Loading into an optimizer whose params live elsewhere (``meta`` stands in for
    cuda) must move that lr next to the params, or the first step after a resume fails."""
    from fastclip_kernels.fastclip.temperature import GlobalTemperature

    params, temperature = _model(), GlobalTemperature()
    groups = _groups(params) + [temperature.param_group(lr_tau=2e-4)]
    opt = opt_cls(groups, lr=1e-2)
    _grads(params, 0)
    temperature.theta.grad = torch.ones(())
    opt.step()
    saved = copy.deepcopy(opt.state_dict())  # as checkpoint.load gives it: every tensor on the CPU

    meta_params = [p.detach().to("meta").requires_grad_() for p in params]
    meta_temperature = GlobalTemperature().to("meta")
    meta_groups = _groups(meta_params) + [meta_temperature.param_group(lr_tau=2e-4)]
    restored = opt_cls(meta_groups, lr=1e-2)
    restored.load_state_dict(saved)
    lr = restored.param_groups[-1]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.device.type == "meta", f"lr stayed on {lr.device}"
    meta_temperature.step_thresh_(restored.param_groups[-1])  # must not mix devices either
    assert restored.param_groups[-1]["lr"].device.type == "meta"


def test_bad_input():
    p = torch.zeros(3, requires_grad=True)
    for kw, match in [
        (dict(lr=-1.0), "lr must be"),
        (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
        (dict(eps=-1.0), "eps must be"),
        (dict(weight_decay=-0.1), "weight_decay must be"),
        (dict(impl="apex"), "impl must be one of"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            FusedAdamW([p], **kw)
    with pytest.raises(ValueError, match="trust_ratio must be"):
        FusedLAMB([p], trust_ratio="sometimes")
    emb = torch.nn.Embedding(10, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        FusedAdamW(emb.parameters()).step()
    half = torch.zeros(3, dtype=torch.bfloat16, requires_grad=True)
    half.grad = torch.ones_like(half)
    with pytest.raises(TypeError, match="master_weights=True"):
        FusedAdamW([half]).step()
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(2, device="meta", requires_grad=True)
    a.grad, b.grad = torch.ones(2), torch.ones(2, device="meta")
    with pytest.raises(ValueError, match="one device"):
        FusedAdamW([a, b], max_grad_norm=1.0).step()


def test_interpreter_block_bounds_the_program_count(monkeypatch):
    """Under the interpreter (programs run one by one in Python) the block grows with the model, so a
    step launches about INTERPRETER_PROGRAMS programs; test-size tensors still span several chunks; the
    GPU block stays 1024."""
    from fastclip_kernels.ops.optim import triton as opt_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    assert opt_triton._block(cpu, [100, 37]) == 64  # the tests' tensors: several 64-element chunks
    numels = [5_000_000, 1_000_000, 256, 7]  # a tiny CLIP's parameters
    block = opt_triton._block(cpu, numels)
    chunks = sum(-(-n // block) for n in numels)
    assert block & (block - 1) == 0 and chunks <= opt_triton.INTERPRETER_PROGRAMS + len(numels)
    assert opt_triton._block(torch.device("meta"), numels) == 1024
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert opt_triton._block(cpu, numels) == 1024


def test_lamb_per_tensor_norms_fixed_order_without_atomics(monkeypatch):
    """LAMB's per-tensor norms reduce their chunk partials with ``_segment_sum_kernel`` (fixed order,
    bitwise reproducible on CUDA), not ``index_add_`` (atomicAdd on CUDA). Planted bug this catches:
    the index_add_ reduction (it raises here)."""
    from fastclip_kernels.ops.optim import triton as optim_triton

    dev = triton_device()
    # segments of 0, 1 and 300 chunks (> SEGMENT_BLOCK = 256: two strips), and one of 3
    starts = torch.tensor([0, 0, 1, 301, 304], dtype=torch.int64, device=dev)
    gen = torch.Generator().manual_seed(0)
    partial = torch.rand(2, 304, generator=gen).to(dev)
    sums = torch.empty(2, 4, device=dev)
    optim_triton._segment_sum_kernel[(4, 2)](partial, starts, sums, 304, 4, BLOCK=optim_triton.SEGMENT_BLOCK)
    want = torch.stack(
        [partial[:, a:b].double().sum(1) for a, b in zip(starts[:-1], starts[1:], strict=True)], 1
    )
    assert_rel_close("segment sums", sums.cpu().double(), want.cpu(), 1e-6)

    def no_atomics(*args, **kwargs):
        raise AssertionError("index_add_ is an atomicAdd reduction on CUDA: not reproducible")

    monkeypatch.setattr(torch.Tensor, "index_add_", no_atomics)
    ref, fused = _model(), _model(device=dev)
    _run(FusedLAMB, ref, steps=2, impl="reference")
    _run(FusedLAMB, fused, steps=2, impl="triton")
    for a, b in zip(fused, ref, strict=True):
        assert_rel_close("param", a.cpu(), b, 1e-6)
