"""Experiment runner: ``python -m training.experiments NAME [--out runs/experiments] [--results DIR]``.

An experiment is a declared grid of arms (command-line overrides of one base) x seeds, and the papers'
claims about it as *contrasts*: functions of the arms' scores that are > 0 when the claim holds. Each run
trains in its own process (a failed run is named at the end; the others go on) in
``<out>/<name>/<arm>-s<seed>`` and leaves a small record in ``<results>/<name>/<arm>-s<seed>.json``
(default ``benchmarks/results/experiments``, committed): its arguments, wall time, final metrics and the
per-test-image retrieval hits that every interval is computed from. A run whose record exists is skipped
(resumable across machines and sessions: commit the records).

Score of a run: the mean of the six retrieval recalls (R@1/5/10, image->text and text->image) on the
Flickr8k test split, at the resolution and text length the run was last trained at. Per arm: the mean over
seeds. Per contrast: its value on each seed (paired by seed), their mean, and a 95 % bootstrap interval of
that mean: test images are resampled with replacement (each image's captions follow it; ranks stay those
of the full gallery), the same resamples for every run, and the interval is the 2.5 / 97.5 percentiles.
Verdict: "reproduces" when the contrast is > 0 on every seed and the interval excludes 0, "opposite" when
it is < 0 on every seed and the interval excludes 0, else "not shown". The bootstrap covers the test
sample; the seeds cover training noise only through the every-seed sign rule (3 seeds are too few for a
useful interval over seeds; their spread is reported). Written next to the records: ``report.json``,
``report.md`` (markdown tables), ``report.png``. Contrasts whose arms are not all finished are "pending".

    python -m training.experiments fastclip            # rgcl_g vs clip at two batch sizes, 3 seeds
    python -m training.experiments laclip --arms laclip --seeds 0   # one run of the grid
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from .contrasts import (
    BOOTSTRAP_SAMPLES,
    Contrast,
    bootstrap_weights,
    contrast_interval,
    difference,
    gap_growth,
    per_image_score,
    share_gap,
    verdict,
    weighted_score,
)
from .experiment_specs import EXPERIMENTS, Experiment

__all__ = [
    "EXPERIMENTS",
    "Contrast",
    "Experiment",
    "bootstrap_weights",
    "contrast_interval",
    "difference",
    "gap_growth",
    "per_image_score",
    "run",
    "share_gap",
    "verdict",
]

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results",
                       "experiments")  # fmt: skip


# -- records ---------------------------------------------------------------------------------------
def final_embeddings(run_dir: str) -> dict:
    folder = os.path.join(run_dir, "embeddings")
    files = [f for f in os.listdir(folder) if f.startswith("step_")] if os.path.isdir(folder) else []
    if not files:
        raise FileNotFoundError(f"{run_dir}: no saved embeddings (embeddings/step_*.pt)")
    last = max(files, key=lambda p: int(p[len("step_") : -len(".pt")]))
    return torch.load(os.path.join(folder, last), weights_only=True)


def make_record(run_dir: str, argv: list[str], seconds: float | None) -> dict:
    """The run's committed record: arguments, time, final metrics, per-image hits (integers)."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    emb = final_embeddings(run_dir)
    i2t, t2i, n_caps = per_image_score(emb)
    return {"argv": argv, "seconds": seconds, "metrics": metrics, "text_length": int(emb.get("text_length", 0)),
            "step": int(emb.get("step", 0)),
            "per_image": {"i2t": i2t.long().T.tolist(), "t2i": t2i.long().T.tolist(),
                          "n_captions": n_caps.long().tolist()}}  # fmt: skip


