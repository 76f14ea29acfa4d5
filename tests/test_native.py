"""fastclip_kernels._native: the torch ops over the native library ``_C`` (row_dot and its backward).

Native-op tests skip when ``_C`` is not built; the PyTorch fallback is tested either way.
"""

import pytest
import torch
from helpers import assert_close_to_ref

from fastclip_kernels import _native
from fastclip_kernels._native import row_dot

needs_native = pytest.mark.skipif(
    not _native.native_available(),
    reason=f"fastclip_kernels._C is not built ({_native.build_info().get('error')}); run `pip install -e .`",
)
SHAPES = [pytest.param(r, d, id=f"rows{r}-D{d}") for r in (1, 7, 127) for d in (1, 77, 512)]
DTYPES = [pytest.param(t, id=str(t).removeprefix("torch.")) for t in (torch.float32, torch.float64)]


def pair(rows, d, dtype=torch.float32, device="cpu"):
    a, c = torch.randn(rows, d, dtype=torch.float64), torch.randn(rows, d, dtype=torch.float64)
    return a.to(device, dtype), c.to(device, dtype)


def row_dot_ref(a, c):
    """fp64 truth and the plain-PyTorch result in the accumulation dtype (the error baseline)."""
    acc = torch.float64 if a.dtype == torch.float64 else torch.float32
    return (a.double() * c.double()).sum(-1), (a.to(acc) * c.to(acc)).sum(-1)


