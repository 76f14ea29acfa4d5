"""Multi-tensor AdamW / LAMB / gradient norms on the native library ``fastclip_kernels._C``.

Same functions, signatures and math as ``reference.py`` (read it for the formulas): ``adamw_``,
``lamb_``, ``global_grad_norm``, ``clip_coefficient``, plus ``grad_norm_and_clip_coefficient`` (both
in one reduction) and ``available(device)``. Kernels: csrc/cuda/multi_tensor.cu on CUDA (apex's
multi_tensor_apply pattern: ONE launch per op and dtype, LAMB two), csrc/cpu/multi_tensor.cpp on the
CPU (the same table, chunk loop and per-element math of csrc/optim_math.h, single-threaded: for CI
and tests, not for speed).

Each call describes its tensors in an int64 metadata table, one row per tensor
[param, grad, exp_avg, exp_avg_sq, master or 0, step, numel] (addresses) followed by a chunk list
(tensor index, start) in chunks of ``CHUNK_SIZE`` elements. On CUDA the table is built in pinned
memory and copied with ``non_blocking=True``; it is cached by its contents (addresses and sizes), so
a training loop whose tensors keep their storage builds it once. Nothing reads device memory back:
steps, lr (when a 0-d tensor), grad_scale, norms and trust ratios stay on the device, so a step can
be captured in a CUDA graph (warm up before capturing, so the table already exists).

Determinism: the CUDA kernels sum squares per tensor with one fp32 ``atomicAdd`` per block (chunk), so
``global_grad_norm``, ``grad_norm_and_clip_coefficient`` (and hence clipped steps) and LAMB's trust
ratios (hence every LAMB step) are not bitwise reproducible from run to run on CUDA: the order of
the per-block additions varies (differences of a few fp32 ulps in the norms). AdamW without clipping
is elementwise and reproducible; the CPU kernels are single-threaded and reproducible. For
reproducible norms on CUDA use ``backend="triton"`` (fixed-order reductions, ``triton.py``).

Inputs (one call = one device and one param dtype; the optimizer buckets by dtype): params and
grads fp32, or fp16/bf16 with fp32 ``masters`` of the same shape; fp32 moments; 0-d fp32 ``steps``;
every tensor contiguous and dense. ``lr`` is a number or a 0-d fp32 tensor on the params' device.
"""

import contextlib
import numbers
from collections import OrderedDict

import torch
from torch import Tensor

from ... import _native

CHUNK_SIZE = 65536  # elements per chunk = per CUDA block (apex: 2048 * 32)
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_TABLES = 64  # cached tables (LRU): a few per param group and dtype in a training loop
_tables: OrderedDict = OrderedDict()


def available(device) -> bool:
    """True if ``_C`` has the multi-tensor kernels for ``device`` ("cpu", or "cuda" with a GPU)."""
    device = torch.device(device)
    lib, _ = _native._load()
    if lib is None or not hasattr(lib, "multi_tensor_adamw_cpu"):
        return False
    if device.type == "cuda":  # built with CUDA, and for this GPU's architecture (or PTX that JITs to it)
        return _native.native_cuda_available(device)
    return device.type == "cpu"


def _call(name: str, device: torch.device, *args) -> None:
    if not available(device):
        raise RuntimeError(
            f"fastclip_kernels._C has no multi-tensor kernels for {device} (build_info: "
            f"{_native.build_info()}); rebuild with `pip install -e .` (nvcc for CUDA) or use reference.py"
        )
    _native._call(name, device, *args)


