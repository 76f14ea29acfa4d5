"""Packed CLIP towers equal the dense padded towers with the same weights: fp64 on CPU with the
reference attention (rel. error <= 1e-10, output and the gradient of every parameter), variable
keep counts per image and caption lengths; the Triton path within the tolerance rule; position
embedding resizing; state_dict compatibility; bad input; no host reads."""

import importlib

import pytest
import torch
from conftest import triton_device
from helpers import assert_close_to_ref, assert_rel_close
from host_reads import HostReads

import fastclip_kernels._validation as validation
from fastclip_kernels.models import DenseTextTransformer, DenseViT, PackedTextTransformer, PackedViT
from fastclip_kernels.ops.patch_embed import pos_embed_2d_sincos

attention = importlib.import_module(
    "fastclip_kernels.ops.varlen_attention"
)  # ops exports a same-named function

VIT = dict(image_size=32, patch_size=8, width=32, layers=2, heads=2, output_dim=16)
TEXT = dict(vocab_size=50, context_length=12, width=32, layers=2, heads=2, output_dim=16)
RTOL = 1e-10


def _vit_pair(pos_embed="learned", patch_bias=True, dtype=torch.float64):
    packed = PackedViT(**VIT, attn_backend="reference", pos_embed=pos_embed, patch_bias=patch_bias)
    dense = DenseViT(**VIT, pos_embed=pos_embed, patch_bias=patch_bias)
    with torch.no_grad():  # non-trivial LayerNorm and bias values
        for name, p in packed.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    dense.load_state_dict(packed.state_dict())
    return packed.to(dtype), dense.to(dtype)


def _compare(name, packed, dense, out_p, out_d):
    assert_rel_close(name, out_p, out_d, rtol=RTOL)
    g = torch.randn_like(out_d)
    (out_p * g).sum().backward()
    (out_d * g).sum().backward()
    dense_params = dict(dense.named_parameters())
    for pname, p in packed.named_parameters():
        assert p.grad is not None, f"no gradient for {pname}"
        assert_rel_close(f"{name}: d{pname}", p.grad, dense_params[pname].grad, rtol=RTOL)


KEEPS = {  # name: (keep_idx, cu_seqlens) for B = 3 images of a 4x4 grid
    "all": (None, None),
    "fixed_k4": (torch.tensor([[0, 5, 10, 15], [3, 2, 1, 0], [7, 8, 9, 6]]), None),
    "varlen_1_16_6": (torch.cat([torch.tensor([11]), torch.randperm(16), torch.randperm(16)[:6]]), torch.tensor([0, 1, 17, 23])),
}  # fmt: skip


@pytest.mark.parametrize("keep", KEEPS, ids=str)
@pytest.mark.parametrize(
    "pos_embed,patch_bias", [("learned", True), ("sincos", False)], ids=["learned", "sincos"]
)
def test_vit_equals_dense(keep, pos_embed, patch_bias):
    packed, dense = _vit_pair(pos_embed, patch_bias)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    keep_idx, cu = KEEPS[keep]
    out_p = packed(images, keep_idx, cu_seqlens=cu)
    out_d = dense(images, keep_idx, cu_seqlens=cu)
    _compare(f"vit[{keep}]", packed, dense, out_p, out_d)


@pytest.mark.parametrize("lengths", [[5, 12, 1], [12, 12, 12]], ids=["varlen_5_12_1", "full"])
def test_text_equals_dense(lengths):
    packed = PackedTextTransformer(**TEXT, attn_backend="reference").double()
    dense = DenseTextTransformer(**TEXT).double()
    dense.load_state_dict(packed.state_dict())
    ids = torch.randint(0, TEXT["vocab_size"], (3, 12))
    _compare("text", packed, dense, packed(ids, lengths=lengths), dense(ids, lengths))


def test_text_packed_and_padded_inputs_agree():
    packed = PackedTextTransformer(**TEXT, attn_backend="reference").double()
    ids = torch.randint(0, TEXT["vocab_size"], (3, 12))
    lengths = [4, 1, 9]
    flat = torch.cat([ids[b, :n] for b, n in enumerate(lengths)])
    cu = torch.tensor([0, 4, 5, 14], dtype=torch.int32)
    out_packed = packed(flat, cu, max_seqlen=9)
    out_upper = packed(flat, cu, max_seqlen=12)  # an upper bound is fine
    out_padded = packed(ids, lengths=lengths)
    assert torch.equal(out_packed, out_padded) and torch.equal(out_packed, out_upper)
    # Padding content never matters; caption b is the caption alone.
    alone = packed(ids[2:3, :9], lengths=[9])
    assert_rel_close("caption alone", out_packed[2:3], alone, rtol=RTOL)


