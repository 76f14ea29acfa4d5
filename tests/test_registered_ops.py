"""Every GPU kernel entry point is a registered torch op: ``torch.library.opcheck`` passes for each
(schema, fake implementation, autograd registration, AOT dispatch) on its CPU implementation and,
under TRITON_INTERPRET=1, on its Triton one; and every public function runs on ``meta`` tensors
through the GPU dispatch (``ops.common.is_gpu``), i.e. through the fake implementations."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastclip_kernels import FastCLIPLoss, contrastive_loss, sigmoid_loss
from fastclip_kernels.ops import anchor_grad, anchor_stats, patch_embed, varlen_attention_qkvpacked
from fastclip_kernels.ops.common import interpreting, is_gpu
from fastclip_kernels.ops.state_update import UpdateConfig, state_update
from fastclip_kernels.optim import FusedAdamW, FusedLAMB

ops = torch.ops.fastclip
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU needs TRITON_INTERPRET=1")
BACKENDS = ["chunked", pytest.param("triton", marks=needs_interpreter)]


def _feats(m, d=16, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(m, d, generator=g, dtype=dtype), dim=-1)
    return x.requires_grad_(grad)


def _check(op, *args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cols", [True, False])
def test_opcheck_contrastive_loss(backend, cols):
    a, c = _feats(5, grad=True), _feats(5 if cols else 7, seed=1, grad=True)
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    _check(ops.contrastive_loss_fwd.default, a, c, s, b, 0 if cols else 2, cols, backend)
    _check(ops.contrastive_loss_fwd.default, a, c, s, None, 0 if cols else 2, cols, backend)
    fwd = ops.contrastive_loss_fwd(a, c, s, b, 0 if cols else 2, cols, backend)
    g_rows, g_cols = torch.rand(5), torch.rand(fwd[1].shape[0])
    args = (a.detach(), c.detach(), s.detach(), b.detach(), fwd[2], fwd[3], g_rows, g_cols)
    _check(ops.contrastive_loss_bwd.default, *args, 0 if cols else 2, cols, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_sigmoid_loss(backend):
    a, c = _feats(5, grad=True), _feats(6, seed=1, grad=True)
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
    _check(ops.sigmoid_loss_fwd.default, a, c, s, b, 1, backend)
    _check(
        ops.sigmoid_loss_bwd.default,
        torch.tensor(1.0),
        a.detach(),
        c.detach(),
        s.detach(),
        b.detach(),
        1,
        backend,
    )
    rows = (torch.tensor(1.0), a.detach(), c.detach(), s.detach(), b.detach(), 1, backend)
    _check(ops.sigmoid_loss_rows_bwd.default, *rows)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_anchor_ops(backend):
    a, c = _feats(5), _feats(7, seed=1)
    s = torch.full((5,), 10.0)
    _check(ops.anchor_stats.default, a, c, s, 2, True, backend)
    row = (s, torch.rand(5), torch.rand(5))
    col = (torch.full((7,), 10.0), torch.rand(7) + 5, torch.rand(7))
    _check(ops.anchor_grad.default, a, c, torch.rand(5), *row, *col, 2, True, backend)
    _check(ops.anchor_grad.default, a, c, torch.rand(5), *row, None, None, None, 2, False, backend)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_opcheck_state_update(backend, per_sample):
    n, shard = 6, 5
    g = torch.Generator().manual_seed(0)
    lam, delta, log_u_old = (torch.randn(2, n, generator=g) for _ in range(3))
    tau = torch.full((2, n), 0.07)
    state = [torch.rand(2, shard, generator=g) for _ in range(4)]  # moments >= 0
    if not per_sample:
        state[1:] = [None, None, None]
    cfg = UpdateConfig(gamma=0.8, eps=1e-6, lr_tau=0.01, beta1=0.9, beta2=0.99, step=2)
    args = (torch.tensor([0, 2, 4, 6, 8, 1]), lam, delta, torch.randn(n, generator=g), log_u_old, tau)
    _check(
        ops.state_update.default, *args, *state, 0, 2, 2 * shard, cfg.floats(), cfg.step, False, True, backend
    )


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_varlen_attention(causal):
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    qkv = torch.randn(8, 3, 2, 16, generator=g, requires_grad=True)
    _check(ops.varlen_attention_qkvpacked_fwd.default, qkv, cu, 5, 0.25, causal)
    q, k, v = (torch.randn(8, 2, 16, generator=g, requires_grad=True) for _ in range(3))
    _check(ops.varlen_attention_fwd.default, q, k, v, cu, cu, 5, 5, 0.25, causal)
    o, lse = ops.varlen_attention_fwd(q, k, v, cu, cu, 5, 5, 0.25, causal)
    do = torch.randn_like(o)
    _check(
        ops.varlen_attention_bwd.default,
        do,
        q.detach(),
        k.detach(),
        v.detach(),
        o.detach(),
        lse,
        cu,
        cu,
        5,
        5,
        0.25,
        causal,
    )
    o, lse = ops.varlen_attention_qkvpacked_fwd(qkv, cu, 5, 0.25, causal)
    _check(ops.varlen_attention_qkvpacked_bwd.default, do, qkv.detach(), o.detach(), lse, cu, 5, 0.25, causal)


def _patch_inputs(grad=True):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=g)
    weight, bias = torch.randn(32, 3 * 8 * 8, generator=g) * 0.1, torch.randn(32, generator=g)
    pos, cls = torch.randn(5, 32, generator=g), torch.randn(32, generator=g)
    for t in (weight, bias, pos, cls):
        t.requires_grad_(grad)
    idx = torch.tensor([0, 3, 1, 2, 3])  # 2 patches of image 0, 3 of image 1
    batch = torch.tensor([0, 0, 1, 1, 1], dtype=torch.int32)
    cls_rows = torch.tensor([0, 3])
    return images, weight, bias, pos, cls, idx, batch, cls_rows


@needs_interpreter
def test_opcheck_patch_embed():
    args = _patch_inputs()
    _check(ops.patch_embed_fwd.default, *args, 8)
    images, weight, bias, pos, cls, idx, batch, cls_rows = _patch_inputs(grad=False)
    dout = torch.randn(7, 32)
    _check(ops.patch_embed_bwd.default, dout, images, weight, pos, cls, idx, batch, cls_rows, 8)


def _optim_lists(n=2):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)][:n]
    grads = [torch.randn_like(p) for p in params]
    moments = [[torch.rand_like(p) for p in params] for _ in range(2)]
    steps = [torch.full((), 3.0) for _ in params]
    return params, grads, moments[0], moments[1], [], steps


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_opcheck_optimizer_kernels(backend):
    hp = (torch.tensor(1e-2), 0.0, 0.9, 0.999, 1e-8, 0.01)
    _check(ops.adamw_.default, *_optim_lists(), *hp, None, backend)
    _check(ops.lamb_.default, *_optim_lists(), *hp, torch.tensor(0.5), True, True, True, backend)
    _check(ops.global_grad_norm.default, _optim_lists()[1], backend)


# ---------------------------------------------------------------------------------------------
# meta: the GPU dispatch of every public function, through the fake implementations
# ---------------------------------------------------------------------------------------------


class _OpCalls(TorchDispatchMode):
    """Records (op name, backend argument) of every fastclip op called."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastclip":
            backend = next((a for a in reversed(args) if isinstance(a, str)), None)
            self.calls.append((func.overloadpacket.__name__, backend))
        return func(*args, **(kwargs or {}))