class _Table:
    """A device-resident metadata table and what it takes to use it safely from any stream."""

    __slots__ = ("tensor", "host", "num_tensors", "num_chunks", "event", "streams")

    def __init__(self, rows: list[tuple], device: torch.device):
        chunks = [
            x for i, row in enumerate(rows) for start in range(0, row[-1], CHUNK_SIZE) for x in (i, start)
        ]
        flat = [x for row in rows for x in row] + chunks
        self.num_tensors, self.num_chunks = len(rows), len(chunks) // 2
        self.host = torch.tensor(flat, dtype=torch.int64)
        self.event, self.streams = None, set()
        if device.type == "cuda":
            self.host = self.host.pin_memory()  # kept: a graph captured with the copy replays it
            self.tensor = self.host.to(device, non_blocking=True)
            stream = torch.cuda.current_stream(device)
            self.streams.add(stream.cuda_stream)
            if not torch.cuda.is_current_stream_capturing():
                self.event = torch.cuda.Event()
                self.event.record(stream)
        else:
            self.tensor = self.host

    def ptr(self, device: torch.device) -> int:
        """The table's address, after ordering the current stream behind the copy if needed.

        A stream other than the one that made the table is also recorded on the tensor
        (``record_stream``), so when the cache evicts the table the allocator waits for that stream's
        queued kernels before it hands the memory to anyone else."""
        if device.type == "cuda" and self.event is not None:
            stream = torch.cuda.current_stream(device)
            if stream.cuda_stream not in self.streams and not torch.cuda.is_current_stream_capturing():
                stream.wait_event(self.event)
                self.tensor.record_stream(stream)
                self.streams.add(stream.cuda_stream)
        return self.tensor.data_ptr()


def _table(rows: list[tuple], device: torch.device, fn: str | None = None) -> _Table:
    """The cached table of ``rows``, built on a miss (for an update ``fn``, after checking that no
    two rows write the same memory: a hit has passed that check)."""
    key = (device, CHUNK_SIZE, tuple(rows))
    table = _tables.pop(key, None)
    if table is None:
        if fn is not None:
            _check_distinct(fn, rows)
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            table = _Table(rows, device)
    _tables[key] = table  # most recently used last
    while len(_tables) > _MAX_TABLES:
        _tables.popitem(last=False)
    return table


def _check_tensor(fn, name, x, device, dtype, shape=None) -> int:
    """Checks one tensor of a list argument; returns its address."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{fn}: {name} is {x.layout}; sparse tensors are not supported")
    if x.device != device:
        raise ValueError(f"{fn}: {name} is on {x.device}, expected {device} (as params[0])")
    if x.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {x.dtype}, expected {dtype}")
    if shape is not None and x.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {tuple(x.shape)}, expected {tuple(shape)} (as the param)")
    if shape is None and x.numel() != 1:
        raise ValueError(f"{fn}: {name} must be a 0-d tensor, got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous")
    return x.data_ptr()


def _rows(fn, params, grads, exp_avgs, exp_avg_sqs, masters, steps):
    """Validates the lists; returns (device, param dtype, table rows), or None for empty lists."""
    lists = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs, "steps": steps}
    if masters is not None:
        lists["masters"] = masters
    for name, value in {"params": params, **lists}.items():
        if not isinstance(value, list | tuple):
            raise TypeError(f"{fn}: {name} must be a list of tensors, got {type(value).__name__}")
        if len(value) != len(params):
            raise ValueError(f"{fn}: {name} has {len(value)} entries, expected {len(params)} (as params)")
    if not params:
        return None
    if not isinstance(params[0], Tensor):
        raise TypeError(f"{fn}: params[0] must be a torch.Tensor, got {type(params[0]).__name__}")
    device, dtype = params[0].device, params[0].dtype
    if dtype not in PARAM_DTYPES:
        raise TypeError(f"{fn}: params have dtype {dtype}; the native kernels take {PARAM_DTYPES}")
    if masters is None and dtype != torch.float32:
        raise ValueError(f"{fn}: {dtype} params need fp32 masters (masters is None)")
    rows, f32 = [], torch.float32
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{fn}: params[{i}] must be a torch.Tensor, got {type(p).__name__}")
        shape = p.shape
        rows.append((
            _check_tensor(fn, f"params[{i}]", p, device, dtype, shape),
            _check_tensor(fn, f"grads[{i}]", grads[i], device, dtype, shape),
            _check_tensor(fn, f"exp_avgs[{i}]", exp_avgs[i], device, f32, shape),
            _check_tensor(fn, f"exp_avg_sqs[{i}]", exp_avg_sqs[i], device, f32, shape),
            _check_tensor(fn, f"masters[{i}]", masters[i], device, f32, shape) if masters is not None else 0,
            _check_tensor(fn, f"steps[{i}]", steps[i], device, f32),
            p.numel(),
        ))  # fmt: skip
    return device, dtype, rows


def _check_distinct(fn, rows) -> None:
    """Two rows updating the same memory would race on the GPU (the reference applies both)."""
    for col, name in ((0, "params"), (2, "exp_avgs"), (3, "exp_avg_sqs"), (4, "masters")):
        seen: dict = {}
        for i, row in enumerate(rows):
            if row[col] and row[-1] and seen.setdefault(row[col], i) != i:
                raise ValueError(f"{fn}: {name}[{i}] and {name}[{seen[row[col]]}] share memory")


def _number(fn, name, x) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(x).__name__}")
    return float(x)


def _scalar_tensor(fn, name, x, device) -> int:
    """Address of a 0-d fp32 tensor on ``device`` (read by the kernels), or 0 for None."""
    if x is None:
        return 0
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a 0-d fp32 tensor or None, got {type(x).__name__}")
    return _check_tensor(fn, name, x, device, torch.float32)


def _lr(fn, lr, device) -> tuple[float, int]:
    """(value, 0) for a number, (0.0, address) for a 0-d fp32 tensor on the params' device."""
    if isinstance(lr, Tensor):
        return 0.0, _scalar_tensor(fn, "lr", lr, device)
    return _number(fn, "lr", lr), 0


