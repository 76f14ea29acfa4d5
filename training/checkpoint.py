"""Checkpoints: model, optimizer, data position, CLIPA stage, config, and per rank the loss state
(FastCLIP's u / tau shard) and RNG states.

Rank 0 writes one file; the other ranks' shares reach it with one ``gather_object``. Writes go to a
temporary file renamed over ``latest.pt`` only when complete, so a crash or a non-finite loss never
leaves a corrupt checkpoint behind. Loading checks that the run has as many ranks as the checkpoint.
"""

import os
import random

import numpy as np
import torch

__all__ = ["load", "rng_state", "save"]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(path, *, model, optimizer, ranks: list[dict], step, epoch, position, stage, config) -> None:
    """``ranks``: [{"loss": loss state_dict, "rng": rng_state()} of rank 0, ..., of rank K-1]."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ranks": ranks,
        "step": step,
        "epoch": epoch,
        "position": position,  # batches already trained on in this epoch
        "stage": stage,
        "config": config,
    }
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path, rank: int = 0, world_size: int = 1) -> dict:
    """The checkpoint with this rank's ``loss`` state; restores this rank's RNG states."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved = len(state["ranks"])
    if saved != world_size:
        raise ValueError(f"{path} was saved by {saved} rank(s); resume it with {saved}, not {world_size}")
    mine = state["ranks"][rank]
    _set_rng_state(mine["rng"])
    return {**state, "loss": mine["loss"]}
