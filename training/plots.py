"""PNG plots of a run from its CSV logs: ``python -m training.plots runs/<name>``.

One figure, ``plots.png``: training loss, temperature tau (and gamma for FastCLIP losses) and the
evaluation metrics (zero-shot top-1, retrieval R@1/5/10) against the step; CLIPA's stage change is
marked. Needs matplotlib (``pip install matplotlib``); without it ``plot_run`` says so and returns None.
"""

from __future__ import annotations

import csv
import os
import sys

__all__ = ["plot_run"]

EVAL_KEYS = ("zeroshot_top1", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r5", "i2t_r10", "t2i_r10")


def _read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_run(run_dir: str, out: str | None = None) -> str | None:
    """Write ``<run_dir>/plots.png`` (or ``out``) from log.csv and eval.csv; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: pip install matplotlib", file=sys.stderr)
        return None
    log, evals = _read(os.path.join(run_dir, "log.csv")), _read(os.path.join(run_dir, "eval.csv"))
    if not log:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    axes[0].plot(*_series(log, "loss"))
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot(*_series(log, "tau"), label="tau")
    if any(r.get("gamma") for r in log):
        axes[1].plot(*_series(log, "gamma"), label="gamma")
    axes[1].set(title="temperature / inner LR", xlabel="step", yscale="log")
    axes[1].legend()
    plotted = 0
    for key in EVAL_KEYS:
        steps, values = _series(evals, key)
        if steps:
            axes[2].plot(steps, values, marker="o", label=key)
            plotted += 1
    axes[2].set(title="evaluation", xlabel="step", ylim=(0, 1))
    if plotted:
        axes[2].legend(fontsize=8)
    stage2 = next((int(r["step"]) for r in log if r.get("stage") == "2"), None)
    for ax in axes if stage2 is not None else ():
        ax.axvline(stage2, color="gray", linestyle=":", linewidth=1)
    path = out or os.path.join(run_dir, "plots.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m training.plots RUN_DIR")
    print(plot_run(sys.argv[1]) or "no plot written")