def check_forward_backward(a, c):
    a, c = a.detach().requires_grad_(), c.detach().requires_grad_()
    out = torch.ops.fastclip.row_dot(a, c)
    assert out.dtype == (torch.float64 if a.dtype == torch.float64 else torch.float32)
    assert out.shape == (a.shape[0],)
    truth, same = row_dot_ref(a.detach(), c.detach())
    assert_close_to_ref("out", out, truth, same)
    g = torch.randn_like(out)
    grad_a, grad_c = torch.autograd.grad(out, (a, c), g)
    assert grad_a.dtype == a.dtype and grad_c.dtype == c.dtype
    torch.testing.assert_close(grad_a, (g[:, None] * c).to(a.dtype), rtol=0, atol=0)
    torch.testing.assert_close(grad_c, (g[:, None] * a).to(a.dtype), rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", SHAPES)
def test_row_dot_cpu(rows, d, dtype):
    check_forward_backward(*pair(rows, d, dtype))


@needs_native
@pytest.mark.parametrize(
    "layout",
    ["row-slice", "column-slice", "transposed", "expanded-rows", "strided-cols"],
)
def test_row_dot_non_contiguous(layout):
    base_a, base_c = pair(64, 200)
    if layout == "row-slice":  # every other row: row stride 2 * D, still unit stride along D
        a, c = base_a[::2], base_c[::2]
    elif layout == "column-slice":  # rows shorter than the row stride
        a, c = base_a[:, 3:80], base_c[:, 3:80]
    elif layout == "transposed":  # unit stride along rows, not along D: copied
        a, c = base_a[:, :64].T, base_c[:, :64].T
    elif layout == "expanded-rows":  # one row repeated (row stride 0): copied
        a, c = base_a[:1].expand(9, -1), base_c[:9]
    else:
        a, c = base_a[:, ::3], base_c[:, ::3]
    assert not a.is_contiguous()
    check_forward_backward(a, c)


@needs_native
def test_row_dot_empty():
    a, c = pair(0, 16)
    assert torch.ops.fastclip.row_dot(a, c).shape == (0,)
    a, c = pair(5, 0)
    torch.testing.assert_close(torch.ops.fastclip.row_dot(a, c), torch.zeros(5))


@needs_native
def test_gradcheck_fp64():
    a, c = (x.requires_grad_() for x in pair(7, 13, torch.float64))
    assert torch.autograd.gradcheck(torch.ops.fastclip.row_dot, (a, c))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    a, c = pair(7, 77, dtype)
    torch.library.opcheck(torch.ops.fastclip.row_dot.default, (a, c))
    torch.library.opcheck(torch.ops.fastclip.row_dot.default, (a.requires_grad_(), c))
    g = torch.randn(7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(torch.ops.fastclip.row_dot_backward.default, (g, a.detach(), c))


BAD_INPUTS = [
    pytest.param(lambda: (torch.randn(8), torch.randn(8)), ValueError, "a must be 2-D", id="1-D"),
    pytest.param(lambda: (torch.randn(3, 8), torch.randn(3, 9)), ValueError, "c has shape", id="shape"),
    pytest.param(
        lambda: (torch.randn(3, 8), torch.randn(3, 8, dtype=torch.float64)),
        TypeError,
        "c has dtype",
        id="dtype",
    ),
    pytest.param(
        lambda: (torch.randn(3, 8), [[0.0] * 8] * 3), TypeError, "c must be a torch.Tensor", id="list"
    ),
    pytest.param(
        lambda: (torch.ones(3, 8, dtype=torch.int32),) * 2, TypeError, "a must be a floating", id="int"
    ),
]


@pytest.mark.parametrize("make,exc,match", BAD_INPUTS)
def test_bad_input_row_dot(make, exc, match):
    with pytest.raises(exc, match=match):
        row_dot(*make())


@needs_native
@pytest.mark.parametrize("make,exc,match", BAD_INPUTS[:3])
def test_bad_input_op(make, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.fastclip.row_dot(*make())


@needs_native
def test_op_rejects_dtype_without_kernel():
    a, c = pair(3, 8, torch.float16)
    with pytest.raises(TypeError, match="a has dtype torch.float16; native cpu kernels take"):
        torch.ops.fastclip.row_dot(a, c)


@needs_native
def test_native_checks_raise_value_error():
    with pytest.raises(ValueError, match="row_dot_cpu: dtype_code must be 0"):
        _native._lib().row_dot_cpu(0, 0, 0, 0, 0, 0, 0, 2)
    with pytest.raises(ValueError, match="a is a null pointer"):
        _native._lib().row_dot_cpu(0, 0, 0, 2, 4, 4, 4, 0)
    with pytest.raises(ValueError, match="rows would overlap"):
        _native._lib().row_dot_cpu(8, 8, 8, 2, 4, 3, 4, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fallback_dtypes(dtype):
    """fp16/bf16 have no CPU kernel: plain PyTorch with fp32 accumulation, differentiable."""
    a, c = (x.requires_grad_() for x in pair(7, 77, dtype))
    out = row_dot(a, c)
    truth, same = row_dot_ref(a.detach(), c.detach())
    assert out.dtype == same.dtype
    assert_close_to_ref("fallback out", out, truth, same)
    out.sum().backward()
    torch.testing.assert_close(a.grad, c.detach())


@pytest.mark.parametrize("dtype", DTYPES)
def test_fallback_without_native_library(monkeypatch, dtype):
    monkeypatch.setattr(_native, "_state", {"lib": None, "error": ImportError("simulated"), "cuda": False})
    assert not _native.native_available() and not _native.native_cuda_available()
    assert _native.build_info()["error"] == "ImportError: simulated"
    a, c = pair(7, 77, dtype)
    truth, same = row_dot_ref(a, c)
    assert_close_to_ref("fallback out", row_dot(a, c), truth, same)
    with pytest.raises(RuntimeError, match="fastclip_kernels._C is not built .*pip install"):
        torch.ops.fastclip.row_dot(a, c)


@pytest.mark.gpu
@pytest.mark.skipif(not _native.native_cuda_available(), reason="needs a CUDA GPU and _C built with nvcc")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,d", SHAPES)
def test_row_dot_cuda(rows, d, dtype):
    a, c = pair(rows, d, dtype, "cuda")
    out = row_dot(a.requires_grad_(), c.requires_grad_())
    truth, same = row_dot_ref(a.detach(), c.detach())
    assert out.dtype == torch.float32
    assert_close_to_ref("cuda out", out, truth, same)
    g = torch.randn_like(out)
    grad_a, grad_c = torch.autograd.grad(out, (a, c), g)
    torch.testing.assert_close(grad_a, (g[:, None] * c.float()).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(grad_c, (g[:, None] * a.float()).to(dtype), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.fastclip.row_dot.default, (a.detach()[:, 1:], c.detach()[:, 1:]))
