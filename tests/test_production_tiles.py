"""The GPU tile configurations, run under the Triton interpreter (issue 13 §1).

Under TRITON_INTERPRET=1 the launchers pick small tiles (``ops.common.small_tiles``), so the tiles a GPU
runs (pairwise / anchor 64x64 with 64-wide D steps and BLOCK_DO <= 128 for tensor-core dots, 32-wide D
steps and BLOCK_DO <= 64 for fp32 without TF32; patch embedding 64 x 128; optimizer and state-update
blocks of 1024) would otherwise never execute on CPU. Here the ``gpu_tiles`` fixture forces them, and
every kernel family runs at shapes that cross each tile boundary: rows and columns not multiples of
BLOCK_M / BLOCK_N, D not a multiple of BLOCK_D and larger than BLOCK_DO (the output-D grid has >= 2
programs), element counts past one 1024 block. fp32 (the interpreter's dots are exact fp32 whatever the
input precision, so "tf32" tiles keep fp32 numerics) against the fp64 naive references.
Varlen attention already runs its GPU tile table under the interpreter, except the fp32 "tf32" tiles
(the interpreter otherwise always takes "ieee"): those run here.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close, grads, leaf
from test_varlen_attention import SHORT, check_packed

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
from fastclip_kernels.ops.varlen_attention import triton as attention_triton
from fastclip_kernels.optim import FusedAdamW, FusedLAMB

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="interpreter only: with CUDA every kernel test runs these tiles"
)

B, N, D, OFFSET = 70, 130, 136, 37  # local rows, gathered columns, feature dim, positives' offset
# name: (feature dtype, allow_tf32, (BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DO) of pairwise.blocks on a GPU
# at D = 136, rtol vs fp64 relative to the largest reference value). fp16 adds the rescaled-W GEMM;
# its outputs are fp16: ~4.5e-4 relative measured on the gradients (fp32: ~2e-7 on loss and lse).
CONFIGS = {
    "tf32": (torch.float32, True, (64, 64, 64, 128), 2e-5),
    "ieee": (torch.float32, False, (64, 64, 32, 64), 2e-5),
    "fp16": (torch.float16, False, (64, 64, 64, 128), 2e-3),
}


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The launchers take their GPU tiles / blocks under the interpreter for this test."""
    monkeypatch.setattr(common, "_GPU_TILES_UNDER_INTERPRETER", True)