def adamw_(
    params, grads, exp_avgs, exp_avg_sqs, masters, steps, *, lr, beta1, beta2, eps, weight_decay,
    grad_scale=None,
):  # fmt: skip
    """One AdamW step over every tensor, in place, in one kernel launch (see reference.adamw_).

    Args:
        params, grads: [*] per tensor, fp32 (or fp16/bf16 with ``masters``), one dtype per call.
        exp_avgs, exp_avg_sqs: fp32 moments, shaped as the params. masters: fp32 or None.
        steps: 0-d fp32 counters, already incremented for this step.
        lr: number or 0-d fp32 device tensor; beta1, beta2, eps, weight_decay: numbers.
        grad_scale: None or a 0-d fp32 device tensor multiplying every gradient.

    Example:
        >>> p, g = [torch.ones(3)], [torch.ones(3)]
        >>> m, v, t = [torch.zeros(3)], [torch.zeros(3)], [torch.ones(())]
        >>> adamw_(p, g, m, v, None, t, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
        >>> p[0]  # first step: p - lr * sign(g)
        tensor([0.9000, 0.9000, 0.9000])
    """
    fn = "adamw_"
    hyper = [_number(fn, n, x) for n, x in (("beta1", beta1), ("beta2", beta2), ("eps", eps))]
    hyper.append(_number(fn, "weight_decay", weight_decay))
    plan = _rows(fn, params, grads, exp_avgs, exp_avg_sqs, masters, steps)
    if plan is None:
        return
    device, dtype, rows = plan
    lr_value, lr_ptr = _lr(fn, lr, device)
    scale_ptr = _scalar_tensor(fn, "grad_scale", grad_scale, device)
    table = _table(rows, device, fn)
    args = (table.ptr(device), table.num_tensors, table.num_chunks, CHUNK_SIZE, _native.DTYPE_CODES[dtype])
    _call("multi_tensor_adamw", device, *args, lr_value, lr_ptr, *hyper, scale_ptr)


def lamb_(
    params, grads, exp_avgs, exp_avg_sqs, masters, steps, *, lr, beta1, beta2, eps, weight_decay,
    bias_correction=True, grad_averaging=True, use_trust_ratio=True, grad_scale=None,
):  # fmt: skip
    """One LAMB step over every tensor, in place (see reference.lamb_): stage 1 updates the moments
    and sums ||w||^2, ||u||^2 per tensor on the device, stage 2 applies w -= lr * ratio * u; one
    launch each (one in all without the trust ratio). Arguments as :func:`adamw_`."""
    fn = "lamb_"
    hyper = [_number(fn, n, x) for n, x in (("beta1", beta1), ("beta2", beta2), ("eps", eps))]
    hyper.append(_number(fn, "weight_decay", weight_decay))
    flags = [bool(bias_correction), bool(grad_averaging), bool(use_trust_ratio)]
    plan = _rows(fn, params, grads, exp_avgs, exp_avg_sqs, masters, steps)
    if plan is None:
        return
    device, dtype, rows = plan
    lr_value, lr_ptr = _lr(fn, lr, device)
    scale_ptr = _scalar_tensor(fn, "grad_scale", grad_scale, device)
    table = _table(rows, device, fn)
    norms = torch.empty(2 * len(rows), dtype=torch.float32, device=device) if use_trust_ratio else None
    args = (table.ptr(device), table.num_tensors, table.num_chunks, CHUNK_SIZE, _native.DTYPE_CODES[dtype])
    norms_ptr = norms.data_ptr() if norms is not None else 0
    _call("multi_tensor_lamb", device, *args, lr_value, lr_ptr, *hyper, *flags, scale_ptr, norms_ptr)


