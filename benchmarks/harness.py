"""Shared benchmark harness: timing callables, peak memory, FLOP model, result rows.

GPU: pytest-benchmark times a callable that ends with torch.cuda.synchronize(); peak memory from
torch.cuda.max_memory_allocated. CPU: torch has no allocator statistics, so peak memory is measured
in a fresh spawned process as the growth of its peak resident set (VmHWM) over the inputs.
"""

import multiprocessing as mp
import os
import platform
import resource
import statistics
import subprocess

import torch

GIB = 1024**3


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def machine() -> dict:
    """Machine, versions and commit for a result row."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
    except OSError:
        sha = ""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return {
        "gpu": gpu,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": sha,
    }


def clip_loss_flops(b: int, n: int, d: int, mode: str) -> int:
    """Matmul FLOPs of open_clip's formula: 2 logit matmuls forward, 4 more backward."""
    per_matmul = 2 * b * n * d
    return per_matmul * (2 if mode == "fwd" else 6)


def fwd_bwd_callable(loss_fn, inputs, mode: str):
    """A callable running the loss forward (and backward) once, synchronized."""

    def run():
        loss = loss_fn(*inputs)
        if mode == "fwd+bwd":
            loss.backward()
        sync()

    return run


def cuda_peak_bytes(fn) -> int:
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    return torch.cuda.max_memory_allocated() - base


def _peak_rss_kib() -> int:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec, so
    a spawned child would report the (larger) parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _cpu_peak_child(make_case, args, queue):
    fn = make_case(*args)
    base_kib = _peak_rss_kib()
    fn()
    queue.put((_peak_rss_kib() - base_kib) * 1024)


def cpu_peak_bytes(make_case, *args) -> int:
    """Peak RSS growth of ``make_case(*args)()`` in a fresh process (make_case: module-level)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_peak_child, args=(make_case, args, queue))
    proc.start()
    peak = queue.get(timeout=1800)
    proc.join()
    return peak


def peak_bytes(make_case, *args) -> int:
    return (
        cuda_peak_bytes(make_case(*args)) if torch.cuda.is_available() else cpu_peak_bytes(make_case, *args)
    )


def run_loss_benchmark(benchmark, record, bench, make_case, provider, shape, dtype, mode, rounds):
    """Time ``make_case(provider, b, n, d, dtype, mode, device)()``, measure its peak, record a row."""
    import pytest

    b, n, d = shape
    dev = device()
    row = dict(bench=bench, shape=f"b{b}-N{n}-d{d}-{dtype}", provider=provider, mode=mode)
    try:
        fn = make_case(provider, b, n, d, dtype, mode, dev)
        fn()  # warm up: Triton / torch.compile compile on the first call
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
        peak = peak_bytes(make_case, provider, b, n, d, dtype, mode, dev)
    except torch.OutOfMemoryError:
        record(**row, median_ms="OOM", peak_gib="OOM", tflops="")
        pytest.skip(f"{provider} does not fit at b={b}, N={n}")
    median = statistics.median(benchmark.stats.stats.data)
    tflops = clip_loss_flops(b, n, d, mode) / median / 1e12
    benchmark.extra_info.update(peak_gib=peak / GIB, tflops=tflops)
    record(**row, median_ms=f"{median * 1e3:.2f}", peak_gib=f"{peak / GIB:.4f}", tflops=f"{tflops:.3f}")
