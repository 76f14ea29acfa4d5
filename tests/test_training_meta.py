"""A dry run of the GPU training step on the ``meta`` device: model, loss state (Objective), optimizer
state and batch on meta, which takes every op's GPU dispatch (``ops.common.is_gpu``) through the fake
implementations. Every loss mode and every CLIPA image strategy (with random text masking), the
optimizer step, the temperature LR rule (step_thresh) and clamp included.

Strict placement: every tensor argument of every op the step runs must be on meta. A CPU tensor mixed
into a meta op may not raise (torch lets 0-d CPU tensors into device ops as scalars, which on a GPU
means a host->device copy per use, and a CPU tensor *read* by a GPU op is a sync), so the
``OnlyMeta`` mode below rejects them all, 0-d ones included. Python scalars are fine. The batch
arrives from the loader on the CPU: the step's one move (``to_device``) is the only op allowed to
take a CPU tensor.
"""

import pytest
import torch
from host_reads import HostReads
from tiny_step import MODES, tiny_batch, tiny_cfg, tiny_parts
from torch.utils._python_dispatch import TorchDispatchMode

STRATEGIES = ["none", "random", "grid", "block", "resize"]
MOVES = {"_to_copy", "copy_", "to"}  # the step's upload of the loader's CPU batch (to_device)


class OnlyMeta(TorchDispatchMode):
    """Records every op that gets a tensor that is not on meta (a move of a CPU tensor excepted)."""

    def __init__(self):
        super().__init__()
        self.off_meta: list[str] = []
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if any(t.device.type == "meta" for t in tensors):
            self.ops += 1
            name = func.overloadpacket.__name__
            bad = [t for t in tensors if t.device.type != "meta"]
            if bad and name not in MOVES:
                self.off_meta.append(f"{func._schema.name}: {[(tuple(t.shape), str(t.device)) for t in bad]}")
        return func(*args, **kwargs)


def _meta_step(cfg, steps: int = 2):
    meta = torch.device("meta")
    model, objective, opt, step = tiny_parts(cfg, meta)
    assert all(p.device == meta for p in model.parameters())
    size = cfg.data_image_size
    with OnlyMeta() as mode:
        for i in range(steps):
            loss, _ = step(tiny_batch(i, size), i, 1, cfg.optim_lr, 10)
    assert loss.device == meta and mode.ops > 100, (loss.device, mode.ops)
    assert mode.off_meta == [], "\n".join(mode.off_meta)
    states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert states and all(t.device == meta for t in states), "optimizer state left the device"
    loss_state = getattr(objective.fn, "state", None)
    if loss_state is not None:
        assert loss_state.log_u.device == meta
    return model, objective, opt


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mode", MODES)
def test_gpu_step_on_meta(monkeypatch, mode, strategy):
    extra = ["--clipa.image_strategy", strategy]
    if strategy == "resize":
        extra += ["--clipa.image_resize", "16"]
    _meta_step(tiny_cfg(monkeypatch, mode, *extra))


@pytest.mark.parametrize("schedule", ["step_thresh", "cosine", "const"])
def test_temperature_rules_on_meta(monkeypatch, schedule):
    """rgcl_g's own temperature group: its tensor LR stays on the device under every schedule."""
    cfg = tiny_cfg(monkeypatch, "rgcl_g", "--loss.lr_tau_schedule", schedule)
    model, _, opt = _meta_step(cfg)
    lrs = [g["lr"] for g in opt.param_groups if "fastclip_lr_tau" in g]
    assert len(lrs) == 1 and lrs[0].device.type == "meta"


@pytest.mark.parametrize("mode", MODES)
def test_gpu_step_reads_nothing_back(monkeypatch, mode):
    """The GPU path of two loop steps (TrainStep: CLIPA masks, towers, loss, FiniteWatch, optimizer,
    temperature rules) reads no device value back: the tokenizer's lengths and the CLIPA masks are the
    host's own CPU tensors and do not count; a read of a meta tensor does (and then raises)."""
    cfg = tiny_cfg(monkeypatch, mode)
    meta = torch.device("meta")
    model, objective, opt, step = tiny_parts(cfg, meta)
    with HostReads(device="meta") as reads:
        for i in range(2):
            step(tiny_batch(i), i, 1, cfg.optim_lr, 10)
    assert reads.ops == [], reads.ops


def test_the_meta_probe_sees_the_old_finiteness_check(monkeypatch):
    """The probe must be able to fail: the step's former per-step read (bool(isfinite(loss)))."""
    cfg = tiny_cfg(monkeypatch, "clip")
    _, _, _, step = tiny_parts(cfg, torch.device("meta"))
    monkeypatch.setattr(step.watch, "update", lambda loss, i: bool(torch.isfinite(loss)))
    with HostReads(device="meta") as reads, pytest.raises(RuntimeError):
        step(tiny_batch(0), 0, 1, cfg.optim_lr, 10)
    assert reads.ops[:1] == ["bool"], reads.ops
