"""FastContrastiveLoss on K = 2 and 4 gloo ranks against the single-process global batch (fp64).

A tiny shared linear encoder (same seed everywhere) embeds each rank's slice of one global batch;
parameter gradients are averaged over ranks as DDP does. open_clip's conventions, measured against
the gradient of ``contrastive_loss_ref`` on the concatenated batch: ratio 1.0 with ``gather_with_grad``,
1/K for the encoders with the naive gather (logit_scale 1.0). CommCounter checks the bytes of the
gathers and of their reduce-scatter backward; ``all_gather_packed`` must round-trip bit-exactly in
one collective. One spawn per K (results cached), plus two harness tests.
"""

import functools
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from dist_harness import RankError, run_ranks
from helpers import assert_rel_close

from fastclip_kernels import FastContrastiveLoss
from fastclip_kernels.distributed import CommCounter, all_gather_packed
from fastclip_kernels.ops.contrastive_loss.naive import contrastive_loss_local_ref, contrastive_loss_ref

B_GLOBAL, D_IN, D, S = 8, 12, 6, 8  # S: bytes per fp64 feature element
MODES = [(True, True), (False, True), (False, False), (True, False)]  # (local_loss, gather_with_grad)
WORLD_SIZES = [2, 4]


def _model_and_data():
    gen = torch.Generator().manual_seed(0)
    w_img = torch.randn(D_IN, D, generator=gen, dtype=torch.float64).requires_grad_()
    w_txt = torch.randn(D_IN, D, generator=gen, dtype=torch.float64).requires_grad_()
    theta = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)  # logit_scale = exp(theta)
    img = torch.randn(B_GLOBAL, D_IN, generator=gen, dtype=torch.float64)
    txt = img + 0.7 * torch.randn(B_GLOBAL, D_IN, generator=gen, dtype=torch.float64)
    return [w_img, w_txt, theta], img, txt


def _encode(params, img, txt):
    w_img, w_txt, _ = params
    return F.normalize(img @ w_img, dim=-1), F.normalize(txt @ w_txt, dim=-1)


def _packed_parts(rank, b):
    """bf16 / fp32 / int64 parts with rank-specific bits (NaN payloads, -0.0, inf, big ints)."""
    bf16 = (torch.arange(b * 5, dtype=torch.int16).reshape(b, 5) * 977 + 31 * rank).view(torch.bfloat16)
    fp32 = torch.randn(b, 3, generator=torch.Generator().manual_seed(rank))
    fp32[0] = torch.tensor([-0.0, float("inf"), float("nan")])
    int64 = torch.arange(b, dtype=torch.int64) * (2**40 + 7) + rank - 2**62
    return [bf16, fp32, int64]


def _comm(comm):
    return {
        ph: (comm.calls(ph), comm.bytes(ph), [e.op for e in comm.events if e.phase == ph])
        for ph in ("forward", "backward")
    }


