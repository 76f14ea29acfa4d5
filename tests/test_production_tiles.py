"""The GPU tile configurations, run under the Triton interpreter (issue 13 §1).

Under TRITON_INTERPRET=1 the launchers pick small tiles (``ops.common.small_tiles``), so the tiles a GPU
runs (pairwise / anchor 64x64 with 64-wide D steps and BLOCK_DO <= 128 for tensor-core dots, 32-wide D
steps and BLOCK_DO <= 64 for fp32 without TF32; patch embedding 64 x 128; optimizer and state-update
blocks of 1024) would otherwise never execute on CPU. Here the ``gpu_tiles`` fixture forces them, and
every kernel family runs at shapes that cross each tile boundary: rows and columns not multiples of
BLOCK_M / BLOCK_N, D not a multiple of BLOCK_D and larger than BLOCK_DO (the output-D grid has >= 2
programs), element counts past one 1024 block. fp32 (the interpreter's dots are exact fp32 whatever the
input precision, so "tf32" tiles keep fp32 numerics) against the fp64 naive references.
Varlen attention needs nothing here: the interpreter already runs its GPU tiles (``triton.config``).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close, grads, leaf

import fastclip_kernels.ops.common as common
from fastclip_kernels.fastclip import FastCLIPState
from fastclip_kernels.ops.anchor import anchor_grad, anchor_stats
from fastclip_kernels.ops.anchor import triton as anchor_triton
from fastclip_kernels.ops.anchor.naive import anchor_grad_ref, anchor_stats_ref
from fastclip_kernels.ops.common import pairwise
from fastclip_kernels.ops.contrastive_loss import contrastive_loss
from fastclip_kernels.ops.contrastive_loss.naive import contrastive_loss_local_ref, contrastive_loss_ref
from fastclip_kernels.ops.optim import triton as optim_triton
from fastclip_kernels.ops.patch_embed import patch_embed
from fastclip_kernels.ops.patch_embed import triton as patch_triton
from fastclip_kernels.ops.sigmoid_loss import sigmoid_loss_sum
from fastclip_kernels.ops.sigmoid_loss.naive import sigmoid_loss_ref
from fastclip_kernels.ops.state_update import UpdateConfig, state_update
from fastclip_kernels.optim import FusedAdamW, FusedLAMB

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter only: with CUDA every kernel test runs these tiles"
)

B, N, D, OFFSET = 70, 130, 136, 37  # local rows, gathered columns, feature dim, positives' offset
RTOL = 2e-5  # fp32 kernels against fp64, relative to the largest reference value
# (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DO) that pairwise.blocks gives a GPU at D = 136
PAIRWISE_TILES = {"tf32": (64, 64, 64, 128), "ieee": (64, 64, 32, 64)}


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The launchers take their GPU tiles / blocks under the interpreter for this test."""
    monkeypatch.setattr(common, "_GPU_TILES_UNDER_INTERPRETER", True)


@pytest.fixture(params=list(PAIRWISE_TILES))
def precision(request, gpu_tiles, monkeypatch):
    """fp32 dots as "tf32" (tensor-core tiles) or "ieee" (FMA tiles, PyTorch's default)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", request.param == "tf32")
    a = torch.empty(B, D)
    cfg, _, got = pairwise.launch_config(a, torch.ones(()), None)
    tiles = tuple(cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DO"))
    assert got == request.param and tiles == PAIRWISE_TILES[request.param]
    assert anchor_triton._config(a) == (cfg, got)
    block_m, block_n, block_d, block_do = tiles
    assert B % block_m and N % block_n and D % block_d and D > block_do, "the shape must cross every tile"
    return request.param


def _pairs(n, d=D):
    """Unit image/text rows [n, D], row i of each correlated with row i of the other (the positives)."""
    x = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)
    y = F.normalize(x + 0.7 * torch.randn(n, d, dtype=torch.float64), dim=-1)
    return x, y


def _check_grads(got, want, names):
    """atol: CLIP's dbias is 0 (the bias cancels in cross-entropy), so fp32 leaves only rounding."""
    for name, g, w in zip(names, got, want, strict=False):
        if w is not None:
            assert_rel_close(name, g, w, RTOL, atol=1e-6)


@pytest.mark.parametrize("bias", [None, -2.5], ids=["no-bias", "bias"])
def test_contrastive_single_process(precision, bias):
    """Row and column cross-entropy forwards, the LSE backward with both terms (dx, dy, ds, dbias)."""
    x, y = _pairs(N)
    scale = torch.tensor(14.0, dtype=torch.float64)
    p64 = [leaf(x), leaf(y), leaf(scale)] + ([leaf(torch.tensor(bias, dtype=torch.float64))] if bias else [])
    p32 = [leaf(t, torch.float32) for t in p64]
    loss = contrastive_loss(*p32, backend="triton")
    ref = contrastive_loss_ref(*p64)
    assert_rel_close("loss", loss, ref, RTOL)
    _check_grads(grads(loss, p32), grads(ref, p64), ("dx", "dy", "dscale", "dbias"))


