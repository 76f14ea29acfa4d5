"""No device->host reads in a FastCLIPLoss step, checked on CPU with the probe of ``host_reads.py``
(it records every read a GPU step would wait for: .item(), .tolist(), .cpu(), .numpy(), bool(t),
torch.equal, torch.allclose, nonzero, boolean-mask indexing, also inside our registered ops).
Argument checks that read CPU inputs are switched off here, as they are for CUDA tensors. On a
GPU, tests/test_fastclip_gpu.py checks the same with CUDA's sync debug mode."""

import importlib

import numpy as np
import pytest
import torch
from host_reads import HostReads
from test_fastclip_loss import pairs

import fastclip_kernels._validation as validation
import fastclip_kernels.fastclip.loss as loss_module
from fastclip_kernels import contrastive_loss
from fastclip_kernels.fastclip import FastCLIPLoss

ce_chunked = importlib.import_module("fastclip_kernels.ops.contrastive_loss.chunked")


@pytest.fixture
def device_checks(monkeypatch):
    """Value checks of CPU inputs off, as for CUDA tensors (they read the host by design)."""
    monkeypatch.setattr(validation, "host_checks", lambda t, env: False)
    monkeypatch.setattr(loss_module, "as_scalar_tensor", lambda name, value, device, dtype, **kw: value)


@pytest.mark.parametrize("mode", ["clip", "gcl", "gcl_g", "rgcl", "rgcl_g"])
def test_step_reads_nothing_back(mode, device_checks):
    fn = FastCLIPLoss(50, mode, gamma_min=0.5, backend="chunked")
    x, y = pairs(8)
    s = None if mode == "rgcl" else torch.tensor(10.0, dtype=torch.float64, requires_grad=mode != "gcl")
    idx = torch.arange(8) * 3
    fn(x, y, s, idx).backward()
    fn.set_epoch(1)  # gamma < 1: the reset rule and the moving average run too
    with HostReads() as reads:
        fn(x, y, s, idx).backward()
    assert reads.ops == [], f"host reads in the step: {reads.ops}"


def test_contrastive_loss_reads_nothing_back(device_checks):
    x, y = pairs(8)
    s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    with HostReads() as reads:
        contrastive_loss(x.requires_grad_(), y, s).backward()
    assert reads.ops == [], f"host reads in the loss: {reads.ops}"


READS = [
    (lambda t: t[0].item(), "item"),
    (lambda t: t.tolist(), "tolist"),
    (lambda t: t.cpu(), "cpu"),
    (lambda t: t.to("cpu"), "to(cpu)"),
    (lambda t: t.numpy(), "numpy"),
    (lambda t: np.asarray(t.sum()), "numpy"),
    (lambda t: bool(t.sum() > 0), "bool"),
    (lambda t: torch.equal(t, t), "torch.equal"),
    (lambda t: torch.allclose(t, t), "torch.allclose"),
    (lambda t: t[t > 1], "aten.index with a boolean mask"),
    (lambda t: t.nonzero(), "aten.nonzero"),
]


@pytest.mark.parametrize("read, name", READS, ids=[name for _, name in READS])
def test_the_probe_sees_each_host_read(read, name):
    """The probe must be able to fail: each kind of read is recorded (first entry, by name)."""
    t = torch.arange(4.0)
    with HostReads() as reads:
        read(t)
    assert reads.ops and name in reads.ops, reads.ops


def test_the_probe_sees_an_item_planted_in_an_op(device_checks, monkeypatch):
    """A .item() inside a registered op's implementation (the chunked contrastive loss) is seen."""
    row_chunks = ce_chunked.row_chunks

    def planted(M, N, chunk):
        torch.ones(()).item()
        return row_chunks(M, N, chunk)

    monkeypatch.setattr(ce_chunked, "row_chunks", planted)
    x, y = pairs(8)
    with HostReads() as reads:
        contrastive_loss(x, y, torch.tensor(10.0, dtype=torch.float64))
    assert "item" in reads.ops, reads.ops
