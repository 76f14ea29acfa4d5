"""FastSigLipLoss on K = 2 and 4 gloo ranks against the single-process global batch (fp64).

A tiny shared linear encoder (same seed everywhere) embeds each rank's slice of one global batch;
parameter gradients (encoders, logit_scale = exp(theta), logit_bias) are averaged over ranks as DDP
does and must equal the gradient of ``sigmoid_loss_ref`` on the concatenated batch (ratio 1.0). Each
rank's value must be open_clip's (its rows against all texts). CommCounter: one all-gather forward,
nothing in the backward, bytes beside FastContrastiveLoss(low_comm=True)'s. Every dist_impl name
gives the same bits. One spawn per K (results cached).
"""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from dist_harness import run_ranks
from helpers import assert_rel_close

from fastclip_kernels import FastContrastiveLoss, FastSigLipLoss
from fastclip_kernels.distributed import DIST_IMPLS, CommCounter
from fastclip_kernels.ops.contrastive_loss.naive import contrastive_loss_ref
from fastclip_kernels.ops.sigmoid_loss.naive import sigmoid_loss_ref

B_GLOBAL, D_IN, D, S = 8, 12, 6, 8  # S: bytes per fp64 feature element
WORLD_SIZES = [2, 4]
NAMES = ("w_img", "w_txt", "theta", "bias")


def _model_and_data():
    gen = torch.Generator().manual_seed(0)
    w_img = torch.randn(D_IN, D, generator=gen, dtype=torch.float64).requires_grad_()
    w_txt = torch.randn(D_IN, D, generator=gen, dtype=torch.float64).requires_grad_()
    theta = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)  # logit_scale = exp(theta)
    bias = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    img = torch.randn(B_GLOBAL, D_IN, generator=gen, dtype=torch.float64)
    txt = img + 0.7 * torch.randn(B_GLOBAL, D_IN, generator=gen, dtype=torch.float64)
    return [w_img, w_txt, theta, bias], img, txt


def _encode(params, img, txt):
    w_img, w_txt, _, _ = params
    return F.normalize(img @ w_img, dim=-1), F.normalize(txt @ w_txt, dim=-1)


def _step(rank, world_size, make_loss, with_bias=True):
    """(loss, DDP-mean parameter gradients, {phase: (calls, bytes, ops)}) of one forward/backward."""
    b = B_GLOBAL // world_size
    params, img, txt = _model_and_data()
    x, y = _encode(params, img[rank * b : (rank + 1) * b], txt[rank * b : (rank + 1) * b])
    with CommCounter() as comm:
        loss = make_loss()(x, y, params[2].exp(), params[3] if with_bias else None)
        loss.backward()
    grads = []
    for p in params:
        g = p.grad if p.grad is not None else torch.full_like(p, float("nan"))  # None: visibly wrong
        dist.all_reduce(g)
        grads.append(g / world_size)  # DDP's mean
    phases = {
        ph: (comm.calls(ph), comm.bytes(ph), [e.op for e in comm.events if e.phase == ph])
        for ph in ("forward", "backward")
    }
    return loss.detach(), grads, phases, comm.table()


def _rank_checks(rank, world_size):
    out = {"siglip": {}}
    for impl in (None, *DIST_IMPLS):
        make = functools.partial(
            FastSigLipLoss, rank=rank, world_size=world_size, dist_impl=impl, backend="chunked"
        )
        out["siglip"][impl] = _step(rank, world_size, make)
    make_clip = functools.partial(
        FastContrastiveLoss, rank=rank, world_size=world_size, low_comm=True, backend="chunked"
    )
    out["clip_low_comm"] = _step(rank, world_size, make_clip)
    errors = []
    for bad_rank, bad_size in [((rank + 1) % world_size, world_size), (rank, world_size + 1)]:
        for cls in (FastSigLipLoss, FastContrastiveLoss):
            try:
                cls(rank=bad_rank, world_size=bad_size)
                errors.append(None)
            except ValueError as exc:
                errors.append(str(exc))
    out["errors"] = errors
    return out