@pytest.mark.parametrize("bias", [None, 1.5], ids=["no-bias", "bias"])
def test_contrastive_local_loss(precision, bias):
    """b = 70 local rows against N = 130 gathered columns, positives at 37 + i (row term only)."""
    all_x, all_y = _pairs(N)
    x, y = all_x[OFFSET : OFFSET + B], all_y[OFFSET : OFFSET + B]
    scale = torch.tensor(9.0, dtype=torch.float64)
    p64 = [leaf(t) for t in (x, y, all_x, all_y, scale)]
    b64 = leaf(torch.tensor(bias, dtype=torch.float64)) if bias else None
    p32 = [leaf(t, torch.float32) for t in p64]
    b32 = leaf(b64, torch.float32) if bias else None
    loss = contrastive_loss(
        p32[0], p32[1], p32[4], b32, all_image_features=p32[2], all_text_features=p32[3],
        label_offset=OFFSET, backend="triton",
    )  # fmt: skip
    ref = contrastive_loss_local_ref(*p64[:4], p64[4], OFFSET, b64)
    assert_rel_close("loss", loss, ref, RTOL)
    names = ("dx", "dy", "dall_x", "dall_y", "dscale", "dbias")
    _check_grads(grads(loss, p32 + [b32]), grads(ref, p64 + [b64]), names)


@pytest.mark.parametrize("b,offset", [(N, 0), (B, OFFSET)], ids=["square", "local"])
def test_sigmoid_loss(precision, b, offset):
    """The sigmoid sum forward and the LOSS_SIGMOID backward (rows and columns, ds, dbias)."""
    all_x, all_y = _pairs(N)
    p64 = [leaf(all_x[offset : offset + b]), leaf(all_y)]
    p64 += [leaf(torch.tensor(10.0, dtype=torch.float64)), leaf(torch.tensor(-10.0, dtype=torch.float64))]
    p32 = [leaf(t, torch.float32) for t in p64]
    total = sigmoid_loss_sum(*p32, label_offset=offset, backend="triton")
    ref = sigmoid_loss_ref(*p64, label_offset=offset) * b
    assert_rel_close("loss", total, ref, RTOL)
    _check_grads(grads(total, p32), grads(ref, p64), ("dx", "dy", "dscale", "dbias"))


