"""Issue 17's GPU / NCCL defects, shown on CPU: the process-group timeout reaches ``dist.setup``,
evaluation scores in fp32 inside the training's autocast, DDP leaves the LLM2CLIP table alone,
a resume lands every optimizer / objective tensor on the run's device, and the step moves uint8
images before normalizing and resizing them on the device."""

import pytest
import torch

from training import train as train_mod
from training.config import parse_args


class _Stop(Exception):
    pass


def test_dist_timeout_minutes_reaches_dist_setup(monkeypatch):
    seen = {}

    def setup(device_kind, timeout_minutes=None):
        seen.update(kind=device_kind, timeout=timeout_minutes)
        raise _Stop

    monkeypatch.setattr(train_mod.dist, "setup", setup)
    cfg = parse_args(["--preset", "demo", "--dist.timeout_minutes", "42.5"])
    with pytest.raises(_Stop):
        train_mod.train(cfg)
    assert seen == {"kind": "cpu", "timeout": 42.5}
    assert parse_args(["--preset", "demo"]).dist_timeout_minutes == 30.0
