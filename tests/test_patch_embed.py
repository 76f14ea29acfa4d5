"""Packed patch embedding: the Triton gather-GEMM (interpreter on CPU) and its PyTorch backward
against the fp64 reference (tolerance rule, output and every gradient), the reference against
nn.Conv2d, the position tables, bad input, and no host reads."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_device
from helpers import assert_close_to_ref, assert_rel_close, grads, leaf
from test_no_host_sync import HostReads

import fastclip_kernels._validation as validation
from fastclip_kernels.ops.patch_embed import (
    interpolate_pos_embed,
    patch_embed,
    pos_embed_2d_sincos,
)

B, C, HW, P, D = 2, 3, 32, 8, 32  # 4x4 grid, K = 192
N = (HW // P) ** 2

# name: (keep_idx, cu_seqlens) builders; packed keeps differ per image (1 and 16 patches included)
LAYOUTS = {
    "all": lambda: (None, None),
    "padded_k5": lambda: (torch.stack([torch.randperm(N)[:5] for _ in range(B)]), None),
    "packed_1_16": lambda: (torch.cat([torch.tensor([9]), torch.randperm(N)]), torch.tensor([0, 1, 1 + N])),
}


def _params(dtype=torch.float64, bias=True):
    w = torch.randn(D, C, P, P, dtype=dtype) * 0.05
    b = torch.randn(D, dtype=dtype) if bias else None
    return w, b, torch.randn(N + 1, D, dtype=dtype), torch.randn(D, dtype=dtype)


def _run(images, params, layout, backend, **kw):
    keep, cu = layout
    return patch_embed(images, *params, keep, cu_seqlens=cu, backend=backend, **kw)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize(
    "img_dtype,dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float32, torch.float16)],
    ids=["fp32", "fp16", "fp32img-fp16w"],
)
def test_triton_matches_fp64_reference(layout, img_dtype, dtype):
    dev = triton_device()
    layout = tuple(t.to(dev) if t is not None else None for t in LAYOUTS[layout]())
    images = torch.randn(B, C, HW, HW, device=dev)
    p64 = [leaf(t.to(dev)) for t in _params()]
    p_low = [leaf(t, dtype) for t in p64]
    p_ref = [leaf(t, dtype) for t in p64]
    out = _run(images.to(img_dtype), p_low, layout, "triton")
    ref64 = _run(images.double(), p64, layout, "reference")
    ref = _run(images.to(img_dtype), p_ref, layout, "reference")
    assert out.tokens.dtype == dtype and out.max_seqlen == ref64.max_seqlen
    assert torch.equal(out.cu_seqlens, ref64.cu_seqlens) and out.cu_seqlens.dtype == torch.int32
    assert_close_to_ref("tokens", out.tokens, ref64.tokens, ref.tokens)
    g = torch.randn_like(ref64.tokens)
    got = grads((out.tokens * g.to(dtype)).sum(), p_low)
    want64 = grads((ref64.tokens * g).sum(), p64)
    want = grads((ref.tokens * g.to(dtype)).sum(), p_ref)
    for name, a, b64, b in zip(("dweight", "dbias", "dpos", "dcls"), got, want64, want, strict=True):
        assert a.dtype == dtype
        assert_close_to_ref(name, a, b64, b)


def test_triton_channels_last_no_bias_learned_fp32_pos():
    """Images read through their strides (NHWC memory); no bias; fp32 pos/cls with fp16 weights."""
    dev = triton_device()
    images = torch.randn(B, C, HW, HW, device=dev).to(memory_format=torch.channels_last)
    w, pos, cls = (leaf(t.to(dev)) for t in _params(bias=False) if t is not None)
    keep = torch.tensor([[15, 0, 3], [4, 4, 12]], device=dev)  # unsorted, a repeated patch
    out = patch_embed(images, w.half(), None, pos.float(), cls.float(), keep, backend="triton")
    ref = patch_embed(images.double(), w, None, pos, cls, keep, backend="reference")
    assert_rel_close("tokens", out.tokens, ref.tokens, rtol=2e-3)
    g = torch.randn_like(ref.tokens)
    got = grads((out.tokens.double() * g).sum(), [w, pos, cls])
    want = grads((ref.tokens * g).sum(), [w, pos, cls])
    for name, a, b in zip(("dweight", "dpos", "dcls"), got, want, strict=True):
        assert_rel_close(name, a, b, rtol=2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_patch_size_not_power_of_two(dtype):
    """P = 7 (as 14): patch rows padded to 8 pixels in the K loop, the padding masked out."""
    dev, p, d = triton_device(), 7, 48
    images = torch.randn(3, C, 28, 21, device=dev)  # 4x3 grid, K = 147
    shapes = [(d, C, p, p), (d,), (1 + 12, d), (d,)]
    p64 = [
        leaf(torch.randn(s, dtype=torch.float64, device=dev) * (0.05 if len(s) == 4 else 1)) for s in shapes
    ]
    p_low, p_ref = [leaf(t, dtype) for t in p64], [leaf(t, dtype) for t in p64]
    keep, cu = torch.tensor([11, 0, 5, 1, 2, 3, 4, 6, 7], device=dev), torch.tensor([0, 2, 2, 9])  # one empty
    out = patch_embed(images.to(dtype), *p_low, keep, cu_seqlens=cu, backend="triton")
    ref64 = patch_embed(images.double(), *p64, keep, cu_seqlens=cu, backend="reference")
    ref = patch_embed(images.to(dtype), *p_ref, keep, cu_seqlens=cu, backend="reference")
    assert_close_to_ref("tokens", out.tokens, ref64.tokens, ref.tokens)
    g = torch.randn_like(ref64.tokens)
    got = grads((out.tokens * g.to(dtype)).sum(), p_low)
    want64, want = grads((ref64.tokens * g).sum(), p64), grads((ref.tokens * g.to(dtype)).sum(), p_ref)
    for name, a, b64, b in zip(("dweight", "dbias", "dpos", "dcls"), got, want64, want, strict=True):
        assert_close_to_ref(name, a, b64, b)


def test_reference_equals_conv2d():
    """The gather + matmul reference is nn.Conv2d + position + class token, kept rows picked."""
    images = torch.randn(B, C, HW, HW, dtype=torch.float64)
    w, b, pos, cls = _params()
    keep = torch.tensor([[3, 0, 15], [7, 8, 1]])
    out = patch_embed(images, w, b, pos, cls, keep, backend="reference")
    grid = F.conv2d(images, w, b, stride=P).flatten(2).transpose(1, 2) + pos[1:]  # [B, N, D]
    want = torch.cat([(cls + pos[0]).expand(B, 1, D), grid.gather(1, keep[..., None].expand(-1, -1, D))], 1)
    assert_rel_close("tokens", out.tokens, want.reshape(-1, D), rtol=1e-12)
    assert out.cu_seqlens.tolist() == [0, 4, 8] and out.max_seqlen == 4


def test_autocast_sets_compute_dtype():
    images, (w, b, pos, cls) = torch.randn(B, C, HW, HW), _params(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = patch_embed(images, w, b, pos, cls, backend="reference")
    assert out.tokens.dtype == torch.bfloat16 and out.tokens.shape == (B * (N + 1), D)


# ----------------------------------------------------------------------------------------------
# Position tables
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (1, 1)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_sincos_formula(grid):
    gh, gw = grid
    pos = pos_embed_2d_sincos(gh, gw, 16, dtype=torch.float64)
    assert pos.shape == (1 + gh * gw, 16) and (pos[0] == 0).all()
    omega = 1.0 / 10000 ** (torch.arange(4, dtype=torch.float64) / 4)
    for n in range(gh * gw):
        y, x = divmod(n, gw)
        want = torch.cat([(x * omega).sin(), (x * omega).cos(), (y * omega).sin(), (y * omega).cos()])
        assert torch.allclose(pos[1 + n], want, rtol=0, atol=1e-15)
    assert pos_embed_2d_sincos(gh, gw, 16, cls_token=False).shape == (gh * gw, 16)


def test_interpolate_identity_and_shapes():
    pos = torch.randn(1 + 16, 8)
    same = interpolate_pos_embed(pos, (4, 4))
    assert torch.equal(same, pos) and same.data_ptr() != pos.data_ptr()
    big = interpolate_pos_embed(pos, (7, 5))
    assert big.shape == (1 + 35, 8) and torch.equal(big[0], pos[0])
    const = interpolate_pos_embed(torch.ones(1 + 6, 4, dtype=torch.float64), (5, 9), old_grid=(2, 3))
    assert torch.allclose(const, torch.ones_like(const), atol=1e-12)  # bicubic keeps constants
    back = interpolate_pos_embed(interpolate_pos_embed(pos, (8, 8)), (4, 4), old_grid=(8, 8))
    assert back.shape == pos.shape


def _cubic(x: float, a: float) -> float:
    """Keys' cubic convolution kernel (a = -0.75: torch's bicubic; a = -0.5: PIL's, antialiased)."""
    x = abs(x)
    if x <= 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0