def test_vit_triton_path_within_tolerance():
    """Triton patch embedding + Triton varlen attention (interpreter on CPU) vs the dense fp64 tower."""
    dev = triton_device()
    packed, dense = _vit_pair(dtype=torch.float64)
    tri = PackedViT(**VIT, attn_backend="triton", patch_backend="triton", patch_bias=True)
    tri.load_state_dict(packed.state_dict())
    torch_fp32 = DenseViT(**VIT, patch_bias=True)
    torch_fp32.load_state_dict(packed.state_dict())
    images = torch.randn(2, 3, 32, 32)
    keep, cu = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0, 15]), torch.tensor([0, 3, 9])
    out = tri.to(dev)(images.to(dev), keep.to(dev), cu_seqlens=cu)
    ref64 = dense(images.double(), keep, cu_seqlens=cu)
    ref32 = torch_fp32(images, keep, cu_seqlens=cu)
    assert_close_to_ref("vit triton", out, ref64, ref32)


def test_text_triton_path_within_tolerance():
    """Causal Triton varlen attention (interpreter on CPU) in fp32 vs the dense fp64 tower."""
    dev = triton_device()
    packed = PackedTextTransformer(**TEXT, attn_backend="triton")
    dense = DenseTextTransformer(**TEXT)
    dense.load_state_dict(packed.state_dict())
    ids, lengths = torch.randint(0, TEXT["vocab_size"], (3, 12)), [7, 1, 12]
    out = packed.to(dev)(ids.to(dev), lengths=lengths)
    ref32 = dense(ids, lengths)
    ref64 = dense.double()(ids, lengths)
    assert_close_to_ref("text triton", out, ref64, ref32)


def test_resize_pos_embed():
    packed, dense = _vit_pair("learned")
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = packed(images)
    packed.resize_pos_embed(32)  # unchanged grid: identity
    assert torch.equal(packed(images), before)
    packed.resize_pos_embed((48, 64))
    assert packed.positional_embedding.shape == (1 + 6 * 8, 32) and packed.grid_size == (6, 8)
    assert isinstance(packed.positional_embedding, torch.nn.Parameter)
    assert packed(torch.randn(2, 3, 48, 64, dtype=torch.float64)).shape == (2, 16)
    with pytest.raises(ValueError, match="resize_pos_embed"):
        packed(images)
    sincos = PackedViT(**VIT, attn_backend="reference", pos_embed="sincos")
    sincos.resize_pos_embed(40, learnable=True)  # CLIPA fine-tuning: learned, from the sin-cos table
    assert isinstance(sincos.positional_embedding, torch.nn.Parameter)
    assert torch.allclose(sincos.positional_embedding, pos_embed_2d_sincos(5, 5, 32), atol=1e-6)
    assert "positional_embedding" in dict(sincos.named_parameters())


def test_state_dict_names_match_dense_and_mha():
    for packed, dense in [
        (PackedViT(**VIT), DenseViT(**VIT)),
        (PackedTextTransformer(**TEXT), DenseTextTransformer(**TEXT)),
    ]:
        assert list(packed.state_dict()) == list(dense.state_dict())
        packed.load_state_dict(dense.state_dict())
    mha = torch.nn.MultiheadAttention(32, 2).state_dict()
    block = {k.removeprefix("transformer.resblocks.0.attn.") for k in PackedViT(**VIT).state_dict()}
    assert set(mha) <= block


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(keep_idx=torch.tensor([[0, 16], [1, 2]])), r"patch indices in \[0, 16\)"),
        (dict(keep_idx=torch.arange(5), cu_seqlens=torch.tensor([0, 2, 4])), "rise from 0"),
        (dict(images=torch.randn(2, 3, 40, 40)), "resize_pos_embed"),
    ],
    ids=["index_out_of_range", "cu_seqlens_mismatch", "image_size"],
)
def test_vit_bad_input(kw, match):
    args = dict(images=torch.randn(2, 3, 32, 32), keep_idx=None)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        PackedViT(**VIT, attn_backend="reference")(args.pop("images"), **args)


