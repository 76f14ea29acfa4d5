"""Experiment runner: ``python -m training.experiments <name> [--out runs/experiments] [--report-only]``.

An experiment is a declared grid of arms (command-line overrides of one base) x seeds. Each run goes to
``<out>/<name>/<arm>-s<seed>`` and is skipped when its ``metrics.json`` exists (resumable). The report
scores every run by the mean of the six retrieval recalls (R@1/5/10, image->text and text->image) of
its final saved test-set embeddings, gives each arm's mean over seeds and, for every other arm, the
mean paired difference to the baseline arm (paired by seed) with a 95 % bootstrap interval: test
images are resampled with replacement (each image's captions follow it; ranks stay those of the full
gallery), the same resamples for every run, and the interval is the 2.5 / 97.5 percentiles of the
resampled mean difference. Written: ``report.json``, ``report.md`` (a markdown table), ``report.png``.

    python -m training.experiments miniatures            # the Flickr8k miniature arms, 3 seeds
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from dataclasses import dataclass

import torch

__all__ = ["EXPERIMENTS", "Experiment", "bootstrap_weights", "paired_interval", "per_image_score", "run"]

KS = (1, 5, 10)
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0

_MINI = ["--preset", "flickr8k", "--train.epochs", "8", "--clipa.stage2_epochs", "0", "--eval.every_steps", "0",
         "--eval.zeroshot_path", "", "--log.progress_bar", "false"]  # fmt: skip


@dataclass(frozen=True)
class Experiment:
    """``arms``: name -> extra arguments after ``base``; ``baseline``: the arm differences refer to."""

    base: tuple[str, ...]
    arms: dict
    seeds: tuple[int, ...]
    baseline: str


EXPERIMENTS = {
    # LaCLIP-style caption sampling vs the first caption (CLIPA stage 1 only, 8 epochs, 64 px, 16 tokens).
    "miniatures": Experiment(
        base=tuple(_MINI),
        arms={
            "first-caption": ("--data.caption_sampling", "none"),
            "laclip": ("--data.caption_sampling", "laclip"),
        },
        seeds=(0, 1, 2),
        baseline="first-caption",
    ),
    # LLM2CLIP's adapter over raw vs caption-contrastive-tuned MiniLM (needs the two embedding caches of
    # ``python -m training.llm2clip.cache``, see README) vs the transformer text tower.
    "llm2clip": Experiment(
        base=tuple(_MINI),
        arms={
            "transformer": ("--data.caption_sampling", "laclip"),
            "adapter-raw": ("--model.text_tower", "adapter", "--data.text_embeddings", "runs/emb-raw"),
            "adapter-cc": ("--model.text_tower", "adapter", "--data.text_embeddings", "runs/emb-cc"),
        },
        seeds=(0, 1, 2),
        baseline="transformer",
    ),
}


# -- scoring ---------------------------------------------------------------------------------------
def per_image_score(emb: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From saved embeddings {"image" [N_i, E], "text" [N_t, E], "owner" [N_t]}: (i2t hits [N_i, 3],
    t2i hit counts over each image's captions [N_i, 3], captions per image [N_i]), for k = 1, 5, 10."""
    img, txt, owner = emb["image"].double(), emb["text"].double(), emb["owner"].long()
    sims = img @ txt.T
    n_i, n_t = sims.shape
    i2t = sims.topk(min(max(KS), n_t), dim=1).indices
    i2t_hit = owner[i2t] == torch.arange(n_i).view(-1, 1)  # [N_i, k]
    t2i = sims.T.topk(min(max(KS), n_i), dim=1).indices
    t2i_hit = t2i == owner.view(-1, 1)  # [N_t, k]
    i2t_k = torch.stack([i2t_hit[:, :k].any(1) for k in KS], 1).double()
    t2i_k = torch.stack([t2i_hit[:, :k].any(1) for k in KS], 1).double()
    t2i_per_image = torch.zeros(n_i, len(KS), dtype=torch.float64).index_add_(0, owner, t2i_k)
    return i2t_k, t2i_per_image, torch.bincount(owner, minlength=n_i).double()


def weighted_score(parts, weights: torch.Tensor) -> torch.Tensor:
    """Mean of the six recalls with image weights [R, N_i] (a resample's counts) -> [R]."""
    i2t, t2i, n_caps = parts
    i2t_r = weights @ i2t / weights.sum(1, keepdim=True)  # [R, 3]
    t2i_r = weights @ t2i / (weights @ n_caps).unsqueeze(1)  # [R, 3]
    return torch.cat([i2t_r, t2i_r], 1).mean(1)


