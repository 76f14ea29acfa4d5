"""anchor_stats / anchor_grad (fastclip_kernels.ops.anchor) against dense references written here.

The dense references materialize P = A @ C.T and the positive mask; the chunked backend must match
them in fp64 to rel. 1e-12, the Triton kernels within the tolerance rule in fp32/fp16 (bf16 on a
GPU). anchor_grad is also checked against autograd of a potential whose dP is W.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import triton_device
from helpers import assert_close_to_ref, assert_rel_close

from fastclip_kernels.ops.anchor import anchor_grad, anchor_stats, chunked

RTOL = 1e-12
# (M, N, D, label_offset): M < N with the positives in the middle, M = N, one row.
SHAPES = [
    pytest.param(m, n, d, o, id=f"M{m}-N{n}-D{d}-o{o}")
    for m, n, d, o in [(1, 2, 16, 1), (7, 17, 40, 5), (33, 40, 77, 7), (12, 12, 64, 0)]
]
TRITON_SHAPES = SHAPES[:3]
# (row, col, exclude_positive): the combinations FastCLIPLoss and the tests launch.
TERMS = {
    "row+col-excl": (True, True, True),
    "row+col-incl": (True, True, False),
    "row-excl": (True, False, True),
    "col-incl": (False, True, False),
}
EXCLUDE = [pytest.param(True, id="excl"), pytest.param(False, id="incl")]


# ---------------------------------------------------------------------------------------------
# Inputs and dense references
# ---------------------------------------------------------------------------------------------


def features(m, n, d, o, dtype=torch.float64, device="cpu", norm=1.0):
    """Unit rows (times ``norm``); anchor i correlated with its positive c_{i+o}."""
    a = F.normalize(torch.randn(m, d, dtype=torch.float64), dim=-1)
    c = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)
    c[o : o + m] = F.normalize(c[o : o + m] + a, dim=-1)
    return (norm * a).to(device, dtype), (norm * c).to(device, dtype)


def keep_strides(t, dtype, device=None):
    """``t`` in dtype on device with its strides kept (``to`` makes expands and slices contiguous)."""
    if t.stride(0) == 0:
        return t[:1].to(device, dtype).expand(t.shape[0])
    return torch.empty_strided(t.shape, t.stride(), dtype=dtype, device=device or t.device).copy_(t)


def row_scales(m, kind, device="cpu", dtype=torch.float64):
    """Per-row distinct scales, a stride-0 expand of a 0-d scale, or a strided column of [m, 2]."""
    if kind == "stride0":
        return torch.tensor(14.3, device=device, dtype=dtype).expand(m)
    s = 10.0 + 20.0 * torch.rand(m, 2, dtype=dtype)
    return keep_strides(s[:, 0] if kind == "strided" else s[:, 0].contiguous(), dtype, device)


def dense_masks(m, n, o, exclude_positive, device):
    pos = torch.arange(n, device=device)[None, :] == (torch.arange(m, device=device) + o)[:, None]
    return pos, (~pos if exclude_positive else torch.ones_like(pos))


def stats_dense(a, c, s, o, exclude_positive):
    """(lse, mean_dot, pos_dot) from the materialized [M, N] matrix, computed in a's dtype."""
    dot = a @ c.T
    pos, keep = dense_masks(*dot.shape, o, exclude_positive, dot.device)
    z = torch.where(keep, s.to(dot.dtype)[:, None] * dot, float("-inf"))
    return torch.logsumexp(z, dim=1), (torch.softmax(z, dim=1) * dot).sum(dim=1), dot[pos]


def terms(a, c, o, rows_on, cols_on, kind="vector"):
    """(pos_coef, row, col) like FastCLIPLoss's: shifts are the log-normalizers of each term."""
    m, n = a.shape[0], c.shape[0]
    dot = a.double() @ c.double().T
    pos_coef = -(0.5 + torch.rand(m, dtype=torch.float64))
    row = col = None
    if rows_on:
        scale = row_scales(m, "strided" if kind == "stride0" else "vector")
        row = (scale, torch.logsumexp(scale[:, None] * dot, dim=1), 0.5 + torch.rand(m, dtype=torch.float64))
    if cols_on:
        if kind == "stride0":
            scale, coef = torch.tensor(20.0).double().expand(n), torch.tensor(0.7).double().expand(n)
        else:
            scale, coef = 10.0 + 20.0 * torch.rand(n, dtype=torch.float64), 0.5 + torch.rand(n).double()
        col = (scale, torch.logsumexp(scale[None, :] * dot, dim=0), coef)
    return pos_coef, row, col


