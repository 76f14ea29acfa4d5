"""FastCLIPLoss on K = 2 and 4 gloo ranks vs the same loss in one process on the global batch.

After DDP's mean over ranks, the encoder and logit-scale gradients must equal the single-process
ones (fp64, rel. error <= 1e-10); the u / tau state, sharded by sample index, must equal the
single-process state for every index seen on any rank; the loss backward runs no collective and
the forward sends 2(K-1) b d s bytes of features plus O(b).
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import run_ranks
from helpers import assert_rel_close

from fastclip_kernels.distributed.comm import CommCounter
from fastclip_kernels.fastclip import FastCLIPLoss

N_DATA, B_GLOBAL, D_IN, D = 64, 8, 12, 6
BATCHES = [list(range(0, 8)), list(range(8, 16)), [3, 9, 14, 1, 30, 7, 0, 22], [22, 5, 9, 40, 3, 17, 8, 2]]
EPOCHS = [0, 0, 1, 2]


def _data(step):
    gen = torch.Generator().manual_seed(100 + step)
    img = torch.randn(B_GLOBAL, D_IN, generator=gen, dtype=torch.float64)
    txt = img + 0.5 * torch.randn(B_GLOBAL, D_IN, generator=gen, dtype=torch.float64)
    return img, txt


def _train(mode, rank, world_size, convention="exact", backend="chunked"):
    """Run the 4 steps on this rank's slice; returns per-step (loss, dW_img, dW_txt, ds) after the
    DDP-style mean, the state shard and the communication counts of the loss."""
    torch.manual_seed(0)
    dtype = torch.float64 if backend == "chunked" else torch.float32
    w_img = torch.randn(D_IN, D, dtype=torch.float64).to(dtype).requires_grad_()
    w_txt = torch.randn(D_IN, D, dtype=torch.float64).to(dtype).requires_grad_()
    theta = torch.tensor(2.3, dtype=dtype, requires_grad=True)
    fn = FastCLIPLoss(
        N_DATA, mode, rank=rank, world_size=world_size, gamma_min=0.3, gamma_decay_epochs=3,
        rho=2.0, convention=convention, state_dtype=torch.float64 if backend == "chunked" else torch.float32,
        backend=backend,
    )  # fmt: skip
    b = B_GLOBAL // world_size
    local = slice(rank * b, (rank + 1) * b)
    steps, counts = [], []
    for step, (batch, epoch) in enumerate(zip(BATCHES, EPOCHS, strict=True)):
        fn.set_epoch(epoch)
        img, txt = (t.to(dtype) for t in _data(step))
        x = F.normalize(img[local] @ w_img, dim=-1)
        y = F.normalize(txt[local] @ w_txt, dim=-1)
        scale = None if mode == "rgcl" else theta.exp()
        with CommCounter() as comm:
            loss = fn(x, y, scale, torch.tensor(batch[local]))
            loss.backward()
        counts.append((comm.calls("forward"), comm.bytes("forward"), comm.calls("backward")))
        params = [w_img, w_txt] + ([theta] if mode in ("clip", "rgcl_g") else [])
        for p in params:
            if world_size > 1:
                dist.all_reduce(p.grad)
            p.grad /= world_size  # DDP's mean
        steps.append([loss.detach()] + [p.grad.clone() for p in params])
        for p in params:
            p.grad = None
    state = {k: v.clone() for k, v in fn.state.state_dict().items() if torch.is_tensor(v)} if fn.state else {}
    return steps, state, counts


def _worker(rank, world_size):
    return {case: _train(*case[:1], rank, world_size, case[1]) for case in CASES}


def _full_state(shards, world_size, name):
    """Reassemble [2, N_DATA] from the rank shards: sample i is at rank i % K, slot i // K."""
    full = torch.empty(2, N_DATA, dtype=torch.float64)
    for i in range(N_DATA):
        full[:, i] = shards[i % world_size][name][:, i // world_size]
    return full


CASES = [("clip", "exact"), ("gcl", "exact"), ("rgcl", "exact"), ("rgcl_g", "exact"), ("rgcl_g", "reference")]
_RUNS: dict[int, list] = {}


def _ranks(world_size):
    """All cases on K gloo ranks in one spawn (process start dominates), cached per K."""
    if world_size not in _RUNS:
        _RUNS[world_size] = run_ranks(_worker, world_size)
    return _RUNS[world_size]


def expected_forward_bytes(mode, world_size, b, feature_bytes=8, stat_bytes=8, state_bytes=8):
    """Ring-model bytes one rank sends in the loss forward: features (+ int64 indices) in one
    all_gather, 5 statistics per pair in one all_gather, the state fetch in one all_reduce."""
    k1, n = world_size - 1, world_size * b
    gather = k1 * b * (2 * D * feature_bytes + (0 if mode == "clip" else 8))
    stats = k1 * b * 5 * stat_bytes
    fields = {"clip": 0, "rgcl": 2}.get(mode, 1)  # log u (and tau), for both modalities
    fetch = 2 * k1 * (fields * 2 * n * state_bytes) // world_size
    return gather + stats + fetch


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("mode, convention", CASES)
def test_distributed_matches_single_process(mode, convention, world_size):
    single, single_state, _ = _train(mode, 0, 1, convention)
    results = [by_case[(mode, convention)] for by_case in _ranks(world_size)]
    for rank, (steps, _, counts) in enumerate(results):
        for step, (got, want) in enumerate(zip(steps, single, strict=True)):
            for name, g, w in zip(("loss", "dW_img", "dW_txt", "ds"), got, want, strict=False):
                assert_rel_close(f"rank {rank} step {step} {name}", g, w, 1e-10)
        b = B_GLOBAL // world_size
        for fwd_calls, fwd_bytes, bwd_calls in counts:
            assert bwd_calls == 0, "the loss backward must run no collective"
            assert fwd_calls == (2 if mode == "clip" else 3)
            assert fwd_bytes == expected_forward_bytes(mode, world_size, b)
    seen = sorted({i for batch in BATCHES for i in batch})
    shards = [state for _, state, _ in results]
    for name in single_state:
        full = _full_state(shards, world_size, name)
        assert_rel_close(f"state {name}", full[:, seen], single_state[name][:, seen], 1e-10)


def _errors_and_triton(rank, world_size):
    """Bad global batches (errors are returned, not raised) and the Triton path on K ranks."""
    b = B_GLOBAL // world_size
    x, y = (t.float() for t in _data(0))
    out = {}
    fn = FastCLIPLoss(N_DATA, "gcl", rank=rank, world_size=world_size)
    try:  # rank 0 and rank 1 both send sample b - 1
        fn(x[:b], y[:b], 10.0, torch.arange(b) + rank * (b - 1))
    except ValueError as err:
        out["duplicate"] = str(err)
    try:
        FastCLIPLoss(N_DATA, "gcl", rank=rank, world_size=world_size + 1)(x[:b], y[:b], 10.0, torch.arange(b))
    except ValueError as err:
        out["group"] = str(err)
    out["triton"] = _train("rgcl", rank, world_size, backend="triton")
    return out


def test_errors_and_triton_path_on_two_ranks():
    results = run_ranks(_errors_and_triton, 2)
    single, single_state, _ = _train("rgcl", 0, 1)
    for rank, res in enumerate(results):
        assert "duplicate sample indices" in res["duplicate"] and "global batch" in res["duplicate"]
        assert "do not match the process group (rank" in res["group"]
        steps, _, counts = res["triton"]
        assert all(bwd == 0 for _, _, bwd in counts)
        for step, (got, want) in enumerate(zip(steps, single, strict=True)):
            for name, g, w in zip(("loss", "dW_img", "dW_txt"), got, want, strict=True):
                assert_rel_close(f"triton rank {rank} step {step} {name}", g.double(), w, 1e-4)
    seen = sorted({i for batch in BATCHES for i in batch})
    shards = [res["triton"][1] for res in results]
    for name in single_state:
        full = _full_state([{k: v.double() for k, v in s.items()} for s in shards], 2, name)
        assert_rel_close(f"triton state {name}", full[:, seen], single_state[name][:, seen], 1e-4, 1e-5)
