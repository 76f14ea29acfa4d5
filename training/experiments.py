"""Experiment runner: ``python -m training.experiments NAME [--out runs/experiments] [--results DIR]``.

An experiment is a declared grid of arms (command-line overrides of one base) x seeds, and the papers'
claims about it as *contrasts*: functions of the arms' scores that are > 0 when the claim holds. Each run
trains in ``<out>/<name>/<arm>-s<seed>`` and leaves a small record in ``<results>/<name>/<arm>-s<seed>.json``
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
import sys
import time
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class Experiment:
    """``arms``: name -> extra arguments after ``base``; ``contrasts``: the claims tested; ``paper``: what
    the paper reports (quoted for the README); ``note``: how this miniature differs from the paper."""

    base: tuple[str, ...]
    arms: dict
    seeds: tuple[int, ...] = (0, 1, 2)
    contrasts: tuple[Contrast, ...] = ()
    paper: str = ""
    note: str = ""
    proper_test: str = (
        ""  # what a test of the claim at the paper's scale needs (for "not shown" / "opposite")
    )
    needs: tuple[str, ...] = field(default=())  # files the arms read (checked before training)


# The miniature: Flickr8k train split (6,000 images), the "small" model, CLIPA stage 1 at 64 px (16
# patches) and 16 text tokens (the flickr8k preset), no intermediate evaluation, no zero-shot set.
_MINI = ("--preset", "flickr8k", "--clipa.stage2_epochs", "0", "--eval.every_steps", "0",
         "--eval.zeroshot_path", "", "--log.progress_bar", "false", "--ckpt.every_steps", "0")  # fmt: skip
# FastCLIP's gamma decays from 1 to gamma_min over half the run, as fast_clip's README recommends
_EPOCHS = ("--train.epochs", "6", "--loss.gamma_decay_epochs", "3")
_EPOCHS_8 = ("--train.epochs", "8", "--loss.gamma_decay_epochs", "4")
_KEEP_16_OF_49 = str(16 / 49)  # random / block keep 16 of the 7 x 7 patches at 112 px, as grid and resize

EXPERIMENTS = {
    "clipa-image": Experiment(
        base=(*_MINI, *_EPOCHS, "--clipa.text_strategy", "none", "--clipa.stage2_epochs", "1"),
        arms={
            "resize": ("--clipa.image_strategy", "resize", "--clipa.image_resize", "64"),
            "random": ("--clipa.image_strategy", "random", "--clipa.image_keep", _KEEP_16_OF_49),
            "grid": ("--clipa.image_strategy", "grid"),
            "block": ("--clipa.image_strategy", "block", "--clipa.image_keep", _KEEP_16_OF_49),
        },
        contrasts=(
            difference("resize", "random", "resizing is at least as good as random masking"),
            difference("random", "grid", "random masking beats grid masking"),
            difference("grid", "block", "grid masking beats block masking"),
        ),
        paper="CLIPA (arXiv 2305.07017; open_clip docs/clipa.md): resizing > random masking > grid / block "
        "(resizing 'retains full image information'). GLIP (CC12M, B/16, 17 tokens, ImageNet zero-shot after "
        "tuning): resize 25.6 vs random 24.5.",
        note="16 of 49 image tokens at 112 px (resize: 64 px), 6 epochs, then 1 epoch at 112 px; full text.",
        proper_test="ImageNet-scale data (CLIPA: LAION-400M / CC12M) and a B/16 at 224 px, where 16 of 196 "
        "tokens still cover the object; at 112 px a 16-token block covers a third of the image.",
    ),
    "clipa-text": Experiment(
        base=(*_MINI, *_EPOCHS, "--clipa.text_length", "8", "--clipa.stage2_epochs", "1"),
        arms={
            "truncate": ("--clipa.text_strategy", "truncate"),
            "random": ("--clipa.text_strategy", "random"),
            "block": ("--clipa.text_strategy", "block"),
            "syntax": ("--clipa.text_strategy", "syntax"),
        },
        contrasts=(
            difference("random", "truncate", "random masking beats truncation at short lengths"),
            difference("block", "truncate", "block masking beats truncation at short lengths"),
            difference("syntax", "truncate", "syntax masking beats truncation"),
            difference("syntax", "random", "syntax masking is the best strategy"),
        ),
        paper="CLIPA: syntax masking is best at short lengths, truncation worst. CLIPF (CC3M, B/16, 8 "
        "tokens, ImageNet zero-shot after tuning): truncation 12.0, random 17.4, block 16.6, syntax 17.5.",
        note="8 of 32 text tokens (SOT and EOT kept) for 6 epochs at 64 px, then 1 epoch at full length and "
        "112 px. The POS table is context-free (lemminflect's lexicon per vocabulary entry).",
        proper_test="CC3M-scale captions (long, varied web text, where which 8 tokens survive matters) and "
        "ImageNet zero-shot after full-length tuning, as CLIPA's Table; Flickr8k captions are short and "
        "similar.",
    ),
    "inverse-scaling": Experiment(
        base=(*_MINI, *_EPOCHS),
        arms={
            "tiny-full": ("--model.size", "tiny", "--clipa.text_strategy", "none"),
            "tiny-8": ("--model.size", "tiny", "--clipa.text_length", "8"),
            "small-full": ("--model.size", "small", "--clipa.text_strategy", "none"),
            "small-8": ("--model.size", "small", "--clipa.text_length", "8"),
        },
        contrasts=(
            difference("small-full", "tiny-full", "the larger model is better at full text length"),
            share_gap(
                "small-8",
                "small-full",
                "tiny-8",
                "tiny-full",
                "the larger text encoder keeps a larger share of its full-length score at 8 tokens",
            ),
        ),  # fmt: skip
        paper="CLIPA's inverse scaling law: larger encoders lose less from shorter token sequences. Its "
        "accuracy-vs-compute figure (resizing to 17 image tokens, ImageNet zero-shot): S/16 -6.2, B/16 about "
        "-4.0, L/16 -3.0 points.",
        note="Text side only (the two sizes differ in patch size, which cancels within a size). Tiny: 2+2 "
        "layers of width 128; small: 6+4 layers of width 256. Evaluated at the trained length.",
        proper_test="Models a size class apart trained to convergence on large data (CLIPA: S/16, B/16, L/16 "
        "on LAION-400M); here both sizes are far from converged and data-limited.",
    ),
    "laclip": Experiment(
        base=(*_MINI, *_EPOCHS_8),
        arms={
            "first-caption": ("--data.caption_sampling", "none"),
            "laclip": ("--data.caption_sampling", "laclip"),
        },
        contrasts=(difference("laclip", "first-caption", "sampling among rewritten captions helps"),),
        paper="LaCLIP (arXiv 2305.20088, README): ImageNet zero-shot, ViT-B/16, CC3M 15.8 -> 21.5, CC12M "
        "40.2 -> 48.4.",
        note="Flickr8k's 5 human captions stand in for the LLM rewrites (the first caption is the 'original').",
        proper_test="Real LLM rewrites of web alt-text (noisy, one caption per image) on CC3M-scale data; human "
        "captions are already diverse and clean, which is what LaCLIP's rewrites add.",
    ),
    "veclip": Experiment(
        base=(*_MINI, *_EPOCHS, "--data.train_captions", "alt-enriched", "--clipa.text_strategy", "none"),
        arms={
            "alt-text": ("--data.caption_sampling", "none"),
            "mix": ("--data.caption_sampling", "veclip", "--data.veclip_p", "0.5"),
            "enriched": ("--data.caption_sampling", "veclip", "--data.veclip_p", "1.0"),
        },
        contrasts=(
            difference("mix", "alt-text", "mixing enriched captions in beats alt-text only"),
            difference("mix", "enriched", "mixing beats enriched captions only"),
        ),
        paper="VeCLIP (arXiv 2310.07699, README; 3M web pairs, B/16): Flickr i2t R@1 12.20 (CLIP, alt-text) "
        "-> 40.60 (50/50 mix); enriched-only loses zero-shot at scale (VeCap-300M alone 46.43 vs 76.19 mixed "
        "with DFN).",
        note="Alt-text: the shortest human caption without function words; enriched: the longest caption; "
        "test keeps the 5 human captions. Full text length.",
        proper_test="Real web alt-text (noisy, often unrelated) and captioner-plus-LLM enriched captions on "
        "millions of pairs; derived alt-text from human captions keeps their content.",
    ),
    "fastclip": Experiment(
        base=(*_MINI, *_EPOCHS, "--optim.grad_clip", "0"),
        arms={
            "clip-b128": ("--loss.mode", "clip", "--train.batch_size", "128"),
            "rgcl_g-b128": ("--loss.mode", "rgcl_g", "--train.batch_size", "128"),
            "clip-b32": ("--loss.mode", "clip", "--train.batch_size", "32"),
            "rgcl_g-b32": ("--loss.mode", "rgcl_g", "--train.batch_size", "32"),
            # diagnostic: the global estimator u at a constant tau (v1 = SogCLR), tau as clip's ends up
            "gcl-b32": ("--loss.mode", "gcl", "--train.batch_size", "32"),
        },
        contrasts=(
            difference("rgcl_g-b128", "clip-b128", "FastCLIP-v3 beats OpenCLIP's loss at batch 128"),
            difference("rgcl_g-b32", "clip-b32", "FastCLIP-v3 beats OpenCLIP's loss at batch 32"),
            gap_growth(
                "rgcl_g-b128", "clip-b128", "rgcl_g-b32", "clip-b32", "the gap grows as the batch shrinks"
            ),
            difference(
                "gcl-b32",
                "clip-b32",
                "the global contrastive loss (v1, constant tau) beats OpenCLIP's at batch 32",
            ),
        ),
        paper="FastCLIP (arXiv 2407.01445, README figures; IN & variants average): CC3M RN50 v3 / OpenCLIP "
        "18.4 / 14.2 (+4.2) on 1 node, 19.2 / 16.0 (+3.2) on 8 nodes: the gap shrinks as the global batch "
        "grows.",
        note="Same epochs (samples and FLOPs) per arm; gradient clipping off for every arm (the two losses' "
        "gradient norms at init differ about 9x, so one clip threshold would treat them differently); gamma "
        "decays over 3 of the 6 epochs (half the run, fast_clip's recommendation; the clip arms do not read it).",
        proper_test="Tens of epochs on millions of pairs (FastCLIP: CC3M, 37 epochs, one caption per image; u "
        "and tau settle over many passes) with the temperature LR of the paper. Here u is refreshed 6 times "
        "per sample, from a different one of the image's 5 captions each epoch (the flickr8k preset samples "
        "them, so each u averages normalizers of different pairs: see fastclip-onecap), and tau's LR is 10x "
        "the paper's (short runs): rgcl_g's tau falls to 0.02-0.04 while clip's stays at 0.07; gcl-b32 "
        "(constant tau 0.07) separates the estimator from the temperature.",
    ),
    # The same claims with one fixed caption per image (as FastCLIP's CC3M), so that each sample's u
    # estimates the normalizer of one pair; declared after the fastclip results (caption sampling confound).
    "fastclip-onecap": Experiment(
        base=(*_MINI, *_EPOCHS, "--optim.grad_clip", "0", "--data.caption_sampling", "none"),
        arms={
            "clip-b128": ("--loss.mode", "clip", "--train.batch_size", "128"),
            "rgcl_g-b128": ("--loss.mode", "rgcl_g", "--train.batch_size", "128"),
            "clip-b32": ("--loss.mode", "clip", "--train.batch_size", "32"),
            "rgcl_g-b32": ("--loss.mode", "rgcl_g", "--train.batch_size", "32"),
        },
        contrasts=(
            difference("rgcl_g-b128", "clip-b128", "FastCLIP-v3 beats OpenCLIP's loss at batch 128"),
            difference("rgcl_g-b32", "clip-b32", "FastCLIP-v3 beats OpenCLIP's loss at batch 32"),
            gap_growth(
                "rgcl_g-b128", "clip-b128", "rgcl_g-b32", "clip-b32", "the gap grows as the batch shrinks"
            ),
        ),
        paper="FastCLIP (arXiv 2407.01445): as the fastclip experiment.",
        note="The fastclip experiment with the first caption of each image only (data.caption_sampling none).",
        proper_test="As fastclip: tens of epochs on millions of pairs with the paper's temperature LR.",
    ),
    # LLM2CLIP's adapter over raw vs caption-contrastive-tuned MiniLM (needs the two embedding caches of
    # ``python -m training.llm2clip.cache``, see README) vs the transformer text tower.
    "llm2clip": Experiment(
        base=(*_MINI, *_EPOCHS_8),
        arms={
            "transformer": ("--data.caption_sampling", "laclip"),
            "adapter-raw": ("--model.text_tower", "adapter", "--data.text_embeddings", "runs/emb-raw"),
            "adapter-cc": ("--model.text_tower", "adapter", "--data.text_embeddings", "runs/emb-cc"),
        },
        contrasts=(
            difference("adapter-cc", "adapter-raw", "the caption-contrastive-tuned encoder is better"),
        ),
        paper="LLM2CLIP (arXiv 2411.04997): caption retrieval accuracy (COCO) Llama3-8B 18.4 -> 73.0 after "
        "caption-contrastive tuning; CLIP then trains on the tuned LLM's embeddings.",
        note="MiniLM stands in for the LLM.",
        proper_test="A decoder LLM (LLM2CLIP: Llama-3-8B, CRA 18 -> 73 after tuning) whose raw embeddings are "
        "poor; MiniLM is already sentence-contrastive, so tuning it has little to add.",
        needs=("runs/emb-raw", "runs/emb-cc"),
    ),
}


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


# -- running and reporting -------------------------------------------------------------------------
def run(name: str, out: str = "runs/experiments", results: str = RESULTS, report_only: bool = False,
        train_fn=None, arms=None, seeds=None) -> dict:  # fmt: skip
    """Run the missing runs of experiment ``name`` (all, or those of ``arms`` x ``seeds``; none when
    ``report_only``), then write the report over the finished ones."""
    from .config import parse_args
    from .train import train

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
        seconds = None
        if not os.path.exists(os.path.join(run_dir, "metrics.json")):
            tic = time.perf_counter()
            (train_fn or train)(parse_args(argv))
            seconds = round(time.perf_counter() - tic, 1)
        rec = {"experiment": name, "arm": arm, "seed": seed, **make_record(run_dir, argv, seconds)}
        with open(record_path + ".tmp", "w") as f:
            json.dump(rec, f, separators=(",", ":"))
        os.replace(record_path + ".tmp", record_path)
    return report(name, folder)


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
        lines.append(f"| {c['claim']} | {c['contrast']} | {_pp(c['mean'])} | [{_pp(c['lo'])}, {_pp(c['hi'])}] "
                     f"| {per} | {c['verdict']} |")  # fmt: skip
    return "\n".join(lines)


def _plot(rep: dict, path: str) -> None:
    rows = [c for c in rep["contrasts"] if c["verdict"] != "pending"]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.5 * len(rows)))
    for y, c in enumerate(rows):
        ax.errorbar(100 * c["mean"], y, xerr=[[100 * (c["mean"] - c["lo"])], [100 * (c["hi"] - c["mean"])]],
                    fmt="o", color="black")  # fmt: skip
        ax.plot([100 * v for v in c["per_seed"].values()], [y] * len(c["per_seed"]), "x", color="gray")
    ax.axvline(0, color="gray", lw=0.8)
    ax.set_yticks(range(len(rows)), [c["contrast"] for c in rows])
    ax.set_xlabel("pp of mean recall (dot: mean, bar: 95 % interval, x: seeds)")
    ax.set_title(rep["experiment"])
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
