"""Varlen (packed) self-attention at masked-ViT lengths: ours vs PyTorch's and the peers' kernels.

GPU shape (ViT-B/16 with patch dropout): H = 12 heads, d = 64, 1024 sequences with lengths uniform
in [50, 260] (seeded), bf16, non-causal; fwd and fwd+bwd. Providers:
    * materialized  -- per-sequence reference (fastclip_kernels varlen_attention_ref): the baseline.
    * ours          -- varlen_attention_qkvpacked(backend="triton").
    * torch_varlen  -- torch.nn.attention.varlen.varlen_attn (torch >= 2.10, CUDA).
    * torch_nested  -- SDPA on nested jagged tensors (min/max seqlen given: no host reads).
    * flex          -- torch.compile(flex_attention) with a document mask over the packed tokens;
                       the BlockMask is built once outside the timed call (as once per batch).
    * sdpa_padded   -- dense SDPA on [B, H, 260, d] with a key-padding mask (a padded model).
    * flash_attn    -- flash_attn_varlen_qkvpacked_func, when installed.
    * xformers      -- memory_efficient_attention with a BlockDiagonalMask built outside the call.
Derived units from explicit models (flash-attention's convention), T = sum n_i tokens:
    FLOPs  fwd = 4 * sum_i n_i^2 * d * H (useful work: padding is not counted),
           fwd+bwd = 3.5 x fwd (backward = 2.5 x forward);
    bytes  fwd = 4 * T * H * d * elem (read q, k, v; write o),
           fwd+bwd = 12 * T * H * d * elem (+ read q, k, v, o, dO; write dq, dk, dv);
    the minimum traffic: LSE, delta and K/V re-reads that hit L2 are not counted. At these lengths
    the forward's intensity is ~n/2 FLOP/byte, below the H100/H200 ridge: GB/s is the unit to read.
CPU (no Triton interpreter here: too slow): a tiny fp32 shape for the PyTorch providers only.
"""

import statistics

import pytest
import torch
import torch.nn.functional as F
from harness import GIB, device, peak_bytes, sync

from fastclip_kernels.ops.varlen_attention import varlen_attention_qkvpacked, varlen_attention_ref

# name: (sequences, min length, max length, heads, head dim)
SHAPES = {"vit-b16-1024x[50,260]": (1024, 50, 260, 12, 64), "tiny-8x[10,60]": (8, 10, 60, 2, 32)}
GPU_PROVIDERS = [
    "materialized", "ours", "torch_varlen", "torch_nested", "flex", "sdpa_padded", "flash_attn", "xformers",
]  # fmt: skip
CPU_PROVIDERS = ["materialized", "torch_nested"]


def lengths_of(shape: str) -> list[int]:
    count, lo, hi, _, _ = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    return torch.randint(lo, hi + 1, (count,), generator=gen).tolist()


