"""How ``training.dist.setup`` picks a CUDA device and opens the group, under faked launchers (no GPU)."""

import datetime

import pytest
import torch

from training import dist


@pytest.mark.parametrize(
    "local_rank, rank, visible, index",
    [
        ("3", 3, 8, 3),  # torchrun: every process sees the node's 8 GPUs
        ("3", 3, 1, 0),  # --gpus-per-task=1: LOCAL_RANK 3, one visible GPU
        (None, 5, 4, 1),  # no LOCAL_RANK: round robin over the visible devices
        ("", 0, 1, 0),
    ],
)
def test_cuda_device_index(local_rank, rank, visible, index):
    assert dist.cuda_device_index(local_rank, rank, visible) == index


def test_cuda_device_index_errors():
    with pytest.raises(RuntimeError, match="LOCAL_RANK=3 but this process sees 2"):
        dist.cuda_device_index("3", 3, 2)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        dist.cuda_device_index("0", 0, 0)


@pytest.fixture
def fake_launcher(monkeypatch):
    """RANK / WORLD_SIZE / LOCAL_RANK of a launcher, a fake CUDA runtime and a fake group opener."""
    calls = {"set_device": [], "init": []}
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
    monkeypatch.setattr(dist.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist.dist, "init_process_group", lambda *a, **k: calls["init"].append((a, k)))

    def launch(rank, world, local_rank, visible):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        return calls

    return launch


def test_one_visible_gpu_per_process(fake_launcher):
    calls = fake_launcher(rank=5, world=8, local_rank=5, visible=1)
    ranks = dist.setup("cuda")
    assert ranks.device == torch.device("cuda", 0) and calls["set_device"] == [0]
    assert (ranks.rank, ranks.world_size, ranks.owns_group) == (5, 8, True)


def test_group_timeout_is_passed_to_the_process_group(fake_launcher):
    calls = fake_launcher(rank=1, world=2, local_rank=1, visible=2)
    dist.setup("cuda", timeout_minutes=45)
    (backend,), kwargs = calls["init"][0]
    assert backend == "nccl" and kwargs["timeout"] == datetime.timedelta(minutes=45)
    calls["init"].clear()
    dist.setup("cpu")
    assert calls["init"][0][0] == ("gloo",) and calls["init"][0][1]["timeout"] is None