def _meta_leaf(*shape):
    return torch.empty(*shape, device="meta", requires_grad=True)


def test_meta_counts_as_gpu():
    assert is_gpu(torch.empty(1, device="meta")) and not is_gpu(torch.empty(1))


def _on_meta_via_triton(fn, expected):
    with _OpCalls() as rec:
        out = fn()
    names = {name for name, backend in rec.calls}
    assert set(expected) <= names, rec.calls
    assert all(backend in ("triton", None) for _, backend in rec.calls), rec.calls
    return out


def test_meta_losses():
    x, y, s, b = _meta_leaf(8, 16), _meta_leaf(8, 16), _meta_leaf(()), _meta_leaf(())

    def run():
        contrastive_loss(x, y, s, b).backward()
        sigmoid_loss(x, y, s, b).backward()

    _on_meta_via_triton(
        run, ["contrastive_loss_fwd", "contrastive_loss_bwd", "sigmoid_loss_fwd", "sigmoid_loss_bwd"]
    )
    assert x.grad.device.type == "meta" and x.grad.shape == (8, 16) and s.grad.shape == ()


@pytest.mark.parametrize("mode", ["clip", "gcl", "rgcl", "rgcl_g"])
def test_meta_fastclip_loss(mode):
    fn = FastCLIPLoss(40, mode, device="meta", gamma_min=0.5)
    fn.set_epoch(1)
    x, y = _meta_leaf(8, 16), _meta_leaf(8, 16)
    s = None if mode == "rgcl" else torch.empty((), device="meta", requires_grad=mode != "gcl")
    idx = torch.empty(8, dtype=torch.int64, device="meta")
    expected = ["anchor_stats", "anchor_grad"] + ([] if mode == "clip" else ["state_update"])
    _on_meta_via_triton(lambda: fn(x, y, s, idx).backward(), expected)
    assert x.grad.shape == (8, 16) and y.grad.device.type == "meta"


