"""One tolerance rule for every kernel test (flash-attention's): the kernel's error against an
fp64 reference is at most ``factor`` x the error of the plain-PyTorch implementation run in the
kernel's own dtype, plus a small absolute floor. Failures print max/mean errors and the ratio."""

import torch


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.detach().double() - ref.detach().double()).abs().max().item()


def assert_close_to_ref(name: str, out, ref64, ref_same_dtype, factor: float = 2.0, floor: float = 1e-6):
    """out, ref_same_dtype: the kernel's and PyTorch's result in the test dtype; ref64: fp64 truth."""
    out, ref64, ref_same_dtype = (t.detach().double().cpu() for t in (out, ref64, ref_same_dtype))
    assert torch.isfinite(out).all(), f"{name}: non-finite values in the kernel output"
    err = (out - ref64).abs()
    torch_err = (ref_same_dtype - ref64).abs().max().item()
    scale = 1.0 + ref64.abs().max().item()
    bound = factor * torch_err + floor * scale
    msg = (
        f"{name}: kernel max err {err.max().item():.3e} (mean {err.mean().item():.3e}), "
        f"torch same-dtype max err {torch_err:.3e}, bound {bound:.3e}"
    )
    assert err.max().item() <= bound, msg


def assert_rel_close(name: str, out, ref, rtol: float, atol: float = 0.0):
    """max |out - ref| <= rtol * max|ref| + atol (atol for values that cancel to ~0, e.g. B=1)."""
    err = max_err(out, ref)
    size = ref.detach().double().abs().max().item()
    assert err <= rtol * size + atol, f"{name}: max err {err:.3e} > {rtol:.1e} * {size:.3e} + {atol:.1e}"


def grads(loss: torch.Tensor, inputs) -> list:
    """d loss / d input for every input that requires grad (None otherwise)."""
    needs = [x for x in inputs if x is not None and x.requires_grad]
    got = iter(torch.autograd.grad(loss, needs))
    return [next(got) if x is not None and x.requires_grad else None for x in inputs]


def leaf(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """A detached copy (optionally cast) that requires grad."""
    return x.detach().to(dtype or x.dtype).clone().requires_grad_(True)