def _grad_norm(fn, grads, max_norm):
    """(0-d fp32 global L2 norm, 0-d fp32 clip coefficient or None): one sum-of-squares launch per
    gradient dtype into one per-tensor buffer, then one tiny kernel for the norm (and coefficient)."""
    if not isinstance(grads, list | tuple):
        raise TypeError(f"{fn}: grads must be a list of tensors, got {type(grads).__name__}")
    if not grads:
        norm = torch.zeros(())
        return norm, (clip_coefficient(norm, max_norm) if max_norm is not None else None)
    device, by_dtype = getattr(grads[0], "device", None), {}
    for i, g in enumerate(grads):
        if not isinstance(g, Tensor):
            raise TypeError(f"{fn}: grads[{i}] must be a torch.Tensor, got {type(g).__name__}")
        if g.dtype not in PARAM_DTYPES:
            raise TypeError(f"{fn}: grads[{i}] has dtype {g.dtype}; the native kernels take {PARAM_DTYPES}")
        ptr = _check_tensor(fn, f"grads[{i}]", g, device, g.dtype, g.shape)
        by_dtype.setdefault(g.dtype, []).append((0, ptr, 0, 0, 0, 0, g.numel()))
    sq = torch.empty(len(grads), dtype=torch.float32, device=device)
    offset = 0
    for dtype, rows in by_dtype.items():
        table = _table(rows, device)
        args = (table.num_tensors, table.num_chunks, CHUNK_SIZE, _native.DTYPE_CODES[dtype])
        _call("multi_tensor_sq_norm", device, table.ptr(device), *args, sq.data_ptr() + 4 * offset)
        offset += len(rows)
    norm = torch.empty((), dtype=torch.float32, device=device)
    coef = torch.empty((), dtype=torch.float32, device=device) if max_norm is not None else None
    coef_ptr = coef.data_ptr() if coef is not None else 0
    _call("global_norm", device, sq.data_ptr(), len(grads), norm.data_ptr(), max_norm or 0.0, coef_ptr)
    return norm, coef


def global_grad_norm(grads) -> Tensor:
    """0-d fp32 L2 norm over all gradients (fp32, fp16, bf16; any mix), on their device.

    Example:
        >>> global_grad_norm([torch.full((4,), 1.5), torch.full((1,), 4.0, dtype=torch.bfloat16)])
        tensor(5.)
    """
    return _grad_norm("global_grad_norm", grads, None)[0]


def grad_norm_and_clip_coefficient(grads, max_norm: float) -> tuple[Tensor, Tensor]:
    """(global_grad_norm(grads), clip_coefficient(norm, max_norm)) from one reduction, on the device."""
    fn = "grad_norm_and_clip_coefficient"
    norm, coef = _grad_norm(fn, grads, _number(fn, "max_norm", max_norm))
    return norm, coef


def clip_coefficient(total_norm: Tensor, max_norm: float) -> Tensor:
    """min(1, max_norm / (total_norm + 1e-6)) for a 0-d fp32 ``total_norm``, computed on its device.

    Example:
        >>> clip_coefficient(torch.tensor(4.0), 1.0)
        tensor(0.2500)
    """
    fn = "clip_coefficient"
    max_norm = _number(fn, "max_norm", max_norm)
    if not isinstance(total_norm, Tensor):
        raise TypeError(f"{fn}: total_norm must be a 0-d fp32 tensor, got {type(total_norm).__name__}")
    ptr = _check_tensor(fn, "total_norm", total_norm, total_norm.device, torch.float32)
    out = torch.empty_like(total_norm)
    _call("clip_coefficient", total_norm.device, ptr, max_norm, out.data_ptr())
    return out
