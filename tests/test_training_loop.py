"""The training loop on CPU at tiny sizes: every loss mode runs, CLIPA stage 1 -> 2 runs, a resumed run
reproduces the uninterrupted losses exactly, and a non-finite loss stops cleanly with the last
checkpoint intact."""

import os

import pytest
import torch
from training_helpers import csv_rows, logged_losses, tiny_argv

from training import checkpoint, train
from training.config import parse_args
from training.objective import Objective
from training.step import FiniteWatch

TINY = tiny_argv(96)


def _cfg(tmp_path, *extra):
    return parse_args([*TINY, "--run.output_dir", str(tmp_path), *extra])


@pytest.mark.parametrize("mode", ["clip", "siglip", "gcl", "gcl_g", "rgcl", "rgcl_g"])
def test_each_loss_mode_runs(tmp_path, mode):
    cfg = _cfg(tmp_path, "--loss.mode", mode, "--train.max_steps", "3")
    if mode == "siglip":
        cfg = _cfg(tmp_path, "--loss.mode", mode, "--train.max_steps", "3", "--loss.rho", "8.5")
    final = train.train(cfg)
    assert final["step"] == 3 and 0.0 <= final["zeroshot_top1"] <= 1.0
    assert len(logged_losses(cfg.output_path)) == 3
    assert os.path.exists(os.path.join(cfg.output_path, "latest.pt"))


def test_clipa_two_stages(tmp_path):
    cfg = _cfg(
        tmp_path, "--loss.mode", "rgcl_g", "--clipa.image_strategy", "random", "--clipa.image_keep", "0.25",
        "--clipa.text_strategy", "truncate", "--clipa.text_length", "6", "--train.epochs", "0.34",
        "--clipa.stage2_epochs", "0.34",
    )  # fmt: skip
    train.train(cfg)
    stages = [int(r["stage"]) for r in csv_rows(os.path.join(cfg.output_path, "log.csv"))]
    assert stages[0] == 1 and stages[-1] == 2


@pytest.mark.parametrize("mode", ["rgcl", "rgcl_g", "clip"])
def test_resume_reproduces_the_uninterruptedlogged_losses(tmp_path, mode):
    """Exact, with one CPU thread: with several, some CPU reductions split work by thread at run
    time, so even two fresh runs differ at ~1e-7. Both runs share one tokenizer file: HF BPE training
    breaks count ties nondeterministically; a resumed run always reloads its own saved tokenizer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _resume_case(tmp_path, mode)
    finally:
        torch.set_num_threads(threads)


def _resume_case(tmp_path, mode):
    whole = _cfg(tmp_path / "whole", "--loss.mode", mode, "--train.max_steps", "10")
    train.train(whole)
    args = (
        "--loss.mode",
        mode,
        "--train.max_steps",
        "10",
        "--data.tokenizer",
        f"{whole.output_path}/tokenizer.json",
    )
    parts = _cfg(tmp_path / "parts", *args)
    assert train.train(parts, stop_at=7)["interrupted"]  # mid-epoch: 6 batches per epoch
    train.train(_cfg(tmp_path / "parts", *args, "--ckpt.resume", "latest"))
    got, want = logged_losses(parts.output_path), logged_losses(whole.output_path)
    assert got.keys() == want.keys() == set(range(1, 11))
    assert got == want, "a resumed run must reproduce every loss bit for bit"


def test_non_finite_loss_stops_cleanly(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "--train.max_steps", "6", "--ckpt.every_steps", "2")
    real, calls = Objective.loss, []

    def poisoned(self, model, img, txt, indices):
        calls.append(1)
        out = real(self, model, img, txt, indices)
        return out * float("nan") if len(calls) >= 3 else out

    monkeypatch.setattr(Objective, "loss", poisoned)
    with pytest.raises(train.NonFiniteLoss, match="at step 3"):
        train.train(cfg)
    state = checkpoint.load(os.path.join(cfg.output_path, "latest.pt"))
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert train.main([*TINY, "--run.output_dir", str(tmp_path / "cli"), "--train.max_steps", "3"]) == 2


def test_non_finite_loss_stops_at_the_next_log_step(tmp_path, monkeypatch):
    """The step keeps the check on the device: a nan at step 2 stops the run at the log step 3, naming
    step 2 (on CPU step 3 may instead fail an argument check of the nan temperature: the loop then
    reports the non-finite loss too); no checkpoint is written in between (ckpt.every_steps=0)."""
    cfg = _cfg(tmp_path, "--train.max_steps", "6", "--log.every_steps", "3")
    real, calls = Objective.loss, []

    def poisoned(self, model, img, txt, indices):
        calls.append(1)
        out = real(self, model, img, txt, indices)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(Objective, "loss", poisoned)
    with pytest.raises(train.NonFiniteLoss, match="at step 2;"):
        train.train(cfg)
    assert len(calls) == 3, "the run stops at the first log step after the bad one"
    assert not os.path.exists(os.path.join(cfg.output_path, "latest.pt"))


def test_finite_watch_keeps_the_first_bad_step():
    watch = FiniteWatch()
    watch.check()  # nothing recorded yet
    for step, value in enumerate([1.0, float("inf"), float("nan"), 2.0]):
        watch.update(torch.tensor(value), step)
    with pytest.raises(train.NonFiniteLoss, match="at step 2;"):
        watch.check()


def test_command_line_entry_point(tmp_path):
    assert train.main([*TINY, "--run.output_dir", str(tmp_path), "--train.max_steps", "1"]) == 0
    assert os.path.exists(os.path.join(tmp_path, "demo", "metrics.json"))


def test_cpu_runs_return_the_free_heap_at_log_steps(tmp_path, monkeypatch):
    """glibc's heap fragments under the towers' varying shapes (RSS grew ~50 MB per step at 112 px):
    the loop trims it at every log step on CPU."""
    from training import monitor

    calls = []
    monkeypatch.setattr(train, "release_free_heap", lambda: calls.append(1) or True)
    train.train(_cfg(tmp_path, "--train.max_steps", "3", "--log.every_steps", "2"))
    assert len(calls) == 2  # steps 2 and 3 (the last step always logs)
    assert monitor.release_free_heap() in (True, False)  # callable where there is no glibc too
