"""Argument checks shared by the public losses: each error names the argument and what was expected.

Checks never synchronize with a GPU: the value of a CUDA ``logit_scale`` (finite, > 0) is only checked
when ``FASTCLIP_CHECK_FINITE=1`` (a host sync per call); CPU tensors and Python numbers are always checked.
"""

import math
import os

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def host_checks(t: torch.Tensor, env: str) -> bool:
    """Whether value checks may read ``t`` on the host: CPU tensors outside ``torch.compile``
    tracing (a read there would break the graph), or any device with ``env``=1 (a host sync)."""
    if os.environ.get(env) == "1" and t.device.type != "meta":
        return True
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def check_features(name: str, x, dim: int | None = None, device=None, dtype=None) -> None:
    """x must be a non-empty [B, D] floating tensor (matching ``dim``/``device``/``dtype`` if given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, D], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be fp16/bf16/fp32/fp64, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has feature dim {x.shape[1]}, expected {dim} (as image_features)")
    if device is not None and x.device != device:
        raise ValueError(f"{name} is on {x.device}, expected {device} (as image_features)")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, expected {dtype} (as image_features)")


def check_same_batch(name: str, x: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if x.shape[0] != other.shape[0]:
        raise ValueError(
            f"{name} has batch {x.shape[0]} but {other_name} has batch {other.shape[0]}; "
            "each image needs its paired text"
        )


def as_scalar_tensor(
    name: str, value, device: torch.device, dtype=torch.float32, *, positive: bool = False
) -> torch.Tensor:
    """A Python number (made a ``dtype`` tensor) or 1-element floating tensor on ``device``, finite
    (and > 0 with ``positive``, as a logit scale s = 1/tau must be).

    A 0-d CPU tensor with features on another device is copied there (differentiably), as torch
    broadcasts a CPU scalar tensor against CUDA tensors in open_clip's ``logit_scale * x @ y.T``.
    Values are read only where :func:`host_checks` allows (CPU tensors, Python numbers; another
    device with ``FASTCLIP_CHECK_FINITE=1``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 1-element tensor, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        _check_value(name, float(value), positive)
        return torch.full((), float(value), device=device, dtype=dtype)  # a fill, not a blocking copy
    if value.numel() != 1:
        raise ValueError(f"{name} must have one element, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    moved = value.device != device and value.device.type == "cpu" and value.dim() == 0
    if value.device != device and not moved:
        raise ValueError(
            f"{name} is on {value.device}, expected {device} (as the features; a 0-d CPU tensor is "
            "also accepted)"
        )
    if host_checks(value, "FASTCLIP_CHECK_FINITE"):
        _check_value(name, value.detach().reshape(()).item(), positive)
    return value.to(device, non_blocking=True) if moved else value


def _check_value(name: str, v: float, positive: bool) -> None:
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0 (the exponentiated scale s = 1/tau), got {v}")


def scalar_dtype(features_dtype: torch.dtype) -> torch.dtype:
    """dtype for a logit scale/bias given as a Python number: fp64 for fp64 features, else fp32."""
    return torch.float64 if features_dtype == torch.float64 else torch.float32


def _check_index_values(name: str, idx: torch.Tensor, data_size: int) -> None:
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= data_size):
        raise ValueError(
            f"{name} must be global sample indices in [0, {data_size}), got min {int(idx.min())}, "
            f"max {int(idx.max())}"
        )
    if torch.unique(idx).numel() != idx.numel():
        raise ValueError(f"{name} has duplicate sample indices; each sample may appear once per global batch")


def index_checks_enabled(idx: torch.Tensor) -> bool:
    """Value checks (range, duplicates) read the indices on the host: always for CPU tensors, for
    device tensors only with FASTCLIP_CHECK_INDICES=1 (a host sync per step)."""
    return host_checks(idx, "FASTCLIP_CHECK_INDICES")


def check_indices(name: str, idx, batch: int, data_size: int) -> torch.Tensor:
    """idx must be a [batch] int32/int64 tensor of distinct values in [0, data_size); returns int64."""
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of global sample indices, got {type(idx).__name__}")
    if idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int64 (or int32) global sample indices, got {idx.dtype}")
    if idx.shape != (batch,):
        raise ValueError(
            f"{name} must have shape ({batch},) like the features' batch, got {tuple(idx.shape)}"
        )
    if index_checks_enabled(idx):
        _check_index_values(name, idx, data_size)
    return idx.to(torch.int64).contiguous()


def check_global_indices(name: str, idx: torch.Tensor, data_size: int) -> None:
    """Range and duplicates over the gathered global batch: on the host where ``index_checks_enabled``
    (ValueError), else as device-side asserts (no host sync; see ``assert_index_values_async``)."""
    if index_checks_enabled(idx):
        _check_index_values(name, idx, data_size)
    else:
        assert_index_values_async(name, idx, data_size)


def assert_index_values_async(name: str, idx: torch.Tensor, data_size: int) -> None:
    """idx [n] in [0, data_size) and distinct, checked with ``torch._assert_async``: no host sync on
    CUDA (a bad batch fails with a device assert instead of reading or writing the wrong per-sample
    state, or two updates racing on one row); raises RuntimeError at once on CPU."""
    if idx.numel() == 0:
        return
    in_range = (idx.min() >= 0) & (idx.max() < data_size)
    torch._assert_async(in_range, f"{name} must be global sample indices in [0, {data_size})")
    ordered = idx.sort().values
    distinct = (ordered[1:] != ordered[:-1]).all()
    torch._assert_async(
        distinct, f"{name} has duplicate sample indices; each sample may appear once per global batch"
    )
