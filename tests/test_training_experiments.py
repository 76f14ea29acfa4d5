"""The experiment runner: the paired bootstrap interval against a hand computation, and a tiny grid
(2 arms x 2 seeds, 2 steps each) end to end: runs, reports, and a rerun that skips finished runs."""

import json
import os

import pytest
import torch
from training_helpers import tiny_argv

from training import experiments as ex


def _parts(scores):
    """Per-image parts where image i's six recalls all equal... 1 or 0, giving score s_i; 1 caption each."""
    i2t, t2i = [], []
    for s in scores:  # s in {0, 0.5, 1}: i2t hits = (s >= 0.5), t2i hits = (s == 1)
        i2t.append([float(s >= 0.5)] * 3)
        t2i.append([float(s == 1)] * 3)
    return (
        torch.tensor(i2t, dtype=torch.float64),
        torch.tensor(t2i, dtype=torch.float64),
        torch.ones(len(scores), dtype=torch.float64),
    )


def test_paired_interval_by_hand():
    arm = [_parts([1, 0]), _parts([1, 0.5])]
    base = [_parts([0.5, 0]), _parts([0, 0])]
    weights = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    got = ex.paired_interval(arm, base, weights)
    # full set: arm 0.5, 0.75; base 0.25, 0 -> paired diffs 0.25, 0.75 -> 0.5
    # resamples: [2, 0] -> (1-0.5, 1-0) -> 0.75; [0, 2] -> (0-0, 0.5-0) -> 0.25; [1, 1] -> 0.5
    # percentiles (linear) of [0.25, 0.5, 0.75]: 2.5 % -> 0.25 + 0.05 * 0.25, 97.5 % -> 0.5 + 0.95 * 0.25
    assert got["diff"] == pytest.approx(0.5)
    assert got["lo"] == pytest.approx(0.2625) and got["hi"] == pytest.approx(0.7375)


def test_per_image_score_matches_the_recalls():
    from training.evaluate import recall_at

    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=1)
    owner = torch.arange(12).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[owner] + 0.9 * torch.randn(24, 8, generator=gen), dim=1)
    full = torch.ones(1, 12, dtype=torch.float64)
    got = float(ex.weighted_score(ex.per_image_score({"image": img, "text": txt, "owner": owner}), full))
    r = recall_at(img, txt, owner)
    want = sum(r[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6
    assert got == pytest.approx(want, abs=1e-7)  # recall_at averages in fp32
    w = ex.bootstrap_weights(12, samples=5)
    assert w.shape == (5, 12) and torch.all(w.sum(1) == 12)


def test_tiny_grid_runs_reports_and_resumes(tmp_path, monkeypatch):
    base = (*tiny_argv(64), "--train.max_steps", "2", "--log.progress_bar", "false")
    exp = ex.Experiment(base=base, arms={"a": ("--optim.lr", "1e-3"), "b": ("--optim.lr", "3e-3")},
                        seeds=(0, 1), baseline="a")  # fmt: skip
    monkeypatch.setitem(ex.EXPERIMENTS, "tiny", exp)
    rep = ex.run("tiny", str(tmp_path))
    root = tmp_path / "tiny"
    assert {f for f in os.listdir(root) if f.startswith("report")} == {
        "report.json",
        "report.md",
        "report.png",
    }
    for row in rep["arms"]:
        for seed, score in row["per_seed"].items():
            with open(root / f"{row['arm']}-s{seed}" / "metrics.json") as f:
                m = json.load(f)
            assert score == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6)
    b = rep["arms"][1]["vs_baseline"]
    assert b["lo"] <= b["hi"] and "vs a" in (root / "report.md").read_text()

    def no_training(cfg):
        raise AssertionError(f"finished run {cfg.run_name} trained again")

    again = ex.run("tiny", str(tmp_path), train_fn=no_training)
    assert json.dumps(again["arms"]) == json.dumps(rep["arms"])
