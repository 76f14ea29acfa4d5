"""Training-loop features: the MFU FLOP count against torch's FLOP counter, plots and TensorBoard
events, syntax masking from a POS table, the CLIPA stage-2 learning-rate schedule, activation
checkpointing with bf16 autocast on CPU, and the console entry point."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from training_helpers import csv_rows, tiny_argv

from fastclip_kernels.tokens.syntax_table import build_syntax_rank, save_syntax_rank
from training import train
from training.config import parse_args
from training.dist import Ranks
from training.model import build_model
from training.monitor import Monitor, step_flops
from training.plots import plot_run
from training.tokenizer import CaptionTokenizer

TINY = tiny_argv(48)


def _cfg(tmp_path, *extra):
    return parse_args([*TINY, "--run.output_dir", str(tmp_path), *extra])


def test_step_flops_match_torch_flop_counter():
    """3x the forward's matmul FLOPs counted by torch (kept patches, packed text) = our formula."""
    cfg = parse_args(["--preset", "demo"])
    model = build_model(cfg, vocab_size=100).requires_grad_(False)
    images, ids, lengths = torch.randn(4, 3, 64, 64), torch.randint(4, 100, (4, 16)), [16, 9, 5, 12]
    keep = torch.stack([torch.randperm(64)[:16] for _ in range(4)])
    with FlopCounterMode(display=False) as counter:
        model(images, ids, lengths, keep)
    want = 3 * counter.get_total_flops()
    assert step_flops(cfg.model_dims(), [16] * 4, lengths) == pytest.approx(want, rel=0.02)


def test_plots_and_tensorboard(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tensorboard")
    cfg = _cfg(tmp_path, "--log.tensorboard", "true")
    os.makedirs(cfg.output_path)
    mon = Monitor(cfg, cfg.output_path, total_steps=3, start_step=0)
    for step in (1, 2, 3):
        mon.log(
            {"step": step, "stage": 1 + (step == 3), "loss": 1.0 / step, "tau": 0.07, "gamma": 0.9, "mfu": ""}
        )
    mon.eval({"step": 3, "i2t_r1": 0.5, "zeroshot_top1": 0.25})
    mon.close()
    with open(os.path.join(cfg.output_path, "plots.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    events = os.listdir(os.path.join(cfg.output_path, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert [r["loss"] for r in csv_rows(os.path.join(cfg.output_path, "log.csv"))] == [
        "1.0",
        "0.5",
        "0.3333333333333333",
    ]
    assert plot_run(str(tmp_path / "empty")) is None


def test_syntax_masking_from_a_pos_table(tmp_path):
    """The loop keeps nouns first: run with a table built by a toy tagger; a table of the wrong size
    and a missing file are named errors."""
    tok = CaptionTokenizer.train(["a red circle left of a blue square"] * 4, vocab_size=64)
    tok_path, table_path = str(tmp_path / "tok.json"), str(tmp_path / "pos.pt")
    tok.save(tok_path)
    save_syntax_rank(
        build_syntax_rank(tok.vocab(), lambda w: {"circle": "NN", "square": "NN", "red": "JJ"}.get(w, "DT")),
        table_path,
    )
    clipa = ["--clipa.text_strategy", "syntax", "--clipa.text_length", "6", "--train.max_steps", "2"]
    cfg = _cfg(tmp_path, *clipa, "--data.tokenizer", tok_path, "--clipa.pos_table", table_path)
    assert train.train(cfg)["step"] == 2
    save_syntax_rank(torch.zeros(5, dtype=torch.int8), table_path)
    with pytest.raises(ValueError, match="pos_table has 5 entries"):
        train.train(_cfg(tmp_path, *clipa, "--data.tokenizer", tok_path, "--clipa.pos_table", table_path))
    with pytest.raises(FileNotFoundError, match="clipa.pos_table"):
        train.train(_cfg(tmp_path, *clipa, "--clipa.pos_table", str(tmp_path / "missing.pt")))


def test_stage2_learning_rate_schedule(tmp_path):
    """With clipa.stage2_lr: stage 1 decays to optim.min_lr at its end, stage 2 warms up to its own peak."""
    cfg = _cfg(tmp_path, "--train.epochs", "3", "--clipa.stage2_epochs", "3", "--clipa.stage2_lr", "1e-5",
               "--clipa.image_strategy", "grid")  # fmt: skip
    run = train.Run(cfg, Ranks())
    assert (run.stage1_steps, run.total) == (9, 18)
    lrs = []
    for step in range(run.total):
        run.step, run.stage = step, 1 + (step >= run.stage1_steps)
        lrs.append(run.lr())
    assert lrs[1] == pytest.approx(1e-3) and lrs[8] < 1e-4  # stage 1: warmup 2, cosine over 9 steps
    assert (
        lrs[9] == lrs[10] == pytest.approx(1e-5) and lrs[-1] < lrs[11] < 1e-5
    )  # stage 2: warmup 1, own peak
    assert max(lrs[9:]) == pytest.approx(1e-5)


def test_activation_checkpointing_with_bf16_autocast_on_cpu(tmp_path):
    cfg = _cfg(tmp_path, "--train.activation_checkpointing", "true", "--train.precision", "bf16",
               "--train.max_steps", "3")  # fmt: skip
    run = train.Run(cfg, Ranks())
    assert run.model.visual.transformer.grad_checkpointing and run.model.text.transformer.grad_checkpointing
    assert run.fit()["step"] == 3
    losses = [float(r["loss"]) for r in csv_rows(os.path.join(cfg.output_path, "log.csv"))]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_console_script_prints_help():
    exe = shutil.which("fastclip-train")
    cmd = [exe] if exe else [sys.executable, "-m", "training.train"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--clipa.image_strategy" in out.stdout


def test_flickr8k_preset_runs_at_tiny_size(tmp_path):
    """The real-data preset family: Flickr8k photos and captions, CLIPA resize, LaCLIP-style sampling."""
    from training.config import data_home

    if not os.path.isdir(os.path.join(data_home(), "flickr8k")):
        pytest.skip(f"no Flickr8k under {data_home()} (set FASTCLIP_DATA)")
    cfg = parse_args(["--preset", "flickr8k", "--model.size", "tiny", "--data.image_size", "32",
                      "--clipa.image_resize", "16", "--train.batch_size", "8", "--train.max_steps", "2",
                      "--data.num_workers", "0", "--eval.zeroshot_path", "", "--eval.retrieval_split", "none",
                      "--data.vocab_size", "256", "--run.output_dir", str(tmp_path), "--run.device", "cpu"])  # fmt: skip
    assert train.train(cfg)["step"] == 2
    assert len(csv_rows(os.path.join(cfg.output_path, "log.csv"))) >= 1


@pytest.mark.parametrize("entry,missing", [("train", "PIL"), ("rewrite", "tqdm")])
def test_console_script_names_the_missing_extra(entry, missing):
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            f"from training.cli import {entry}\nsys.exit({entry}(['--help']))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "pip install 'fastclip-kernels[train]'" in out.stderr
