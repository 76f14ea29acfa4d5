"""What a run reports (rank 0): the log line, ``log.csv`` / ``eval.csv``, a progress bar on
interactive terminals, optional TensorBoard events, model FLOPs utilization, peak memory, and PNG
plots of loss, temperature and evaluation metrics at the end.

MFU = achieved model FLOP/s / the device's dense bf16 peak. Model FLOPs per step are 3x the forward
(forward + backward) of both towers on the tokens actually computed (kept patches + class token,
packed text), counted as 2 per multiply-add: per layer 24 n D^2 (QKV, output, 4x MLP) + 4 n^2 D
(scores and values) for a sequence of n tokens and width D, plus the patch and output projections.
The peak is looked up from the GPU's name (``FASTCLIP_PEAK_FLOPS`` overrides it); on a CPU the MFU
column is empty.
"""

from __future__ import annotations

import csv
import os
import resource
import sys

import torch

__all__ = ["CSVLog", "Monitor", "peak_flops", "peak_memory_gib", "step_flops"]

# dense bf16 tensor-core peaks, FLOP/s
_PEAKS = {
    "H200": 989.4e12,
    "H100": 989.4e12,
    "H800": 989.4e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
}


def peak_flops(device: torch.device) -> float | None:
    if os.environ.get("FASTCLIP_PEAK_FLOPS"):
        return float(os.environ["FASTCLIP_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAKS.items() if k in name), None)


def release_free_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``); False where there is none.

    On a CPU the towers' activations change shape from step to step (packed text of varying length),
    and glibc's heap fragments: without this, a flickr8k run's resident set grew by about 50 MB per
    step at 112 px (to 10 GiB over a run), although nothing was leaked. Cheap: the loop calls it at log
    steps on CPU runs."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    return bool(_MALLOC_TRIM and _MALLOC_TRIM(0) is not None)


_MALLOC_TRIM = None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or on a CPU the process's peak resident set size, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _tower_flops(seq_lens: list[int], width: int, layers: int) -> float:
    tokens, squares = sum(seq_lens), sum(n * n for n in seq_lens)  # host ints: no tensor per step
    return float(layers * (24 * tokens * width**2 + 4 * squares * width))


def step_flops(dims: dict, image_tokens: list[int], text_lengths: list[int]) -> float:
    """Model FLOPs of one training step (forward + backward) for one rank's batch.

    dims: ``TrainConfig.model_dims()``; image_tokens: patches computed per image (excluding the
    class token); text_lengths: tokens per caption."""
    d, p, out = dims["vision_width"], dims["patch_size"], dims["output_dim"]
    vision = _tower_flops([k + 1 for k in image_tokens], d, dims["vision_layers"])
    vision += 2 * sum(image_tokens) * 3 * p * p * d + 2 * len(image_tokens) * d * out
    text = _tower_flops(text_lengths, dims["text_width"], dims["text_layers"])
    text += 2 * len(text_lengths) * dims["text_width"] * out
    return 3.0 * (vision + text)


class CSVLog:
    """Append rows (dicts) to a CSV file; the header comes from the first row of a new file."""

    def __init__(self, path):
        self.path = path

    def write(self, row: dict) -> None:
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


class Monitor:
    """Rank 0's outputs for a run in ``run_dir``; on other ranks (``enabled=False``) every call is a no-op."""

    def __init__(self, cfg, run_dir: str, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled, self.run_dir = enabled, run_dir
        self.bar = self.tb = None
        if not enabled:
            return
        self.log_csv = CSVLog(os.path.join(run_dir, "log.csv"))
        self.eval_csv = CSVLog(os.path.join(run_dir, "eval.csv"))
        if cfg.log_progress_bar and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        if cfg.log_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("log.tensorboard=true needs TensorBoard: pip install tensorboard") from e
            self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def _print(self, line: str) -> None:
        (self.bar.write if self.bar is not None else print)(line)
        sys.stdout.flush()

    def advance(self) -> None:
        """One step on the bar (no device read: the bar shows the loss of the last ``log`` row)."""
        if self.bar is not None:
            self.bar.update(1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None and "loss" in row:
            self.bar.set_postfix(loss=f"{float(row['loss']):.4f}", refresh=False)
        self.log_csv.write(row)
        self._print(" ".join(f"{k}={v}" for k, v in row.items() if v != ""))  # CSV keeps every column
        self._scalars("train", row)

    def eval(self, row: dict) -> None:
        if not self.enabled:
            return
        self.eval_csv.write(row)
        self._print(
            "eval " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        )
        self._scalars("eval", row)

    def _scalars(self, prefix: str, row: dict) -> None:
        if self.tb is None:
            return
        for k, v in row.items():
            try:
                self.tb.add_scalar(f"{prefix}/{k}", float(v), int(row["step"]))
            except (TypeError, ValueError):
                continue  # empty cells (e.g. MFU on a CPU)

    def close(self, plot: bool = True) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if plot:
            from .plots import plot_run

            path = plot_run(self.run_dir)
            if path:
                self._print(f"plots: {path}")
