"""Checkpoints: model, optimizer, loss state (FastCLIP u / tau), data position, RNG, config.

Writes go to a temporary file that is renamed over ``latest.pt`` only when complete, so a crash or
a non-finite loss never leaves a corrupt checkpoint behind.
"""

import os
import random

import numpy as np
import torch


def save(path, *, model, optimizer, loss_fn, step, epoch, position, stage, config) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loss": loss_fn.state_dict(),
        "step": step,
        "epoch": epoch,
        "position": position,  # batches already trained on in this epoch
        "stage": stage,
        "config": config,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
    }
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    return state