def models(shape: str, dtype: torch.dtype, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes) of one call, from the models in the module docstring."""
    lens = lengths_of(shape)
    _, _, _, heads, d = SHAPES[shape]
    flops = 4 * sum(n * n for n in lens) * d * heads
    tokens_bytes = sum(lens) * heads * d * dtype.itemsize
    return (flops, 4 * tokens_bytes) if mode == "fwd" else (3.5 * flops, 12 * tokens_bytes)


def _padded(x, lens, max_len):
    """[T, H, d] -> [B, H, max_len, d] with zero padding (built outside the timed call)."""
    out = x.new_zeros(len(lens), max_len, *x.shape[1:])
    for b, piece in enumerate(torch.split(x, lens)):
        out[b, : piece.shape[0]] = piece
    return out.transpose(1, 2)


def _attention(provider, qkv, cu, lens, max_len):
    """A closure computing the attention output of packed qkv [T, 3, H, d] with ``provider``."""
    q, k, v = qkv.unbind(1)
    if provider == "ours":
        return lambda: varlen_attention_qkvpacked(qkv, cu, max_len, backend="triton")
    if provider == "materialized":
        return lambda: varlen_attention_ref(q, k, v, cu)
    if provider == "torch_varlen":
        varlen = pytest.importorskip("torch.nn.attention.varlen", reason="needs torch >= 2.10")
        return lambda: varlen.varlen_attn(q, k, v, cu, cu, max_len, max_len)
    if provider == "torch_nested":  # NJT SDPA wants contiguous values: separate q, k, v leaves
        offsets = cu.to(torch.int64)
        q, k, v = (x.detach().contiguous().requires_grad_(qkv.requires_grad) for x in (q, k, v))

        def jagged(x):
            return torch.nested.nested_tensor_from_jagged(
                x, offsets=offsets, min_seqlen=min(lens), max_seqlen=max_len
            ).transpose(1, 2)

        return lambda: (
            F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v)).transpose(1, 2).values()
        )
    if provider == "flash_attn":
        fa = pytest.importorskip("flash_attn", reason="peer flash-attn not installed")
        return lambda: fa.flash_attn_varlen_qkvpacked_func(qkv, cu, max_len)
    if provider == "xformers":
        fmha = pytest.importorskip("xformers.ops.fmha", reason="peer xformers not installed")
        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(lens)
        return lambda: fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
    if provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(
            torch.arange(len(lens), device=qkv.device), torch.tensor(lens).to(qkv.device)
        )
        T = doc.numel()
        mask = create_block_mask(
            lambda b, h, i, j: doc[i] == doc[j], None, None, T, T, device=qkv.device, _compile=True
        )
        flex = torch.compile(flex_attention)
        return lambda: flex(*(x.transpose(0, 1)[None] for x in (q, k, v)), block_mask=mask)[0].transpose(0, 1)
    if provider == "sdpa_padded":
        qp, kp, vp = (_padded(x.detach(), lens, max_len).requires_grad_(qkv.requires_grad) for x in (q, k, v))
        keep = (
            torch.arange(max_len, device=qkv.device)[None, :] < torch.tensor(lens, device=qkv.device)[:, None]
        )
        mask = keep[:, None, None, :]
        return lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
    raise ValueError(provider)


def make_case(provider, shape, dtype, mode, dev):
    """A callable running one attention call (+ backward) on fresh inputs: module level for spawn."""
    dtype = getattr(torch, dtype)
    lens = lengths_of(shape)
    _, _, max_len, heads, d = SHAPES[shape]
    qkv = torch.randn(sum(lens), 3, heads, d, device=dev, dtype=dtype, requires_grad=mode != "fwd")
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32).to(dev)
    attention = _attention(provider, qkv, cu, lens, max_len)

    def run():
        out = attention()
        if mode == "fwd+bwd":
            out.backward(torch.ones_like(out))
        sync()

    return run


def _run(benchmark, record, provider, shape, dtype, mode, rounds):
    dev = device()
    row = dict(bench="varlen_attention", shape=f"{shape}-{dtype}", provider=provider, mode=mode)
    try:
        fn = make_case(provider, shape, dtype, mode, dev)
        fn()  # warm-up: Triton and torch.compile compile on the first call
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        peak = peak_bytes(make_case, provider, shape, dtype, mode, dev)
    except torch.OutOfMemoryError:
        record(**row, median_ms="OOM", peak_gib="OOM", tflops="", gbps="")
        pytest.skip(f"{provider} does not fit at {shape}")
    except (RuntimeError, NotImplementedError, TypeError) as err:  # a peer without this case
        if provider == "ours":
            raise
        pytest.skip(f"peer {provider} does not run here: {type(err).__name__}: {str(err)[:200]}")
    median = statistics.median(benchmark.stats.stats.data)
    flops, nbytes = models(shape, getattr(torch, dtype), mode)
    tflops, gbps = flops / median / 1e12, nbytes / median / 1e9
    benchmark.extra_info.update(peak_gib=peak / GIB, tflops=tflops, gbps=gbps)
    record(
        **row, median_ms=f"{median * 1e3:.3f}", peak_gib=f"{peak / GIB:.4f}", tflops=f"{tflops:.2f}",
        gbps=f"{gbps:.1f}",
    )  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shape; the GPU runs the ViT shape")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_varlen_attention_cpu(benchmark, record, provider, mode):
    _run(benchmark, record, provider, "tiny-8x[10,60]", "float32", mode, rounds=5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark: needs CUDA")
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_varlen_attention_gpu(benchmark, record, provider, mode):
    _run(benchmark, record, provider, "vit-b16-1024x[50,260]", "bfloat16", mode, rounds=20)