def cast_terms(pos_coef, row, col, dtype, device=None):
    """The same vectors in ``dtype`` on ``device``, stride-0 expands and strided slices kept."""
    row = None if row is None else tuple(keep_strides(t, dtype, device) for t in row)
    col = None if col is None else tuple(keep_strides(t, dtype, device) for t in col)
    return keep_strides(pos_coef, dtype, device), row, col


def weight_dense(dot, o, exclude_positive, pos_coef, row, col):
    """W_ij of the anchor module docstring on the materialized [M, N] matrix."""
    pos, keep = dense_masks(*dot.shape, o, exclude_positive, dot.device)
    w = torch.zeros_like(dot)
    if row is not None:
        scale, shift, coef = (t.to(dot.dtype)[:, None] for t in row)
        w = w + coef * torch.exp(scale * dot - shift)
    if col is not None:
        scale, shift, coef = (t.to(dot.dtype)[None, :] for t in col)
        w = w + coef * torch.exp(scale * dot - shift)
    return torch.where(keep, w, 0.0) + torch.where(pos, pos_coef.to(dot.dtype)[:, None], 0.0)


def grad_dense(a, c, o, exclude_positive, pos_coef, row, col):
    return weight_dense(a @ c.T, o, exclude_positive, pos_coef, row, col) @ c


def potential(dot, o, exclude_positive, pos_coef, row, col):
    """f(P) with df/dP_ij = W_ij: sum over kept (i, j) of coef/scale exp(scale P - shift) per term,
    plus sum_i pos_coef_i P_{i,i+o}."""
    pos, keep = dense_masks(*dot.shape, o, exclude_positive, dot.device)
    f = (pos_coef * dot[pos]).sum()
    if row is not None:
        scale, shift, coef = (t[:, None] for t in row)
        f = f + torch.where(keep, coef / scale * torch.exp(scale * dot - shift), 0.0).sum()
    if col is not None:
        scale, shift, coef = (t[None, :] for t in col)
        f = f + torch.where(keep, coef / scale * torch.exp(scale * dot - shift), 0.0).sum()
    return f


# ---------------------------------------------------------------------------------------------
# Chunked backend (fp64): the specification of the kernels
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 5, None], ids=lambda k: f"chunk{k}")
@pytest.mark.parametrize("kind", ["vector", "stride0", "strided"])
@pytest.mark.parametrize("exclude", EXCLUDE)
@pytest.mark.parametrize("m,n,d,o", SHAPES)
def test_chunked_stats_match_dense_fp64(m, n, d, o, exclude, kind, chunk):
    a, c = features(m, n, d, o)
    s = row_scales(m, kind)
    ours = chunked.anchor_stats(a, c, s, o, exclude, chunk=chunk)
    for name, x, r in zip(
        ["lse", "mean_dot", "pos_dot"], ours, stats_dense(a, c, s, o, exclude), strict=True
    ):
        assert x.dtype == torch.float64
        assert_rel_close(name, x, r, RTOL)


@pytest.mark.parametrize("chunk", [1, 5, None], ids=lambda k: f"chunk{k}")
@pytest.mark.parametrize("kind", ["vector", "stride0"])
@pytest.mark.parametrize("terms_id", TERMS)
@pytest.mark.parametrize("m,n,d,o", SHAPES)
def test_chunked_grad_matches_dense_fp64(m, n, d, o, terms_id, kind, chunk):
    rows_on, cols_on, exclude = TERMS[terms_id]
    a, c = features(m, n, d, o)
    pos_coef, row, col = terms(a, c, o, rows_on, cols_on, kind)
    ours = chunked.anchor_grad(a, c, o, exclude, pos_coef, row, col, chunk=chunk)
    assert_rel_close("grad_a", ours, grad_dense(a, c, o, exclude, pos_coef, row, col), RTOL)


@pytest.mark.parametrize("terms_id", [*TERMS, "pos-only"])
@pytest.mark.parametrize("m,n,d,o", SHAPES)
def test_chunked_grad_is_autograd_of_potential(m, n, d, o, terms_id):
    rows_on, cols_on, exclude = TERMS.get(terms_id, (False, False, True))
    a, c = features(m, n, d, o)
    pos_coef, row, col = terms(a, c, o, rows_on, cols_on)
    a_leaf = a.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(potential(a_leaf @ c.T, o, exclude, pos_coef, row, col), [a_leaf])
    ours = anchor_grad(a, c, pos_coef, row=row, col=col, label_offset=o, exclude_positive=exclude)
    assert_rel_close("grad_a", ours, expected, RTOL)


# ---------------------------------------------------------------------------------------------
# Triton kernels (GPU, or CPU under the interpreter) within the tolerance rule
# ---------------------------------------------------------------------------------------------


