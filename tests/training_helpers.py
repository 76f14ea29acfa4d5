"""Shared pieces of the training-loop tests: the demo preset at test size, and reading a run's CSV logs."""

import csv
import os


def tiny_argv(num_samples: int, *extra: str) -> list[str]:
    """The demo preset shrunk for tests: ``num_samples`` scenes, batch 16, loader in-process, a log
    row every step, no intermediate evaluation or checkpoints, 2 warmup steps, a 128-token vocabulary."""
    return [
        "--preset", "demo", "--data.num_samples", str(num_samples), "--train.batch_size", "16",
        "--data.num_workers", "0", "--log.every_steps", "1", "--eval.every_steps", "0", "--ckpt.every_steps", "0",
        "--optim.warmup_steps", "2", "--data.vocab_size", "128", *extra,
    ]  # fmt: skip


def csv_rows(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def logged_losses(run_dir) -> dict[int, str]:
    """{step: loss as logged (the exact text)} from ``<run_dir>/log.csv``."""
    return {int(r["step"]): r["loss"] for r in csv_rows(os.path.join(run_dir, "log.csv"))}