@pytest.mark.parametrize(
    "args,kw,err,match",
    [
        ((torch.arange(5), torch.tensor([0, 2, 4], dtype=torch.int32), 3), {}, ValueError, "rise strictly"),
        (
            (torch.arange(5), torch.tensor([0, 2, 2, 5], dtype=torch.int32), 3),
            {},
            ValueError,
            "no empty caption",
        ),
        (
            (torch.arange(5), torch.tensor([0, 1, 5], dtype=torch.int32), 3),
            {},
            ValueError,
            "below the longest",
        ),
        ((torch.arange(13), torch.tensor([0, 13], dtype=torch.int32), 13), {}, ValueError, "context_length"),
        ((torch.arange(5),), {}, ValueError, "need cu_seqlens"),
        ((torch.zeros(2, 4, dtype=torch.long),), dict(lengths=[5, 1]), ValueError, r"ints in \[1, 4\]"),
        ((torch.zeros(2, 4),), dict(lengths=[1, 1]), TypeError, "int64"),
        ((torch.arange(5), torch.tensor([0, 5], dtype=torch.int32), 5.0), {}, TypeError, "host int"),
    ],
    ids=[
        "cu_end",
        "empty_caption",
        "max_seqlen_low",
        "too_long",
        "no_cu",
        "lengths",
        "float_ids",
        "float_max",
    ],
)
def test_text_bad_input(args, kw, err, match):
    with pytest.raises(err, match=match):
        PackedTextTransformer(**TEXT, attn_backend="reference")(*args, **kw)


def test_no_host_reads(monkeypatch):
    """Patch embedding, packing, LN/MLP, pooling and backward read nothing back (value checks off as
    for CUDA tensors; attention replaced by a sync-free stand-in: the reference reads cu_seqlens)."""
    monkeypatch.setattr(validation, "index_checks_enabled", lambda t: False)
    monkeypatch.setattr(
        attention, "varlen_attention_qkvpacked", lambda qkv, *a, **k: qkv[:, 2] * qkv[:, 0].sigmoid()
    )
    vit = PackedViT(**VIT, patch_bias=True).double()
    text = PackedTextTransformer(**TEXT).double()
    images, keep, cu = (
        torch.randn(2, 3, 32, 32, dtype=torch.float64),
        torch.arange(7),
        torch.tensor([0, 3, 7]),
    )
    ids, cu_t = torch.randint(0, 50, (9,)), torch.tensor([0, 4, 9], dtype=torch.int32)
    with HostReads() as reads:
        (vit(images, keep, cu_seqlens=cu, max_keep=4).sum() + text(ids, cu_t, max_seqlen=5).sum()).backward()
    assert reads.ops == []


def test_padded_text_pools_the_eot_not_the_padding():
    """Without lengths, CPU ids are trimmed at the last non-pad token (CLIP pads with 0 after EOT),
    so the pooled row is the EOT; an explicit max_seqlen below the longest caption is refused."""
    from fastclip_kernels.models import PackedTextTransformer

    torch.manual_seed(0)
    model = PackedTextTransformer(50, 12, 16, 1, 2, 8, attn_backend="reference").double()
    ids = torch.tensor([[1, 5, 7, 2, 0, 0], [1, 9, 2, 0, 0, 0]])
    want = model(ids, lengths=[4, 3])
    assert torch.allclose(model(ids), want, rtol=0, atol=0)
    assert not torch.allclose(model(ids, lengths=[6, 6]), want)
    with pytest.raises(ValueError, match="below the longest caption"):
        model(ids, lengths=[4, 3], max_seqlen=3)


@pytest.mark.parametrize("tower", ["vit", "text"])
def test_grad_checkpointing_gives_the_same_output_and_gradients(tower, monkeypatch):
    """Recomputing blocks in backward changes memory, not math: fp64 output and every parameter's
    gradient equal the stored-activation run; under no_grad nothing is checkpointed."""
    torch.manual_seed(0)
    if tower == "vit":
        model = PackedViT(**VIT, attn_backend="reference").double()
        args, kw = (
            (torch.randn(3, 3, 32, 32, dtype=torch.float64), KEEPS["varlen_1_16_6"][0]),
            {"cu_seqlens": KEEPS["varlen_1_16_6"][1]},
        )
    else:
        model = PackedTextTransformer(**TEXT, attn_backend="reference").double()
        args, kw = (torch.randint(0, TEXT["vocab_size"], (3, 12)),), {"lengths": [5, 12, 1]}
    runs = []
    for enable in (False, True):
        model.zero_grad(set_to_none=True)
        model.set_grad_checkpointing(enable)
        out = model(*args, **kw)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        runs.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert model.transformer.grad_checkpointing
    assert_rel_close("output", runs[1][0], runs[0][0], rtol=RTOL)
    for name, grad in runs[0][1].items():
        assert_rel_close(f"d{name}", runs[1][1][name], grad, rtol=RTOL)
    import fastclip_kernels.models.packed as packed_mod

    calls, real = [], packed_mod.checkpoint
    monkeypatch.setattr(packed_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        model(*args, **kw)
    assert not calls, "checkpointing under no_grad"
    model(*args, **kw)
    assert len(calls) == model.transformer.layers
