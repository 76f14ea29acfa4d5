"""``train.kernels=triton``: the loop's step runs every op on its GPU kernels (attention, patch embedding,
loss, FastCLIP state update, fused optimizer) through the Triton interpreter on CPU, and matches the
default CPU path (PyTorch implementations) after two steps of every loss mode with CLIPA random image
masking and random text masking.

Both paths are fp32 and the model casts its features to fp32, so there is no fp64 reference of the
whole step here (each kernel's 2x-rule test against fp64 lives in its own tests/test_<op>.py); the two
fp32 paths must agree: losses to a relative 2e-4, parameters to 2e-4 of each tensor's size plus 1 % of
one step's learning rate (Adam's m / sqrt(v) turns the fp32 rounding of a near-zero gradient into up to
an lr-sized update; measured max differences ~2e-6 with lr 1e-3, on a busy machine).
The optimizer's Triton block is raised to its GPU value (1024) here: at the interpreter's 64 the two
steps take minutes, 80 % of it in the optimizer.
"""

import pytest
import torch
from helpers import assert_rel_close
from tiny_step import MODES, tiny_batch, tiny_cfg, tiny_parts, tiny_tokenizer
from torch.utils._python_dispatch import TorchDispatchMode

import fastclip_kernels.ops.optim.triton as optim_triton
from fastclip_kernels.ops.common import interpreting
from training import build
from training.config import ConfigError

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1")
LOSS_OPS = {
    "clip": {"contrastive_loss_fwd", "contrastive_loss_bwd"},
    "siglip": {"sigmoid_loss_fwd", "sigmoid_loss_bwd"},
    **{m: {"anchor_stats", "anchor_grad", "state_update"} for m in ("gcl", "gcl_g", "rgcl", "rgcl_g")},
}
MODEL_OPS = {"patch_embed_fwd", "patch_embed_bwd", "varlen_attention_qkvpacked_fwd",
             "varlen_attention_qkvpacked_bwd", "adamw_", "global_grad_norm"}  # fmt: skip


class OpBackends(TorchDispatchMode):
    """{our op: the backends it ran with}; ops without a backend argument (attention, patch embedding)
    are registered for their Triton path only."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns, _, name = func._schema.name.partition("::")
        if ns == "fastclip":
            self.seen.setdefault(name, set()).update(a for a in args if isinstance(a, str))
        return func(*args, **(kwargs or {}))


def _two_steps(cfg):
    model, objective, opt, step = tiny_parts(cfg, torch.device("cpu"), tiny_tokenizer())
    with OpBackends() as ops:
        losses = [step(tiny_batch(i), i, 1, cfg.optim_lr, 10)[0] for i in range(2)]
    return torch.stack(losses), {k: v.detach().clone() for k, v in model.state_dict().items()}, ops.seen


@needs_interpreter
@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_triton_kernels_match_the_cpu_path(monkeypatch, mode):
    # the optimizer's interpreter block (64) makes ~600 programs per launch here: 80 % of the run time
    monkeypatch.setattr(optim_triton, "_block", lambda device, numels: 1024)
    cfg = tiny_cfg(monkeypatch, mode)
    cpu_loss, cpu_params, _ = _two_steps(cfg)
    gpu_loss, gpu_params, ops = _two_steps(tiny_cfg(monkeypatch, mode, "--train.kernels", "triton"))
    assert set(ops) == MODEL_OPS | LOSS_OPS[mode], sorted(ops)
    assert all(backends <= {"triton"} for backends in ops.values()), ops
    assert_rel_close(f"{mode} losses", gpu_loss, cpu_loss, rtol=2e-4)
    assert cpu_params.keys() == gpu_params.keys()
    for name, want in cpu_params.items():
        assert_rel_close(f"{mode} {name}", gpu_params[name], want, rtol=2e-4, atol=1e-2 * cfg.optim_lr)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    cfg = tiny_cfg(monkeypatch, "clip", "--train.kernels", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        build.kernels(cfg, torch.device("cpu"))
    assert build.kernels(cfg, torch.device("meta")) == "triton"
    assert build.kernels(tiny_cfg(monkeypatch, "clip"), torch.device("cpu")) == "auto"