def check_stats(a, c, s, o, exclude, floor):
    ours = anchor_stats(a, c, s, label_offset=o, exclude_positive=exclude, backend="triton")
    truth = stats_dense(a.double(), c.double(), s.double(), o, exclude)
    same = stats_dense(a, c, s.to(a.dtype), o, exclude)
    for name, x, r64, r in zip(["lse", "mean_dot", "pos_dot"], ours, truth, same, strict=True):
        assert x.dtype == torch.float32 and x.shape == (a.shape[0],)
        assert_close_to_ref(name, x, r64, r, floor=floor)


def check_grad(a, c, o, exclude, vectors, floor):
    pos_coef, row, col = cast_terms(*vectors, torch.float32, a.device)
    ours = anchor_grad(
        a, c, pos_coef, row=row, col=col, label_offset=o, exclude_positive=exclude, backend="triton"
    )
    assert ours.dtype == a.dtype and ours.shape == a.shape
    truth = grad_dense(a.double(), c.double(), o, exclude, *cast_terms(pos_coef, row, col, torch.float64))
    same = grad_dense(a, c, o, exclude, *cast_terms(pos_coef, row, col, a.dtype))
    assert_close_to_ref("grad_a", ours, truth, same, floor=floor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("exclude", EXCLUDE)
@pytest.mark.parametrize("m,n,d,o", TRITON_SHAPES)
def test_triton_stats_tolerance_rule(m, n, d, o, exclude, dtype):
    a, c = features(m, n, d, o, dtype, triton_device())
    check_stats(a, c, row_scales(m, "vector", a.device, torch.float32), o, exclude, floor=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("terms_id", TERMS)
@pytest.mark.parametrize("m,n,d,o", TRITON_SHAPES)
def test_triton_grad_tolerance_rule(m, n, d, o, terms_id, dtype):
    rows_on, cols_on, exclude = TERMS[terms_id]
    a, c = features(m, n, d, o, dtype, triton_device())
    check_grad(a, c, o, exclude, terms(a, c, o, rows_on, cols_on), floor=1e-5)


@pytest.mark.parametrize("exclude", EXCLUDE)
def test_triton_stride0_and_strided_vectors(exclude):
    """Scales as a stride-0 expand or a strided column; column scale and coef as expands."""
    m, n, d, o = 7, 17, 40, 5
    a, c = features(m, n, d, o, torch.float32, triton_device())
    for kind, stride in [("stride0", 0), ("strided", 2)]:
        s = row_scales(m, kind, a.device, torch.float32)
        assert s.stride(0) == stride
        check_stats(a, c, s, o, exclude, floor=1e-5)
    vectors = terms(a, c, o, True, True, "stride0")
    assert [t.stride(0) for t in (*vectors[1], *vectors[2])] == [2, 1, 1, 0, 1, 0]
    check_grad(a, c, o, exclude, vectors, floor=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 tl.dot is wrong in the Triton interpreter; GPU only"
)
@pytest.mark.parametrize("m,n,d,o", [(7, 17, 40, 5), (257, 512, 768, 128)])
def test_triton_bf16_on_gpu(m, n, d, o):
    a, c = features(m, n, d, o, torch.bfloat16, "cuda")
    for exclude in (True, False):
        check_stats(a, c, row_scales(m, "vector", "cuda", torch.float32), o, exclude, floor=1e-4)
    for rows_on, cols_on, exclude in TERMS.values():
        check_grad(a, c, o, exclude, terms(a, c, o, rows_on, cols_on), floor=1e-4)


# ---------------------------------------------------------------------------------------------
# Extreme values
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exclude", EXCLUDE)
@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_adversarial_scale_100_stays_finite(backend, exclude):
    """s = 100, feature norms 3: each positive is -a_i (P = -9) while some negative equals a_i
    (P = 9), so exp(s P) reaches exp(900), far past fp32; outputs must be finite and exact."""
    device = "cpu" if backend == "chunked" else triton_device()
    m, o = 9, 9
    a = 3.0 * F.normalize(torch.randn(m, 24, dtype=torch.float64), dim=-1)
    c = torch.cat([a.flip(0), -a])  # c_{i+o} = -a_i, c_{m-1-i} = a_{m-1-i}
    s = torch.full((m,), 100.0, dtype=torch.float64)
    a32, c32 = a.to(device, torch.float32), c.to(device, torch.float32)
    stats = anchor_stats(
        a32, c32, s.to(device, torch.float32), label_offset=o, exclude_positive=exclude, backend=backend
    )
    for name, x, r in zip(
        ["lse", "mean_dot", "pos_dot"], stats, stats_dense(a, c, s, o, exclude), strict=True
    ):
        assert torch.isfinite(x).all(), f"{name} is not finite"
        assert_rel_close(name, x, r, 1e-5)
    pos_coef, row, col = terms(a, c, o, True, True)
    row = (s, torch.logsumexp(100.0 * (a @ c.T), dim=1), row[2])
    col = (
        torch.full((2 * m,), 100.0, dtype=torch.float64),
        torch.logsumexp(100.0 * (a @ c.T), dim=0),
        col[2],
    )
    pos_coef32, row32, col32 = cast_terms(pos_coef, row, col, torch.float32, device)
    ours = anchor_grad(
        a32, c32, pos_coef32, row=row32, col=col32, label_offset=o, exclude_positive=exclude, backend=backend
    )
    assert torch.isfinite(ours).all(), "grad_a is not finite"
    # fp32 P has error ~ |P| eps = 9 * 1.2e-7, so W = exp(s P - shift) carries a relative error of
    # ~ s |P| eps = 1.1e-4 whichever backend computes it (chunked fp32 reaches 1.3e-4 over seeds).
    rtol = 4 * 100.0 * 9.0 * torch.finfo(torch.float32).eps
    assert_rel_close("grad_a", ours, grad_dense(a, c, o, exclude, pos_coef, row, col), rtol)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's numpy log(0)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # and its 0/0 mean_dot
@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_no_candidate_left_gives_minus_inf_lse(backend):
    """One anchor, one column that is its excluded positive: the sum is empty, lse = -inf (not NaN)."""
    device = "cpu" if backend == "chunked" else triton_device()
    a, c = features(1, 1, 16, 0, torch.float32, device)
    s = torch.tensor([10.0], device=device)
    lse, _, pos_dot = anchor_stats(a, c, s, label_offset=0, exclude_positive=True, backend=backend)
    assert lse.item() == float("-inf")
    assert_rel_close("pos_dot", pos_dot, a.double() @ c.double().T, 1e-6)


def _bad_anchor_call(op, device, label_offset=2, m=3, n=7, **sizes):
    """One anchor_stats / anchor_grad call at M=3, N=7 with some vector lengths or terms changed."""
    a, c = torch.randn(m, 8, device=device), torch.randn(n, 8, device=device)
    vec = {k: torch.rand(sizes.get(k, m if k.startswith(("row", "pos")) else n), device=device) for k in
           ("row_scale", "row_shift", "row_coef", "col_scale", "col_shift", "col_coef", "pos_coef")}  # fmt: skip
    for name in sizes.get("drop", ()):
        vec[name] = None
    kw = dict(label_offset=label_offset, exclude_positive=True, backend="chunked")
    if op == "stats":
        return anchor_stats(a, c, vec["row_scale"], **kw)
    row = tuple(vec[f"row_{k}"] for k in ("scale", "shift", "coef"))
    col = tuple(vec[f"col_{k}"] for k in ("scale", "shift", "coef"))
    return torch.ops.fastclip.anchor_grad(a, c, vec["pos_coef"], *row, *col, label_offset, True, "chunked")


BAD_ANCHOR_ARGS = {
    "offset -1": (
        "stats",
        dict(label_offset=-1),
        "label_offset must be an int in \\[0, N - M\\] = \\[0, 4\\]",
    ),
    "offset past N - M": ("grad", dict(label_offset=5), "label_offset must be an int in \\[0, N - M\\]"),
    "more rows than columns": ("stats", dict(label_offset=0, m=8), "label_offset must be an int"),
    "short row_scale": ("stats", dict(row_scale=2), "row_scale must have shape \\(3,\\)"),
    "long pos_coef": ("grad", dict(pos_coef=4), "pos_coef must have shape \\(3,\\)"),
    "col vector of M": ("grad", dict(col_shift=3), "col_shift must have shape \\(7,\\)"),
    "half a row term": (
        "grad",
        dict(drop=("row_coef",)),
        "row_scale, row_shift and row_coef must be given together",
    ),
}


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case", BAD_ANCHOR_ARGS)
def test_raw_ops_reject_bad_offsets_and_vector_lengths(case, device):
    """The registered ops check the positive's column index (label_offset) and the per-anchor vector
    lengths from shapes alone (their fake implementations too): an offset past N - M put positives
    outside c and short vectors were read past their end, silently."""
    op, kw, match = BAD_ANCHOR_ARGS[case]
    with pytest.raises(ValueError, match=match):
        _bad_anchor_call(op, device, **kw)
    _bad_anchor_call(op, device)  # the same call with good arguments runs