def test_meta_anchor_ops_and_state_update():
    a, c = torch.empty(4, 16, device="meta"), torch.empty(8, 16, device="meta")
    s = torch.empty(4, device="meta")
    lse, mean_dot, pos_dot = _on_meta_via_triton(
        lambda: anchor_stats(a, c, s, label_offset=4), ["anchor_stats"]
    )
    assert lse.shape == (4,) and lse.device.type == "meta"
    grad = anchor_grad(a, c, torch.empty(4, device="meta"), row=(s, s, s), label_offset=4)
    assert grad.shape == (4, 16) and grad.device.type == "meta"
    from fastclip_kernels.fastclip import FastCLIPState

    st = FastCLIPState(20, device="meta", per_sample_tau=True)
    lam = torch.empty(2, 8, device="meta")
    idx = torch.empty(8, dtype=torch.int64, device="meta")
    run = lambda: state_update(st, idx, lam, lam, lam[0], lam, lam, UpdateConfig(gamma=0.5, eps=1e-6))  # noqa: E731
    out = _on_meta_via_triton(run, ["state_update"])
    assert [t.shape for t in out] == [(2, 8)] * 4


def test_meta_attention_and_patch_embed():
    qkv = _meta_leaf(10, 3, 2, 16)
    cu = torch.empty(3, dtype=torch.int32, device="meta")
    out = _on_meta_via_triton(
        lambda: varlen_attention_qkvpacked(qkv, cu, 6), ["varlen_attention_qkvpacked_fwd"]
    )
    _on_meta_via_triton(lambda: out.sum().backward(), ["varlen_attention_qkvpacked_bwd"])
    assert qkv.grad.shape == qkv.shape
    images = torch.empty(2, 3, 16, 16, device="meta")
    w, pos, cls = _meta_leaf(32, 3, 8, 8), _meta_leaf(5, 32), _meta_leaf(32)
    keep = torch.empty(2, 3, dtype=torch.int64, device="meta")
    packed = _on_meta_via_triton(lambda: patch_embed(images, w, None, pos, cls, keep), ["patch_embed_fwd"])
    assert packed.tokens.shape == (8, 32) and packed.max_seqlen == 4
    _on_meta_via_triton(lambda: packed.tokens.sum().backward(), ["patch_embed_bwd"])
    assert w.grad.shape == w.shape and pos.grad.shape == pos.shape


@pytest.mark.parametrize("optimizer", [FusedAdamW, FusedLAMB])
def test_meta_optimizer_step(optimizer):
    params = [
        torch.nn.Parameter(torch.empty(5, 3, device="meta")),
        torch.nn.Parameter(torch.empty(7, device="meta")),
    ]
    for p in params:
        p.grad = torch.empty_like(p)
    opt = optimizer(params, lr=1e-3, max_grad_norm=1.0)
    with _OpCalls() as rec:
        opt.step()
    names = {name for name, _ in rec.calls}
    assert {"global_grad_norm", "adamw_" if optimizer is FusedAdamW else "lamb_"} <= names, rec.calls
    assert all(backend == "triton" for _, backend in rec.calls), rec.calls
