"""The training step and its parts: every input reaches the model's device (CLIPA keep_idx included),
the Objective's temperature LR rules (cosine implemented), and the log line."""

import math

import pytest
import torch

from training import dist
from training.config import parse_args
from training.data.datasets import Batch
from training.objective import Objective
from training.step import TrainStep
from training.tokenizer import CaptionTokenizer


class _Reached(Exception):
    pass


class _NoLR:
    def set_lr(self, *args):
        pass


@pytest.mark.parametrize("strategy", ["random", "grid", "block", "resize", "none"])
def test_every_step_tensor_reaches_the_model_device(strategy):
    """A fake device (meta): the towers get only tensors on it, whatever CLIPA strategy made them."""
    cfg = parse_args(["--preset", "demo", "--clipa.image_strategy", strategy, "--clipa.text_strategy", "random",
                      "--data.context_length", "16", "--clipa.text_length", "8"])  # fmt: skip
    tok = CaptionTokenizer.train(
        ["a red circle on the left", "two blue squares"], vocab_size=40, min_frequency=1
    )
    seen = {}

    def towers(images, ids, lengths, keep_idx):
        seen.update(images=images, ids=ids, keep_idx=keep_idx, lengths=lengths)
        raise _Reached

    meta = torch.device("meta")
    step = TrainStep(cfg, tok, towers, None, _NoLR(), None, dist.Ranks(device=meta), meta)
    batch = Batch(torch.randn(4, 3, 64, 64), ["a red circle on the left"] * 4, torch.arange(4), 0)
    with pytest.raises(_Reached):
        step(batch, step=0, stage=1, lr=1e-3, total_steps=10)
    tensors = {k: v for k, v in seen.items() if isinstance(v, torch.Tensor)}
    assert ("keep_idx" in tensors) == (strategy in ("random", "grid", "block"))
    assert all(t.device == meta for t in tensors.values()), {k: t.device for k, t in tensors.items()}
    assert isinstance(seen["lengths"], list)


def _objective(schedule: str, mode: str = "rgcl_g"):
    cfg = parse_args(["--preset", "demo", "--loss.mode", mode, "--loss.lr_tau_schedule", schedule,
                      "--loss.lr_tau", "0.5"])  # fmt: skip
    return Objective(cfg, data_size=8, device=torch.device("cpu"))


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from fastclip_kernels.fastclip.temperature import GlobalTemperature

        self.temperature = GlobalTemperature(0.07)


def _tau_group(obj, model, lr, step, total):
    opt_groups = [{"lr": 0.0}, model.temperature.param_group(obj.own_lr_tau())]
    opt = type("Opt", (), {"param_groups": opt_groups})()
    obj.set_lr(opt, lr, model, step, total)
    return opt_groups


def test_lr_tau_schedules():
    model = _Model()
    cos = _objective("cosine")
    for step, total in [(0, 10), (5, 10), (10, 10), (3, 7)]:
        groups = _tau_group(cos, model, 1e-3, step, total)
        assert groups[0]["lr"] == 1e-3
        want = 0.5 * 0.5 * (1 + math.cos(math.pi * step / total))
        assert float(groups[1]["lr"]) == pytest.approx(want, rel=1e-6)
    const = _tau_group(_objective("const"), model, 1e-3, 5, 10)
    assert float(const[1]["lr"]) == pytest.approx(0.5)
    assert _objective("const", "gcl").own_lr_tau() is None


def test_gcl_g_trains_the_global_temperature_in_its_own_group():
    """loss.mode gcl_g (fast_clip's v0): theta is not frozen, gets its own group at loss.lr_tau (as
    rgcl_g), and its gradient is the objective's: at gamma = 1 (u = g) the surrogate's d/ds equals
    d/ds of 1/n sum 1/2 [log(eps + g1) + log(eps + g2)] (fp64 reference, no tau factor), times s."""
    from fastclip_kernels.fastclip.naive import gcl_g_ref
    from training.model import param_groups

    obj, model = _objective("const", "gcl_g"), _Model().double()
    obj.prepare(model)
    theta = model.temperature.theta
    assert theta.requires_grad and obj.own_lr_tau() == 0.5
    groups = param_groups(model, 0.1, lr_tau=obj.own_lr_tau())
    assert [g.get("fastclip_lr_tau") for g in groups] == [0.5] and groups[0]["params"] == [theta]
    x, y = (torch.nn.functional.normalize(torch.randn(8, 16, dtype=torch.float64), dim=-1) for _ in range(2))
    loss = obj.loss(model, x, y, torch.arange(8))
    loss.backward()
    theta_ref = theta.detach().clone().requires_grad_()
    g1, g2 = gcl_g_ref(x, y, theta_ref.exp(), theta_ref.exp())
    ref = 0.5 * (torch.log(obj.fn.eps + g1) + torch.log(obj.fn.eps + g2)).mean()
    ref.backward()
    assert float(obj.gamma) == 1.0
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    assert theta.grad.item() == pytest.approx(theta_ref.grad.item(), rel=1e-8) and theta.grad.item() != 0