@pytest.mark.parametrize("exclude_positive", [True, False], ids=["excl", "incl"])
def test_anchor_stats_and_grad(precision, exclude_positive):
    """FastCLIP's per-anchor statistics and W @ C with the row and column terms (stride-0 row scale)."""
    a, _ = _pairs(B)
    c, _ = _pairs(N)
    c[OFFSET : OFFSET + B] = F.normalize(c[OFFSET : OFFSET + B] + a, dim=-1)
    row_scale = torch.tensor(14.3, dtype=torch.float64).expand(B)
    kw = dict(label_offset=OFFSET, exclude_positive=exclude_positive)
    got = anchor_stats(a.float(), c.float(), row_scale.float(), backend="triton", **kw)
    want = anchor_stats_ref(a, c, row_scale, **kw)
    for name, g, w in zip(("lse", "mean_dot", "pos_dot"), got, want, strict=True):
        assert_rel_close(name, g, w, RTOL)
    lse = want[0]
    row = (row_scale, lse, torch.rand(B, dtype=torch.float64) / B)
    col = (
        10.0 + 10.0 * torch.rand(N, dtype=torch.float64),
        lse.mean().expand(N),
        torch.rand(N, dtype=torch.float64) / N,
    )
    pos_coef = -torch.rand(B, dtype=torch.float64)
    for name, terms in {"row+col": (row, col), "row": (row, None), "col": (None, col)}.items():
        f32 = [None if t is None else tuple(v.float() for v in t) for t in terms]
        out = anchor_grad(
            a.float(), c.float(), pos_coef.float(), row=f32[0], col=f32[1], backend="triton", **kw
        )
        ref = anchor_grad_ref(a, c, pos_coef, *terms, **kw)
        assert_rel_close(f"grad_a ({name})", out, ref, RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_patch_embed(gpu_tiles, dtype):
    """64-token x 128-feature tiles (K steps of 16 for fp32, 32 for fp16): 5 images of 4x4 patches of 7
    pixels (80 tokens, sequences straddling token blocks; patch rows padded 7 -> 8), D = 136."""
    cfg = patch_triton.blocks(dtype, common.small_tiles())
    assert (cfg["BLOCK_T"], cfg["BLOCK_D"], cfg["BLOCK_K"]) == (64, 128, 16 if dtype == torch.float32 else 32)
    c, p, grid = 3, 7, 4
    images = torch.randn(5, c, p * grid, p * grid, dtype=torch.float64)
    shapes = [(D, c, p, p), (D,), (1 + grid * grid, D), (D,)]
    p64 = [leaf(torch.randn(s, dtype=torch.float64) * (0.05 if len(s) == 4 else 1)) for s in shapes]
    p_low = [leaf(t, dtype) for t in p64]
    out = patch_embed(images.to(dtype), *p_low, None, backend="triton")
    ref = patch_embed(images, *p64, None, backend="reference")
    rtol = RTOL if dtype == torch.float32 else 2e-3
    assert out.tokens.shape == (5 * 17, D)
    assert_rel_close("tokens", out.tokens, ref.tokens, rtol)
    g = torch.randn_like(ref.tokens)
    got = grads((out.tokens * g.to(dtype)).sum(), p_low)
    want = grads((ref.tokens * g).sum(), p64)
    for name, a, b in zip(("dweight", "dbias", "dpos", "dcls"), got, want, strict=True):
        assert_rel_close(name, a, b, rtol * 10)


OPTIM_SHAPES = [(1500,), (37, 41), (7,), (1024,)]  # 2, 2, 1, 1 blocks of 1024: partial and exact ones


@pytest.mark.parametrize(
    "opt_cls,kw",
    [(FusedAdamW, dict(max_grad_norm=1.0)), (FusedLAMB, dict(max_grad_norm=2.0))],
    ids=["adamw", "lamb"],
)
def test_optimizers(gpu_tiles, opt_cls, kw):
    """1024-element chunks (tensors of 1 and 2 chunks, partial last chunks) over 3 steps, grad norm too."""
    assert optim_triton._block(torch.device("cpu"), [s[0] for s in OPTIM_SHAPES]) == 1024
    ref = [torch.randn(s, dtype=torch.float32).requires_grad_() for s in OPTIM_SHAPES]
    fused = [leaf(p) for p in ref]
    opts = [
        opt_cls(ps, lr=1e-2, weight_decay=0.1, impl=impl, **kw)
        for ps, impl in ((ref, "reference"), (fused, "triton"))
    ]
    for _ in range(3):
        for p, q in zip(ref, fused, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        for opt in opts:
            opt.step()
    for i, (p, q) in enumerate(zip(ref, fused, strict=True)):
        assert_rel_close(f"param {i}", q, p, 1e-6)
    assert_rel_close("grad norm", opts[1].last_grad_norm, opts[0].last_grad_norm, 1e-6)


@pytest.mark.parametrize("per_sample", [False, True], ids=["global-tau", "per-sample-tau"])
def test_state_update(gpu_tiles, per_sample):
    """n = 1100 global anchors: two 1024 blocks, the second partial; rank 1 of 3 owns a third."""
    n, data_size = 1100, 3300
    st = FastCLIPState(data_size, rank=1, world_size=3, per_sample_tau=per_sample)
    st.log_u.normal_()
    if per_sample:
        st.tau.uniform_(0.02, 0.5)
        st.exp_avg.normal_()
        st.exp_avg_sq.uniform_(0, 1)
    st_fused = copy.deepcopy(st)
    idx = torch.randperm(data_size)[:n]
    lam, delta = torch.randn(2, n) * 3 + 2, -torch.rand(2, n)
    pos, log_u_old = torch.randn(n), torch.randn(2, n)
    tau = torch.rand(2, n) * 0.3 + 0.02 if per_sample else torch.tensor(0.07).expand(2, n)
    cfg = UpdateConfig(gamma=0.4, eps=1e-6, rho=2.0, lr_tau=0.01, beta1=0.9, beta2=0.99, step=3)
    want = state_update(st, idx, lam, delta, pos, log_u_old, tau, cfg, backend="reference")
    got = state_update(st_fused, idx, lam, delta, pos, log_u_old, tau, cfg, backend="triton")
    for name, g, w in zip(("shift", "ratio", "log_ut", "log_u_new"), got, want, strict=True):
        assert_rel_close(name, g, w, 1e-5)
    for name in ("log_u", "tau", "exp_avg", "exp_avg_sq") if per_sample else ("log_u",):
        assert_rel_close(name, getattr(st_fused, name), getattr(st, name), 1e-5)
    owned, _ = st.owned_slots(idx)
    assert owned.sum() > 300