def bootstrap_weights(n_images: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED):
    """[samples, n_images] counts of each image in each resample (with replacement)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_images, (samples, n_images), generator=gen)
    return torch.zeros(samples, n_images, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64)
    )


def paired_interval(arm_parts: list, base_parts: list, weights: torch.Tensor) -> dict:
    """Mean over seeds of (arm - baseline) on the full set, and its 95 % bootstrap interval: per
    resample, the mean over seeds of the paired difference; the 2.5 / 97.5 percentiles."""
    full = torch.ones(1, weights.shape[1], dtype=torch.float64)
    diff = [
        weighted_score(a, full) - weighted_score(b, full) for a, b in zip(arm_parts, base_parts, strict=True)
    ]
    boot = torch.stack([weighted_score(a, weights) - weighted_score(b, weights)
                        for a, b in zip(arm_parts, base_parts, strict=True)]).mean(0)  # fmt: skip
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": float(torch.cat(diff).mean()), "lo": lo, "hi": hi}


def final_embeddings(run_dir: str) -> dict:
    files = glob.glob(os.path.join(run_dir, "embeddings", "step_*.pt"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no saved embeddings (embeddings/step_*.pt)")
    last = max(files, key=lambda p: int(os.path.basename(p)[5:-3]))
    return torch.load(last, weights_only=True)


# -- running and reporting -------------------------------------------------------------------------
def run(name: str, out: str = "runs/experiments", report_only: bool = False, train_fn=None) -> dict:
    """Run the missing runs of experiment ``name`` (unless ``report_only``), then write the report."""
    from .config import parse_args
    from .train import train

    exp, root = EXPERIMENTS[name], os.path.join(out, name)
    for arm, extra in exp.arms.items():
        for seed in exp.seeds:
            run_dir = os.path.join(root, f"{arm}-s{seed}")
            if report_only or os.path.exists(os.path.join(run_dir, "metrics.json")):
                continue
            argv = [
                *exp.base,
                *extra,
                "--run.seed",
                str(seed),
                "--run.output_dir",
                root,
                "--run.name",
                f"{arm}-s{seed}",
            ]
            (train_fn or train)(parse_args(argv))
    return report(exp, root)


def report(exp: Experiment, root: str) -> dict:
    parts = {
        (a, s): per_image_score(final_embeddings(os.path.join(root, f"{a}-s{s}")))
        for a in exp.arms
        for s in exp.seeds
    }
    n_images = next(iter(parts.values()))[0].shape[0]
    weights, full = bootstrap_weights(n_images), torch.ones(1, n_images, dtype=torch.float64)
    rows = []
    for arm in exp.arms:
        scores = [float(weighted_score(parts[arm, s], full)) for s in exp.seeds]
        row = {
            "arm": arm,
            "mean_recall": sum(scores) / len(scores),
            "per_seed": dict(zip(exp.seeds, scores, strict=True)),
        }
        if arm != exp.baseline:
            arm_p, base_p = [parts[arm, s] for s in exp.seeds], [parts[exp.baseline, s] for s in exp.seeds]
            row["vs_baseline"] = paired_interval(arm_p, base_p, weights)
        rows.append(row)
    out = {"baseline": exp.baseline, "seeds": list(exp.seeds), "metric": "mean of R@1/5/10 i2t and t2i",
           "bootstrap_samples": int(weights.shape[0]), "n_images": n_images, "arms": rows}  # fmt: skip
    with open(os.path.join(root, "report.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(root, "report.md"), "w") as f:
        f.write(markdown(out) + "\n")
    _plot(out, os.path.join(root, "report.png"))
    return out


def markdown(rep: dict) -> str:
    lines = [
        f"| arm | mean recall (%) | vs {rep['baseline']} (pp) | 95 % interval (pp) |",
        "|---|---|---|---|",
    ]
    for r in rep["arms"]:
        d = r.get("vs_baseline")
        diff = "" if d is None else f"{100 * d['diff']:+.2f}"
        ci = "" if d is None else f"[{100 * d['lo']:+.2f}, {100 * d['hi']:+.2f}]"
        lines.append(f"| {r['arm']} | {100 * r['mean_recall']:.2f} | {diff} | {ci} |")
    return "\n".join(lines)


def _plot(rep: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    arms = [r for r in rep["arms"] if "vs_baseline" in r]
    fig, ax = plt.subplots(figsize=(5, 1 + 0.5 * max(1, len(arms))))
    for y, r in enumerate(arms):
        d = r["vs_baseline"]
        ax.errorbar(
            100 * d["diff"], y, xerr=[[100 * (d["diff"] - d["lo"])], [100 * (d["hi"] - d["diff"])]], fmt="o"
        )
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(range(len(arms)), [r["arm"] for r in arms])
    ax.set_xlabel(f"mean recall - {rep['baseline']} (pp, 95 % interval)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.experiments", description=__doc__.split("\n")[0]
    )
    parser.add_argument("name", choices=sorted(EXPERIMENTS))
    parser.add_argument("--out", default="runs/experiments")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    print(markdown(run(args.name, args.out, args.report_only)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