@functools.cache
def _results(world_size):
    return run_ranks(_rank_checks, world_size)


def _reference(world_size):
    """Single-process fp64: global SigLIP and CLIP losses with their gradients; open_clip's per-rank
    SigLIP values (rank r's rows against all texts)."""
    params, img, txt = _model_and_data()
    x, y = _encode(params, img, txt)
    scale, bias = params[2].exp(), params[3]
    glob = sigmoid_loss_ref(x, y, scale, bias)
    g_glob = torch.autograd.grad(glob, params, retain_graph=True)
    b = B_GLOBAL // world_size
    per_rank = [sigmoid_loss_ref(x[r * b : (r + 1) * b], y, scale, bias, r * b) for r in range(world_size)]
    clip = contrastive_loss_ref(x, y, scale, bias)
    g_clip = torch.autograd.grad(clip, params)
    return glob.detach(), g_glob, [v.detach() for v in per_rank], clip.detach(), g_clip


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_siglip_value_and_gradients_equal_the_global_batch(world_size):
    glob, g_glob, per_rank, _, _ = _reference(world_size)
    assert_rel_close("mean of open_clip's per-rank values", sum(per_rank) / world_size, glob, 1e-13)
    for rank, res in enumerate(_results(world_size)):
        for impl, (loss, got, _, _) in res["siglip"].items():
            tag = f"K={world_size} rank {rank} dist_impl={impl}"
            assert_rel_close(f"{tag} loss (open_clip's value on this rank)", loss, per_rank[rank], 1e-12)
            for name, g, w in zip(NAMES, got, g_glob, strict=True):
                assert_rel_close(f"{tag} d{name} (ratio 1.0)", g, w, 1e-10)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_dist_impl_gives_the_same_bits(world_size):
    for res in _results(world_size):
        base_loss, base_grads, base_comm, _ = res["siglip"][None]
        for impl in DIST_IMPLS:
            loss, got, comm, _ = res["siglip"][impl]
            assert torch.equal(loss, base_loss) and comm == base_comm, impl
            assert all(torch.equal(g, w) for g, w in zip(got, base_grads, strict=True)), impl


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_one_gather_forward_no_backward_collective_bytes_beside_clip(world_size):
    k, b = world_size, B_GLOBAL // world_size
    feature_bytes = 2 * (k - 1) * b * D * S  # [b, 2D] fp64 packed, (K-1) copies sent
    for rank, res in enumerate(_results(world_size)):
        _, _, comm, table = res["siglip"][None]
        _, _, clip_comm, clip_table = res["clip_low_comm"]
        if rank == 0:
            print(f"K={k} SigLIP:\n{table}\nK={k} CLIP low_comm:\n{clip_table}")
        assert comm["forward"] == (1, feature_bytes, ["all_gather_single"])
        assert comm["backward"] == (0, 0, [])
        # CLIP's low-comm path: the same feature gather plus 5 fp64 statistics per pair
        assert clip_comm["forward"][:2] == (2, feature_bytes + (k - 1) * b * 5 * S)
        assert clip_comm["backward"] == (0, 0, [])


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_clip_low_comm_gives_logit_bias_its_zero_gradient(world_size):
    _, _, _, clip, g_clip = _reference(world_size)
    assert abs(g_clip[3].item()) < 1e-13  # the bias cancels in the softmax
    for res in _results(world_size):
        loss, got, _, _ = res["clip_low_comm"]
        assert_rel_close("CLIP low_comm loss (global)", loss, clip, 1e-12)
        assert torch.equal(got[3], torch.zeros_like(got[3])), "logit_bias must get a 0 gradient, not None"
        for name, g, w in zip(NAMES[:3], got[:3], g_clip[:3], strict=True):
            assert_rel_close(f"d{name}", g, w, 1e-10)


@pytest.mark.parametrize("world_size", [2])
def test_rank_and_world_size_are_checked_against_the_process_group(world_size):
    for res in _results(world_size):
        assert all(e is not None and "do not match the process group" in e for e in res["errors"]), res[
            "errors"
        ]
