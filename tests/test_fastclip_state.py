"""FastCLIP state, schedules and temperature: sharding, checkpoints, sizing for 400M samples,
gamma / step_thresh spot values. The state update op: test_state_update.py."""

import math

import pytest
import torch
from test_state_update import _random_state

from fastclip_kernels.fastclip import FastCLIPState, GlobalTemperature, gamma_at
from fastclip_kernels.fastclip.state import shard_size


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_sharding_covers_every_index_once(world_size):
    data_size = 23
    sizes = [shard_size(data_size, r, world_size) for r in range(world_size)]
    assert sum(sizes) == data_size
    states = [
        FastCLIPState(data_size, rank=r, world_size=world_size, per_sample_tau=True)
        for r in range(world_size)
    ]
    for r, st in enumerate(states):
        st.log_u.copy_(torch.arange(st.log_u.numel(), dtype=torch.float32).view_as(st.log_u) * world_size + r)
    idx = torch.randperm(data_size)
    # Summing each rank's contribution is what the all_reduce in fetch() does.
    fetched = sum(st.fetch(idx, collective=False)["log_u"] for st in states)
    slot_value = idx.float()  # value stored at (modality 0, slot idx // K) on rank idx % K
    assert torch.equal(fetched[0], slot_value)


def test_state_sized_for_400m_samples():
    """400M samples, K = 8: 0.4 GB of log u per rank; 1.6 GB with per-sample tau and its moments."""
    st = FastCLIPState(400_000_000, rank=7, world_size=8, per_sample_tau=True, device="meta")
    per_rank = sum(buf.numel() * buf.element_size() for buf in st.buffers())
    assert per_rank == 4 * 2 * 4 * 50_000_000
    owned, slot = st.owned_slots(torch.tensor([399_999_999, 7], device="meta"))
    assert slot.dtype == torch.int64


def test_state_dict_round_trip_and_sharding_check():
    st = _random_state(per_sample=True)
    copy_ = FastCLIPState(50, rank=1, world_size=3, per_sample_tau=True)
    copy_.load_state_dict(st.state_dict())
    for name in ("log_u", "tau", "exp_avg", "exp_avg_sq"):
        assert torch.equal(getattr(copy_, name).nan_to_num(), getattr(st, name).nan_to_num())
    other = FastCLIPState(50, rank=2, world_size=3, per_sample_tau=True)
    with pytest.raises(ValueError, match="same data_size, rank and world_size"):
        other.load_state_dict(st.state_dict())


def test_gamma_schedule_spot_values():
    assert gamma_at(0, 0.2, 18) == 1.0
    assert gamma_at(9, 0.2, 18) == pytest.approx(0.6, abs=1e-15)
    assert gamma_at(1, 0.3, 2) == pytest.approx(0.65, abs=1e-15)
    assert gamma_at(18, 0.2, 18) == gamma_at(30, 0.2, 18) == 0.2
    assert gamma_at(5, 0.2, 18, "constant") == 0.2
    for bad in (dict(epoch=-1), dict(gamma_min=0.0), dict(decay_epochs=0)):
        args = dict(epoch=1, gamma_min=0.2, decay_epochs=4) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            gamma_at(**args)


def test_step_thresh_and_global_temperature():
    temp = GlobalTemperature(0.07)
    group = temp.param_group(3e-4)
    for tau, lr in ((0.031, 3e-4), (0.03, 1e-4)):  # lr_tau / 3 once tau <= 0.03 (FastCLIP-v3)
        with torch.no_grad():
            temp.theta.fill_(math.log(1 / tau))
        temp.step_thresh_(group)
        assert group["lr"].item() == pytest.approx(lr)
    opt = torch.optim.AdamW([group])
    assert group["weight_decay"] == 0.0
    with torch.no_grad():
        temp.theta.fill_(math.log(1 / 0.029))
    temp.step_thresh_(group)
    assert group["lr"].item() == pytest.approx(1e-4)
    temp.theta.grad = torch.tensor(-1.0)
    opt.step()
    with torch.no_grad():
        temp.theta.fill_(9.0)
    temp.clamp_()
    assert temp.theta.item() == pytest.approx(math.log(100.0))
    assert temp().item() == pytest.approx(100.0)
    with torch.no_grad():
        temp.theta.fill_(math.log(1 / 0.5))
    temp.step_thresh_(group)
    assert group["lr"].item() == pytest.approx(3e-4)