def record_parts(rec: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = rec["per_image"]
    return (torch.tensor(p["i2t"], dtype=torch.float64).T, torch.tensor(p["t2i"], dtype=torch.float64).T,
            torch.tensor(p["n_captions"], dtype=torch.float64))  # fmt: skip


def _write_record(path: str, rec: dict) -> None:
    """Write ``rec`` to ``path`` atomically (an interrupted write leaves no record, so the run reruns)."""
    with open(path + ".tmp", "w") as f:
        json.dump(rec, f, separators=(",", ":"))
    os.replace(path + ".tmp", path)


def _child_env() -> dict:
    """This environment, with the folder holding this ``training`` package first on PYTHONPATH (a run's
    process imports the same code as the runner, from any working directory)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


def _configuration(argv: list[str]) -> list[str]:
    """``argv`` without the options that only name where a run writes (they do not change training)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--run.output_dir", "--run.name"):
            skip = True
        else:
            out.append(a)
    return out


def _identical_record(results: str, argv: list[str], seed: int) -> tuple[str, dict] | None:
    """A finished record (``experiment/arm-sSEED``, record) of any experiment under ``results`` whose
    run had exactly this configuration (same arguments in the same order, same seed), else None."""
    want = _configuration(argv)
    for exp_name in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        folder = os.path.join(results, exp_name)
        for fname in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if not fname.endswith(f"-s{seed}.json") or fname.startswith("report"):
                continue
            with open(os.path.join(folder, fname)) as f:
                rec = json.load(f)
            if rec.get("seed") == seed and "reused_from" not in rec and _configuration(rec["argv"]) == want:
                return f"{exp_name}/{fname[: -len('.json')]}", rec
    return None


# -- running and reporting -------------------------------------------------------------------------
def run(name: str, out: str = "runs/experiments", results: str = RESULTS, report_only: bool = False,
        train_fn=None, arms=None, seeds=None) -> dict:  # fmt: skip
    """Run the missing runs of experiment ``name`` (all, or those of ``arms`` x ``seeds``; none when
    ``report_only``), then write the report over the finished ones. Each run trains in its own process
    (``python -m training.train``), or through ``train_fn(cfg)`` in this one when given; a run that fails
    does not stop the others, and ``RuntimeError`` names the failed runs after the report is written."""
    from .config import parse_args

    exp = EXPERIMENTS[name]
    unknown = sorted(set(arms or ()) - set(exp.arms))
    if unknown:
        raise ValueError(f"arms: {unknown} not in experiment {name!r} (arms: {', '.join(exp.arms)})")
    folder = os.path.join(results, name)
    os.makedirs(folder, exist_ok=True)
    # seed-major: an interrupted experiment leaves whole seeds (every arm) finished
    todo = [
        (a, s) for s in exp.seeds for a in exp.arms if (not arms or a in arms) and (not seeds or s in seeds)
    ]
    failed = []
    for arm, seed in [] if report_only else todo:
        record_path = os.path.join(folder, f"{arm}-s{seed}.json")
        if os.path.exists(record_path):
            continue
        missing = [p for p in exp.needs if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"experiment {name!r} needs {missing} (see its comment in EXPERIMENTS)")
        run_dir = os.path.join(out, name, f"{arm}-s{seed}")
        argv = [*exp.base, *exp.arms[arm], "--run.seed", str(seed), "--run.output_dir", os.path.join(out, name),
                "--run.name", f"{arm}-s{seed}"]  # fmt: skip
        same = _identical_record(results, argv, seed)
        if same is not None:  # another experiment already ran this exact configuration: reuse it
            _write_record(record_path, {**same[1], "experiment": name, "arm": arm, "seed": seed,
                                        "reused_from": same[0]})  # fmt: skip
            continue
        seconds = None
        if not os.path.exists(os.path.join(run_dir, "metrics.json")):
            cfg = parse_args(argv)  # a bad declaration stops the experiment here: it is not a failed run
            tic = time.perf_counter()
            try:
                if train_fn is not None:
                    train_fn(cfg)
                else:  # a fresh process per run: its heap and loader workers end with it
                    rc = subprocess.run(
                        [sys.executable, "-m", "training.train", *argv], env=_child_env()
                    ).returncode
                    if rc != 0:
                        raise RuntimeError(f"python -m training.train exited with {rc}")
            except Exception as err:  # one failed run does not stop the others
                failed.append(f"{arm}-s{seed} ({err})")
                print(f"experiment {name}: run {arm}-s{seed} failed: {err}; going on", file=sys.stderr)
                continue
            seconds = round(time.perf_counter() - tic, 1)
        _write_record(record_path, {"experiment": name, "arm": arm, "seed": seed,
                                    **make_record(run_dir, argv, seconds)})  # fmt: skip
    rep = report(name, folder)
    if failed:
        raise RuntimeError(f"experiment {name}: runs failed: {', '.join(failed)} (the others are recorded; "
                           "rerun to retry them)")  # fmt: skip
    return rep


def report(name: str, folder: str) -> dict:
    exp = EXPERIMENTS[name]
    records = {}
    for arm in exp.arms:
        for seed in exp.seeds:
            path = os.path.join(folder, f"{arm}-s{seed}.json")
            if os.path.exists(path):
                with open(path) as f:
                    records[arm, seed] = json.load(f)
    parts = {k: record_parts(r) for k, r in records.items()}
    n_images = {p[0].shape[0] for p in parts.values()}
    if len(n_images) > 1:
        raise ValueError(f"{folder}: records with different test sets ({sorted(n_images)} images)")
    weights = bootstrap_weights(n_images.pop()) if parts else None
    full = None if weights is None else torch.ones(1, weights.shape[1], dtype=torch.float64)
    arms = []
    for arm in exp.arms:
        done = [s for s in exp.seeds if (arm, s) in parts]
        scores = {str(s): float(weighted_score(parts[arm, s], full)) for s in done}
        secs = [records[arm, s]["seconds"] for s in done if records[arm, s]["seconds"]]
        arms.append({"arm": arm, "args": list(exp.arms[arm]), "seeds_done": done, "per_seed": scores,
                     "mean_recall": sum(scores.values()) / len(scores) if scores else None,
                     "minutes_per_run": round(sum(secs) / len(secs) / 60, 1) if secs else None})  # fmt: skip
    contrasts = []
    for c in exp.contrasts:
        if all((a, s) in parts for a in c.arms for s in exp.seeds):
            contrasts.append(contrast_interval(c, parts, exp.seeds, weights))
        else:
            contrasts.append({"contrast": c.name, "claim": c.claim, "verdict": "pending"})
    out = {"experiment": name, "paper": exp.paper, "note": exp.note, "proper_test": exp.proper_test,
           "seeds": list(exp.seeds),
           "base": list(exp.base), "metric": "mean of R@1/5/10 i2t and t2i (Flickr8k test)",
           "bootstrap_samples": BOOTSTRAP_SAMPLES, "arms": arms, "contrasts": contrasts}  # fmt: skip
    with open(os.path.join(folder, "report.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(folder, "report.md"), "w") as f:
        plot = (
            f"\n![{out['experiment']}](report.png)\n"
            if any(c["verdict"] != "pending" for c in out["contrasts"])
            else ""
        )
        f.write(markdown(out) + "\n" + plot)
    _plot(out, os.path.join(folder, "report.png"))
    return out


def _pp(v) -> str:
    return f"{100 * v:+.2f}"


def _unit(c: dict) -> str:
    """The unit after a contrast's mean where it is not the table's (pp of mean recall)."""
    return "" if c["unit"] == "pp" else f" {c['unit']}"


def markdown(rep: dict) -> str:
    seeds = len(rep["seeds"])
    lines = ["| arm | mean recall (%) | per seed (%) | minutes / run |", "|---|---|---|---|"]
    for r in rep["arms"]:
        mean = "" if r["mean_recall"] is None else f"{100 * r['mean_recall']:.2f}"
        per = ", ".join(f"{100 * v:.2f}" for v in r["per_seed"].values())
        done = "" if len(r["seeds_done"]) == seeds else f" ({len(r['seeds_done'])}/{seeds} seeds)"
        lines.append(f"| {r['arm']} | {mean}{done} | {per} | {r['minutes_per_run'] or ''} |")
    lines += ["", "| claim | contrast | mean (pp) | 95 % interval (pp) | per seed (pp) | verdict |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for c in rep["contrasts"]:
        if c["verdict"] == "pending":
            lines.append(f"| {c['claim']} | {c['contrast']} | | | | pending |")
            continue
        per = ", ".join(_pp(v) for v in c["per_seed"].values())
        lines.append(f"| {c['claim']} | {c['contrast']} | {_pp(c['mean'])}{_unit(c)} | "
                     f"[{_pp(c['lo'])}, {_pp(c['hi'])}] | {per} | {c['verdict']} |")  # fmt: skip
    return "\n".join(lines)


def _plot(rep: dict, path: str) -> None:
    """Top: each arm's score per seed and its mean; below: the contrasts (mean, 95 % interval, seeds), one
    panel per unit (a share's points are not recall's)."""
    rows = [c for c in rep["contrasts"] if c["verdict"] != "pending"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not rows:
        return
    units = list(dict.fromkeys(c["unit"] for c in rows))
    groups = [[c for c in rows if c["unit"] == u] for u in units]
    arms = [a for a in rep["arms"] if a["per_seed"]]
    heights = [0.6 + 0.4 * len(arms)] + [0.6 + 0.45 * len(g) for g in groups]
    fig, axes = plt.subplots(len(heights), 1, figsize=(9, 1.0 * len(heights) + sum(heights)),
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    ax = axes[0]
    for y, a in enumerate(arms):
        ax.plot([100 * v for v in a["per_seed"].values()], [y] * len(a["per_seed"]), "x", color="gray")
        ax.plot(100 * a["mean_recall"], y, "o", color="black")
    ax.set_yticks(range(len(arms)), [a["arm"] for a in arms])
    ax.invert_yaxis()  # the declared order, top down
    ax.set_xlabel("mean recall, % (dot: mean over seeds, x: seeds)")
    ax.set_title(rep["experiment"])
    for ax, unit, group in zip(axes[1:], units, groups, strict=True):
        for y, c in enumerate(group):
            ax.errorbar(100 * c["mean"], y, xerr=[[100 * (c["mean"] - c["lo"])], [100 * (c["hi"] - c["mean"])]],
                        fmt="o", color="black")  # fmt: skip
            ax.plot([100 * v for v in c["per_seed"].values()], [y] * len(c["per_seed"]), "x", color="gray")
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_yticks(range(len(group)), [c["contrast"] for c in group])
        ax.invert_yaxis()
        what = "pp of mean recall" if unit == "pp" else unit
        ax.set_xlabel(f"{what} (dot: mean, bar: 95 % interval, x: seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.experiments", description=__doc__.split("\n")[0]
    )
    parser.add_argument("name", choices=sorted(EXPERIMENTS))
    parser.add_argument("--out", default="runs/experiments", help="where runs train (checkpoints, logs)")
    parser.add_argument("--results", default=RESULTS, help="where records and the report go")
    parser.add_argument("--arms", nargs="*", help="only these arms (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, help="only these seeds (default: all)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    rep = run(args.name, args.out, args.results, args.report_only, arms=args.arms, seeds=args.seeds)
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
