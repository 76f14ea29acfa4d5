"""No device->host reads in a FastCLIPLoss step, checked on CPU: a dispatch mode records every op
that would synchronize a GPU (reading a value back: item / bool / int of a tensor, nonzero, boolean
mask indexing). Argument checks that read CPU inputs are switched off here, as they are for CUDA
tensors. On a GPU, tests/test_fastclip_gpu.py checks the same with CUDA's sync debug mode."""

import pytest
import torch
from test_fastclip_loss import pairs
from torch.utils._python_dispatch import TorchDispatchMode

import fastclip_kernels._validation as validation
import fastclip_kernels.fastclip.loss as loss_module
from fastclip_kernels.fastclip import FastCLIPLoss

HOST_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "item", "masked_select", "unique", "_unique2"}


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in HOST_READS:
            self.ops.append(name)
        elif name in ("index", "index_put", "index_put_") and _has_bool_index(args):
            self.ops.append(f"{name} with a boolean mask")  # needs nonzero: a sync on a GPU
        return func(*args, **(kwargs or {}))


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


@pytest.mark.parametrize("mode", ["clip", "gcl", "rgcl", "rgcl_g"])
def test_step_reads_nothing_back(mode, monkeypatch):
    monkeypatch.setattr(validation, "index_checks_enabled", lambda idx: False)
    monkeypatch.setattr(loss_module, "as_scalar_tensor", lambda name, value, device, dtype, **kw: value)
    fn = FastCLIPLoss(50, mode, gamma_min=0.5, backend="chunked")
    x, y = pairs(8)
    s = None if mode == "rgcl" else torch.tensor(10.0, dtype=torch.float64, requires_grad=mode != "gcl")
    idx = torch.arange(8) * 3
    fn(x, y, s, idx).backward()
    fn.set_epoch(1)  # gamma < 1: the reset rule and the moving average run too
    with HostReads() as reads:
        fn(x, y, s, idx).backward()
    assert reads.ops == [], f"host reads in the step: {reads.ops}"


def test_the_probe_sees_host_reads():
    """The probe must be able to fail: bool() of a tensor and mask indexing are host reads."""
    t = torch.arange(4.0)
    with HostReads() as reads:
        bool(t.sum() > 0)
        t[t > 1]
    assert reads.ops == ["_local_scalar_dense", "index with a boolean mask"]