def _resize_matrix(n_in: int, n_out: int, antialias: bool) -> torch.Tensor:
    """[n_out, n_in] 1-D bicubic weights, align_corners=False, written from the formulas: clamped
    4-tap a = -0.75, or (antialias) PIL's normalized a = -0.5 filter widened by the shrink factor."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = n_in / n_out
    for i in range(n_out):
        if not antialias:
            src = (i + 0.5) * scale - 0.5
            for k in range(math.floor(src) - 1, math.floor(src) + 3):
                m[i, min(max(k, 0), n_in - 1)] += _cubic(src - k, -0.75)
            continue
        center, support = (i + 0.5) * scale, 2.0 * max(scale, 1.0)
        taps = range(max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in))
        w = [_cubic((j - center + 0.5) / max(scale, 1.0), -0.5) for j in taps]
        m[i, list(taps)] = torch.tensor(w, dtype=torch.float64) / sum(w)
    return m


@pytest.mark.parametrize("antialias", [True, False])
@pytest.mark.parametrize("old,new", [((2, 3), (5, 4)), ((3, 5), (2, 7)), ((4, 6), (3, 2))])
def test_interpolate_non_square_values_match_separable_bicubic(old, new, antialias):
    """Values on non-square grids: row-major (y, x) cells resized by H @ grid @ W^T, class row kept."""
    pos = torch.randn(1 + old[0] * old[1], 3, dtype=torch.float64)
    grid = pos[1:].reshape(*old, 3)
    h, w = _resize_matrix(old[0], new[0], antialias), _resize_matrix(old[1], new[1], antialias)
    want = torch.einsum("ah,hwc,bw->abc", h, grid, w).reshape(-1, 3)
    got = interpolate_pos_embed(pos, new, old_grid=old, antialias=antialias)
    assert torch.equal(got[0], pos[0])
    assert_rel_close(f"{old} -> {new}", got[1:], want, 1e-13)


def test_interpolate_bad_input():
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(torch.randn(1 + 6, 4), (3, 3))
    with pytest.raises(ValueError, match="old_grid"):
        interpolate_pos_embed(torch.randn(1 + 6, 4), (3, 3), old_grid=(2, 2))
    with pytest.raises(ValueError, match="dim must be a multiple of 4"):
        pos_embed_2d_sincos(2, 2, 6)


# ----------------------------------------------------------------------------------------------
# Bad input, host reads
# ----------------------------------------------------------------------------------------------

_IMG = torch.randn(B, C, HW, HW)
BAD = [
    ("index >= N", dict(keep_idx=torch.tensor([[0, N]])[[0, 0]]), ValueError, r"patch indices in \[0, 16\)"),
    ("negative index", dict(keep_idx=torch.tensor([[-1, 2], [0, 1]])), ValueError, "patch indices"),
    ("float index", dict(keep_idx=torch.zeros(B, 2)), TypeError, "keep_idx must be an int64"),
    ("rows != B", dict(keep_idx=torch.zeros(3, 2, dtype=torch.long)), ValueError, "B = 2 rows"),
    ("packed no cu", dict(keep_idx=torch.arange(4)), ValueError, "needs cu_seqlens"),
    ("cu end", dict(keep_idx=torch.arange(4), cu_seqlens=torch.tensor([0, 2, 5])), ValueError, "rise from 0"),
    (
        "cu shape",
        dict(keep_idx=torch.arange(4), cu_seqlens=torch.tensor([0, 4])),
        ValueError,
        r"shape \(3,\)",
    ),
    (
        "cu float",
        dict(keep_idx=torch.arange(4), cu_seqlens=torch.tensor([0.0, 2, 4])),
        TypeError,
        "int32/int64",
    ),
    (
        "max_keep low",
        dict(keep_idx=torch.arange(4), cu_seqlens=torch.tensor([0, 1, 4]), max_keep=2),
        ValueError,
        "max_keep",
    ),
    ("image size", dict(images=torch.randn(B, C, 40, 40)), ValueError, "5x5 grid: pos must be"),
    ("not multiple", dict(images=torch.randn(B, C, 30, 32)), ValueError, "not a multiple of patch_size"),
    ("channels", dict(images=torch.randn(B, 1, HW, HW)), ValueError, "C=1"),
    ("images rank", dict(images=torch.randn(C, HW, HW)), ValueError, r"\[B, C, H, W\]"),
    ("backend", dict(backend="cuda"), ValueError, "backend must be one of"),
    ("fp64 triton", dict(backend="triton"), ValueError, "computes in"),
]


@pytest.mark.parametrize("case,kw,err,match", BAD, ids=[c[0] for c in BAD])
def test_bad_input(case, kw, err, match):
    w, b, pos, cls = _params()
    args = dict(images=_IMG.double(), weight=w, bias=b, pos=pos, cls=cls)
    args.update(kw)
    with pytest.raises(err, match=match):
        patch_embed(**args)


def test_triton_refuses_image_gradients():
    w, b, pos, cls = _params(torch.float32)
    with pytest.raises(ValueError, match="images require grad"):
        patch_embed(_IMG.clone().requires_grad_(), w, b, pos, cls, backend="triton")


def test_no_host_reads(monkeypatch):
    """With value checks off (as for CUDA tensors) and max_keep given, nothing is read back."""
    monkeypatch.setattr(validation, "index_checks_enabled", lambda t: False)
    params = [leaf(t) for t in _params()]
    keep, cu = torch.arange(7), torch.tensor([0, 3, 7])
    with HostReads() as reads:
        out = patch_embed(_IMG.double(), *params, keep, cu_seqlens=cu, max_keep=4, backend="reference")
        out.tokens.sum().backward()
    assert reads.ops == [] and out.max_seqlen == 5
