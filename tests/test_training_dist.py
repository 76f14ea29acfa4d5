"""The training loop on 2 gloo ranks (CPU processes): the same global batches give the same losses as
one process (DDP's mean gradient equals the global one), a 2-rank run resumes exactly, and the
checkpoint carries both ranks' FastCLIP state shards."""

import os

import pytest
import torch
from dist_harness import run_ranks
from training_helpers import logged_losses, tiny_argv

from training import checkpoint, train
from training.config import ConfigError, parse_args

TINY = tiny_argv(64, "--train.max_steps", "6")


def _losses(run_dir):
    return {step: float(loss) for step, loss in logged_losses(run_dir).items()}


def _train_ranks(rank, world_size, argv, stop_at):
    """One rank of a run (module level: the ranks unpickle it)."""
    cfg = parse_args(argv)
    out = train.train(cfg, stop_at=stop_at)
    return {"step": out["step"]}


def _run(tmp_path, name, mode, world_size, *extra, stop_at=None, tokenizer=None):
    argv = [*TINY, "--run.output_dir", str(tmp_path), "--run.name", name, "--loss.mode", mode, *extra]
    if tokenizer:
        argv += ["--data.tokenizer", tokenizer]
    if world_size == 1:
        train.train(parse_args(argv), stop_at=stop_at)
    else:
        run_ranks(_train_ranks, world_size, argv, stop_at)
    return os.path.join(tmp_path, name)


@pytest.mark.parametrize("mode", ["rgcl_g", "clip", "rgcl", "siglip"])
def test_two_ranks_follow_the_single_process_run(tmp_path, mode):
    """Rank r takes every 2nd sample of the global permutation, so each step's global batch is the
    single process's; grid keep and truncation are deterministic. fp32: up to reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        clipa = [
            "--clipa.image_strategy",
            "random",
            "--clipa.image_keep",
            "0.5",
            "--clipa.text_strategy",
            "truncate",
            "--clipa.text_length",
            "8",
        ]
        one = _run(tmp_path, "one", mode, 1, *clipa)
        two = _run(tmp_path, "two", mode, 2, *clipa, tokenizer=os.path.join(one, "tokenizer.json"))
    finally:
        torch.set_num_threads(threads)
    got, want = _losses(two), _losses(one)
    assert got.keys() == want.keys() == set(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=2e-5, abs=1e-6), f"step {step}"
    assert len({round(v, 6) for v in want.values()}) > 1, "the loss must change over the steps"


def test_two_ranks_resume_exactly_with_both_state_shards(tmp_path):
    whole = _run(tmp_path, "whole", "rgcl", 2)
    tok = os.path.join(whole, "tokenizer.json")
    parts = _run(tmp_path, "parts", "rgcl", 2, stop_at=5, tokenizer=tok)  # mid-epoch: 4 steps per epoch
    state = torch.load(os.path.join(parts, "latest.pt"), weights_only=False)
    assert len(state["ranks"]) == 2 and state["step"] == 5
    shards = [r["loss"]["state.log_u"] for r in state["ranks"]]
    assert shards[0].shape == shards[1].shape == (2, 32)
    assert all(torch.isfinite(s).sum() == 2 * 32 for s in shards), "epoch 0 saw every sample: all u set"
    _run(tmp_path, "parts", "rgcl", 2, "--ckpt.resume", "latest", tokenizer=tok)
    assert _losses(parts) == _losses(whole), "a resumed 2-rank run must reproduce every loss bit for bit"
    with pytest.raises(ValueError, match="saved by 2 rank"):
        checkpoint.load(os.path.join(parts, "latest.pt"), rank=0, world_size=1)


def test_distributed_config_errors(tmp_path):
    with pytest.raises(Exception, match="divisible by the 3 ranks"):
        _run(tmp_path, "odd", "clip", 3)
    assert issubclass(ConfigError, ValueError)