@pytest.fixture(params=list(CONFIGS))
def config(request, gpu_tiles, monkeypatch):
    """(dtype, rtol) of one pairwise / anchor GPU configuration: fp32 dots as "tf32" (tensor-core
    tiles), fp32 as "ieee" (FMA tiles, PyTorch's default), fp16 (tensor-core tiles, W rescaled)."""
    dtype, tf32, want, rtol = CONFIGS[request.param]
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    a = torch.empty(B, D, dtype=dtype)
    cfg, _, precision = pairwise.launch_config(a, torch.ones(()), None)
    tiles = tuple(cfg[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DO"))
    assert precision == ("tf32" if tf32 else "ieee") and tiles == want
    assert anchor_triton._config(a) == (cfg, precision)
    block_m, block_n, block_d, block_do = tiles
    assert B % block_m and N % block_n and D % block_d and D > block_do, "the shape must cross every tile"
    return dtype, rtol


def _pairs(n, dtype, d=D):
    """Unit image/text rows [n, D] in fp64, exact in ``dtype``; row i of each correlated with row i of
    the other (the positives)."""
    x = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)
    y = F.normalize(x + 0.7 * torch.randn(n, d, dtype=torch.float64), dim=-1)
    return x.to(dtype).double(), y.to(dtype).double()


def _check_grads(got, want, names, rtol):
    """atol: CLIP's dbias is 0 (the bias cancels in cross-entropy), so only rounding is left."""
    for name, g, w in zip(names, got, want, strict=False):
        if w is not None:
            assert_rel_close(name, g, w, rtol, atol=1e-6)


@pytest.mark.parametrize("bias", [None, -2.5], ids=["no-bias", "bias"])
def test_contrastive_single_process(config, bias):
    """Row and column cross-entropy forwards, the LSE backward with both terms (dx, dy, ds, dbias)."""
    dtype, rtol = config
    x, y = _pairs(N, dtype)
    scale = torch.tensor(14.0, dtype=torch.float64)
    p64 = [leaf(x), leaf(y), leaf(scale)] + ([leaf(torch.tensor(bias, dtype=torch.float64))] if bias else [])
    p_low = [leaf(t, dtype) for t in p64]
    loss = contrastive_loss(*p_low, backend="triton")
    ref = contrastive_loss_ref(*p64)
    assert_rel_close("loss", loss, ref, rtol)
    _check_grads(grads(loss, p_low), grads(ref, p64), ("dx", "dy", "dscale", "dbias"), rtol)


@pytest.mark.parametrize("bias", [None, 1.5], ids=["no-bias", "bias"])
def test_contrastive_local_loss(config, bias):
    """b = 70 local rows against N = 130 gathered columns, positives at 37 + i (row term only)."""
    dtype, rtol = config
    all_x, all_y = _pairs(N, dtype)
    x, y = all_x[OFFSET : OFFSET + B], all_y[OFFSET : OFFSET + B]
    scale = torch.tensor(9.0, dtype=torch.float64)
    p64 = [leaf(t) for t in (x, y, all_x, all_y, scale)]
    b64 = leaf(torch.tensor(bias, dtype=torch.float64)) if bias else None
    p_low = [leaf(t, dtype) for t in p64]
    b_low = leaf(b64, dtype) if bias else None
    loss = contrastive_loss(
        p_low[0], p_low[1], p_low[4], b_low, all_image_features=p_low[2], all_text_features=p_low[3],
        label_offset=OFFSET, backend="triton",
    )  # fmt: skip
    ref = contrastive_loss_local_ref(*p64[:4], p64[4], OFFSET, b64)
    assert_rel_close("loss", loss, ref, rtol)
    names = ("dx", "dy", "dall_x", "dall_y", "dscale", "dbias")
    _check_grads(grads(loss, p_low + [b_low]), grads(ref, p64 + [b64]), names, rtol)


@pytest.mark.parametrize("b,offset", [(N, 0), (B, OFFSET)], ids=["square", "local"])
def test_sigmoid_loss(config, b, offset):
    """The sigmoid sum forward and the LOSS_SIGMOID backward (rows and columns, ds, dbias)."""
    dtype, rtol = config
    all_x, all_y = _pairs(N, dtype)
    p64 = [leaf(all_x[offset : offset + b]), leaf(all_y)]
    p64 += [leaf(torch.tensor(10.0, dtype=torch.float64)), leaf(torch.tensor(-10.0, dtype=torch.float64))]
    p_low = [leaf(t, dtype) for t in p64]
    total = sigmoid_loss_sum(*p_low, label_offset=offset, backend="triton")
    ref = sigmoid_loss_ref(*p64, label_offset=offset) * b
    assert_rel_close("loss", total, ref, rtol)
    _check_grads(grads(total, p_low), grads(ref, p64), ("dx", "dy", "dscale", "dbias"), rtol)


@pytest.mark.parametrize("exclude_positive", [True, False], ids=["excl", "incl"])
def test_anchor_stats_and_grad(config, exclude_positive):
    """FastCLIP's per-anchor statistics and W @ C with the row and column terms (stride-0 row scale;
    the per-anchor vectors fp32, as FastCLIPLoss passes them)."""
    dtype, rtol = config
    a, _ = _pairs(B, dtype)
    c, _ = _pairs(N, dtype)
    c[OFFSET : OFFSET + B] = F.normalize(c[OFFSET : OFFSET + B] + a, dim=-1).to(dtype).double()
    row_scale = torch.tensor(14.3, dtype=torch.float32).double().expand(B)
    kw = dict(label_offset=OFFSET, exclude_positive=exclude_positive)
    got = anchor_stats(a.to(dtype), c.to(dtype), row_scale.float(), backend="triton", **kw)
    want = anchor_stats_ref(a, c, row_scale, **kw)
    for name, g, w in zip(("lse", "mean_dot", "pos_dot"), got, want, strict=True):
        assert_rel_close(name, g, w, rtol)
    lse = want[0].float().double()
    row = (row_scale, lse, torch.rand(B).double() / B)
    col = (
        10.0 + 10.0 * torch.rand(N).double(),
        lse.mean().float().double().expand(N),
        torch.rand(N).double() / N,
    )
    pos_coef = -torch.rand(B).double()
    for name, terms in {"row+col": (row, col), "row": (row, None), "col": (None, col)}.items():
        f32 = [None if t is None else tuple(v.float() for v in t) for t in terms]
        out = anchor_grad(
            a.to(dtype), c.to(dtype), pos_coef.float(), row=f32[0], col=f32[1], backend="triton", **kw
        )
        ref = anchor_grad_ref(a, c, pos_coef, *terms, **kw)
        assert_rel_close(f"grad_a ({name})", out, ref, rtol)


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
    rtol = 2e-5 if dtype == torch.float32 else 2e-3
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


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", [64, 128])
def test_varlen_attention_tf32_tiles(gpu_tiles, monkeypatch, d, causal):
    """fwd, dK/dV and dQ with the fp32 "tf32" tile table (narrow and wide heads, the causal dK/dV
    entry), lengths 1, 17, 64, 97 crossing every 16/32/64 block; the tolerance rule of the attention tests."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert attention_triton.input_precision(torch.float32) == "tf32"
    check_packed(SHORT, heads=1, d=d, dtype=torch.float32, causal=causal)
