"""Loss-related bytes per rank per step on K gloo ranks, counted with ``CommCounter``: open_clip's
local loss with gather_with_grad vs FastContrastiveLoss(low_comm=True) vs FastCLIPLoss modes vs
FastSigLipLoss (one no-grad gather, 2 (K-1) b d s bytes; open_clip's neighbour exchange sends the
same bytes in 2 (K-1) calls, half of them in the backward), next to
the DDP gradient all-reduce of a ViT-B/32 CLIP (analytic: 2 (K-1)/K * 4 P bytes, P = 151.3M).

Shape: FastCLIP's "large" setting, b = 256 per rank, d = 512, fp32 features (s = 4 bytes).
Bytes do not depend on the machine; the time column is the whole K-process step on this machine
(process start included), reported for completeness only.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from dist_harness import run_ranks  # noqa: E402

from fastclip_kernels import FastCLIPLoss, FastContrastiveLoss, FastSigLipLoss  # noqa: E402
from fastclip_kernels.distributed import CommCounter  # noqa: E402

B, D, P_VIT_B32 = 256, 512, 151_277_313
SCHEMES = [
    "open_clip-gwg",
    "low_comm-clip",
    "fastclip-gcl",
    "fastclip-rgcl_g",
    "fastclip-rgcl",
    "fast-siglip",
]


def _loss_fn(scheme, rank, world_size):
    kind, mode = scheme.split("-")
    if kind == "open_clip":
        return FastContrastiveLoss(True, True, rank=rank, world_size=world_size), mode
    if kind == "fast":
        return FastSigLipLoss(rank=rank, world_size=world_size), mode
    if kind == "low_comm":
        return FastContrastiveLoss(rank=rank, world_size=world_size, low_comm=True), mode
    return FastCLIPLoss(1_000_000, mode, rank=rank, world_size=world_size, gamma_min=0.2), mode


def _rank(rank, world_size):
    rows = {}
    gen = torch.Generator().manual_seed(rank)
    for scheme in SCHEMES:
        fn, mode = _loss_fn(scheme, rank, world_size)
        x = F.normalize(torch.randn(B, D, generator=gen), dim=-1).requires_grad_()
        y = F.normalize(torch.randn(B, D, generator=gen), dim=-1).requires_grad_()
        scale = None if mode == "rgcl" else torch.tensor(14.3, requires_grad=True)
        idx = torch.arange(B) * world_size + rank
        with CommCounter() as comm:
            extra = {"fastclip": (idx,), "fast": (-10.0,)}.get(scheme.split("-")[0], ())  # idx / bias
            loss = fn(x, y, scale, *extra)
            loss.backward()
        rows[scheme] = {ph: (comm.calls(ph), comm.bytes(ph)) for ph in ("forward", "backward")}
    return rows


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_loss_communication(benchmark, record, world_size):
    results = benchmark.pedantic(  # K = 8 processes on a busy 2-core machine: minutes
        run_ranks, args=(_rank, world_size), kwargs=dict(timeout=900), rounds=1, iterations=1
    )
    k = world_size
    ddp = 2 * (k - 1) * 4 * P_VIT_B32 // k
    print(f"\nK={k}, b={B}, d={D}, fp32; DDP all-reduce of ViT-B/32 grads: {ddp / 1e6:.1f} MB")
    for scheme in SCHEMES:
        (fc, fb), (bc, bb) = results[0][scheme]["forward"], results[0][scheme]["backward"]
        total = fb + bb
        print(
            f"  {scheme:16s} fwd {fc} calls {fb / 1e6:7.3f} MB | bwd {bc} calls {bb / 1e6:7.3f} MB | "
            f"total {total / 1e6:7.3f} MB = {100 * total / ddp:.2f}% of DDP"
        )
        record(
            bench="loss_communication", shape=f"K{k}-b{B}-d{D}-float32", provider=scheme, mode="fwd+bwd",
            median_ms="", peak_gib="", tflops="", fwd_calls=fc, bwd_calls=bc, loss_bytes=total, ddp_bytes=ddp,
        )  # fmt: skip
        if scheme != "open_clip-gwg":
            assert bc == 0 and bb == 0, f"{scheme}: the backward must run no collective"
            assert 2 * (k - 1) * B * D * 4 <= fb <= 2 * (k - 1) * B * D * 4 + 200 * (k - 1) * B