def _rank_checks(rank, world_size):
    """Every mode's loss and DDP-mean gradients, with counts; the packed gather; CommCounter probes."""
    b = B_GLOBAL // world_size
    local = slice(rank * b, (rank + 1) * b)
    out = {"modes": {}}
    for local_loss, gwg in MODES:
        params, img, txt = _model_and_data()
        x, y = _encode(params, img[local], txt[local])
        fn = FastContrastiveLoss(local_loss, gwg, rank=rank, world_size=world_size, backend="chunked")
        with CommCounter() as comm:
            loss = fn(x, y, params[2].exp())
            loss.backward()
        for p in params:
            dist.all_reduce(p.grad)
            p.grad /= world_size  # DDP's mean
        out["modes"][(local_loss, gwg)] = (loss.detach(), [p.grad for p in params], _comm(comm))
    params, img, txt = _model_and_data()
    x, y = _encode(params, img[local], txt[local])
    fn = FastContrastiveLoss(rank=rank, world_size=world_size, backend="chunked", low_comm=True)
    with CommCounter() as comm:
        loss = fn(x, y, params[2].exp())
        loss.backward()
    for p in params:
        dist.all_reduce(p.grad)
        p.grad /= world_size
    out["low_comm"] = (loss.detach(), [p.grad for p in params], _comm(comm))
    parts = _packed_parts(rank, b)
    with CommCounter() as comm:
        out["packed"] = all_gather_packed(parts)
    out["packed_comm"] = (_comm(comm), [e.shape for e in comm.events], [e.dtype for e in comm.events])
    with CommCounter() as comm:  # a P2POp built from the patched isend; all_reduce; dist.nn backward
        send, recv = torch.full((3,), float(rank)), torch.empty(3)
        ops = [
            dist.P2POp(dist.isend, send, (rank + 1) % world_size),
            dist.P2POp(dist.irecv, recv, (rank - 1) % world_size),
        ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        dist.all_reduce(torch.ones(world_size * 4))
        z = torch.ones(b, D, requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecated in torch 2.13
            torch.cat(dist_nn.all_gather(z)).sum().backward()
    out["probe"] = (recv, z.grad, [(e.op, e.bytes, e.phase) for e in comm.events], comm.table())
    return out


@functools.cache
def _results(world_size):
    start = time.perf_counter()
    results = run_ranks(_rank_checks, world_size)
    print(f"K={world_size}: {time.perf_counter() - start:.1f} s for one spawn")
    return results


def _reference(world_size):
    """Single-process fp64: the global-batch gradient and open_clip's per-rank local losses."""
    params, img, txt = _model_and_data()
    x, y = _encode(params, img, txt)
    scale = params[2].exp()
    glob = contrastive_loss_ref(x, y, scale)
    g_glob = torch.autograd.grad(glob, params, retain_graph=True)
    b = B_GLOBAL // world_size
    local_losses = [
        contrastive_loss_local_ref(x[r * b : (r + 1) * b], y[r * b : (r + 1) * b], x, y, scale, r * b)
        for r in range(world_size)
    ]
    # open_clip local_loss without gather_with_grad: the gathered columns carry no gradient
    detached = [
        contrastive_loss_local_ref(
            x[r * b : (r + 1) * b], y[r * b : (r + 1) * b], x.detach(), y.detach(), scale, r * b
        )
        for r in range(world_size)
    ]
    g_local_nograd = torch.autograd.grad(sum(detached) / world_size, params)
    return glob.detach(), g_glob, [v.detach() for v in local_losses], g_local_nograd


def _ratio(g, ref):
    return (torch.dot(g.flatten(), ref.flatten()) / torch.dot(ref.flatten(), ref.flatten())).item()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_gradient_conventions(world_size):
    glob, g_glob, local_losses, g_local_nograd = _reference(world_size)
    k = world_size
    expected = {  # (encoder ratio, logit_scale ratio) vs the global-batch gradient
        (True, True): (1.0, 1.0),
        (False, True): (1.0, 1.0),
        (False, False): (1.0 / k, 1.0),
    }
    for rank, res in enumerate(_results(world_size)):
        for mode, (loss, got, _) in res["modes"].items():
            tag = f"K={k} rank {rank} local_loss={mode[0]} gather_with_grad={mode[1]}"
            want_loss = local_losses[rank] if mode[0] else glob
            assert_rel_close(f"{tag} loss", loss, want_loss, 1e-12)
            if mode == (True, False):  # open_clip: only the local rows carry gradient
                for name, g, w in zip(("w_img", "w_txt", "theta"), got, g_local_nograd, strict=True):
                    assert_rel_close(f"{tag} d{name}", g, w, 1e-10)
                continue
            enc, ls = expected[mode]
            for name, g, w, r in zip(("w_img", "w_txt", "theta"), got, g_glob, (enc, enc, ls), strict=True):
                print(f"{tag} d{name} ratio {_ratio(g, w):.15f}")
                assert_rel_close(f"{tag} d{name} (ratio {r})", g, r * w, 1e-10)
    assert_rel_close("mean of local losses", sum(local_losses) / k, glob, 1e-12)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_low_comm_is_exact_with_half_the_bytes_and_no_backward_collective(world_size):
    glob, g_glob, _, _ = _reference(world_size)
    k, b = world_size, B_GLOBAL // world_size
    for rank, res in enumerate(_results(world_size)):
        loss, got, comm = res["low_comm"]
        assert_rel_close(f"rank {rank} loss (global on every rank)", loss, glob, 1e-12)
        for name, g, w in zip(("w_img", "w_txt", "theta"), got, g_glob, strict=True):
            assert_rel_close(f"rank {rank} d{name} (ratio 1.0)", g, w, 1e-10)
        feature_bytes = 2 * (k - 1) * b * D * S  # one stacked all_gather, no indices in clip mode
        assert comm["forward"][:2] == (2, feature_bytes + (k - 1) * b * 5 * S)
        assert comm["backward"] == (0, 0, [])
        _, _, gwg = res["modes"][(True, True)]
        assert 2 * feature_bytes == gwg["forward"][1] + gwg["backward"][1]  # half of gather_with_grad


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_naive_gather_is_off_by_k(world_size):
    """Guard: the naive gather's encoder gradient is 1/K, which ratio 1.0 would not pass."""
    _, g_glob, _, _ = _reference(world_size)
    _, got, _ = _results(world_size)[0]["modes"][(False, False)]
    for g, w in zip(got[:2], g_glob[:2], strict=True):
        assert abs(_ratio(g, w) - 1.0 / world_size) < 1e-12
    assert abs(_ratio(got[2], g_glob[2]) - 1.0) < 1e-12


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_comm_bytes(world_size):
    k, b = world_size, B_GLOBAL // world_size
    gather_bytes = 2 * (k - 1) * b * D * S  # two [b, D] fp64 all_gathers
    for res in _results(world_size):
        for (_, gwg), (_, _, comm) in res["modes"].items():
            assert comm["forward"] == (
                2,
                gather_bytes,
                ["all_gather_single"] * 2 if gwg else ["all_gather"] * 2,
            )
            if gwg:  # reduce-scatter of two [K*b, D] gradients: (K-1)/K of K*b*D*S each
                assert comm["backward"] == (2, gather_bytes, ["reduce_scatter_single"] * 2)
            else:
                assert comm["backward"] == (0, 0, [])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_all_gather_packed(world_size):
    k, b = world_size, B_GLOBAL // world_size
    want = [torch.cat(ps) for ps in zip(*(_packed_parts(r, b) for r in range(k)), strict=True)]
    row_bytes = 5 * 2 + 3 * 4 + 8
    as_int = {torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.int64: torch.int64}
    for res in _results(world_size):
        for got, w in zip(res["packed"], want, strict=True):
            assert got.dtype == w.dtype and got.shape == w.shape
            assert torch.equal(got.view(as_int[w.dtype]), w.view(as_int[w.dtype])), "not bit-exact"
        comm, shapes, dtypes = res["packed_comm"]
        assert comm["forward"] == (1, (k - 1) * b * row_bytes, ["all_gather_single"])
        assert shapes == [(b, row_bytes)] and dtypes == [torch.uint8]


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_comm_counter_probes(world_size):
    k, b = world_size, B_GLOBAL // world_size
    for rank, res in enumerate(_results(world_size)):
        recv, z_grad, events, table = res["probe"]
        assert torch.equal(recv, torch.full((3,), float((rank - 1) % k)))
        assert torch.equal(z_grad, torch.full((b, D), float(k)))  # summed over the K ranks
        assert events[0] == ("batch_isend_irecv", 3 * 4, "forward")
        assert events[1] == ("all_reduce", 2 * (k - 1) * 4 * 4, "forward")
        assert events[2] == ("all_gather", (k - 1) * b * D * 4, "forward")
        # gloo: dist.nn's backward emulates the reduce-scatter with K scatters (we send one)
        assert [e[0] for e in events[3:]] == ["scatter"] * k
        assert all(e[2] == "backward" for e in events[3:])
        assert sum(e[1] for e in events[3:]) == (k - 1) * b * D * 4
        assert "scatter" in table and "backward" in table


def test_comm_counter_restores_on_exception():
    original = dist.all_gather
    with pytest.raises(KeyError), CommCounter():
        assert dist.all_gather is not original and dist.all_gather == original
        raise KeyError("inside the counter")
    assert dist.all_gather is original


def _raise_on_rank_1(rank, world_size):
    if rank == 1:
        raise RuntimeError("boom from rank 1")
    dist.barrier()  # rank 0 would hang here without the harness


def _hang(rank, world_size):
    time.sleep(600)


def test_run_ranks_reraises_rank_exception():
    with pytest.raises(RankError, match="boom from rank 1") as info:
        run_ranks(_raise_on_rank_1, 2)
    assert "_raise_on_rank_1" in str(info.value)  # the rank's traceback


def test_run_ranks_times_out():
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        run_ranks(_hang, 2, timeout=4)
    assert time.monotonic() - start < 30
