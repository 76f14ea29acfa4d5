"""torch.compile(fullgraph=True, backend="aot_eager") traces every op and the packed towers with no
graph break, and gives the eager values and gradients: the losses (contrastive, sigmoid, FastCLIP
in every mode at K = 1), varlen attention, the patch embedding, PackedViT and PackedTextTransformer.
Tiny shapes; Triton runs under TRITON_INTERPRET=1 (the ops are opaque to the compiler, so the
traced graph is the same as on a GPU)."""

import copy

import pytest
import torch

from fastclip_kernels import FastCLIPLoss, contrastive_loss, sigmoid_loss
from fastclip_kernels.models import PackedTextTransformer, PackedViT
from fastclip_kernels.ops import patch_embed, varlen_attention_qkvpacked
from fastclip_kernels.ops.common import interpreting

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU needs TRITON_INTERPRET=1")
LOSS_BACKENDS = ["chunked", pytest.param("triton", marks=needs_interpreter)]


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]


def assert_same_value_and_grads(fn, *inputs, atol=1e-6):
    """fn eager and compiled (fullgraph: a graph break raises) give the same value and gradients."""
    eager_in, comp_in = _leaves(*inputs), _leaves(*inputs)
    want, got = fn(*eager_in), compiled(fn)(*comp_in)
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-5)
    want.sum().backward()
    got.sum().backward()
    for a, b in zip(comp_in, eager_in, strict=True):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, atol=atol, rtol=1e-5)


def _features(b=6, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_()
    return x, y


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_contrastive_loss(backend):
    x, y = _features()
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(0.3, requires_grad=True)
    assert_same_value_and_grads(lambda *a: contrastive_loss(*a, backend=backend), x, y, s, b)


@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_sigmoid_loss(backend):
    x, y = _features()
    s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
    assert_same_value_and_grads(lambda *a: sigmoid_loss(*a, backend=backend), x, y, s, b)


FASTCLIP_CASES = [(mode, "chunked") for mode in ("clip", "gcl", "rgcl", "rgcl_g")]
FASTCLIP_CASES += [pytest.param("rgcl", "triton", marks=needs_interpreter)]  # the most state: per-sample tau


@pytest.mark.parametrize("mode, backend", FASTCLIP_CASES)
def test_fastclip_loss(mode, backend):
    eager_fn = FastCLIPLoss(30, mode, gamma_min=0.5, backend=backend)
    eager_fn.set_epoch(1)
    comp_fn = copy.deepcopy(eager_fn)
    x, y = _features()
    s = None if mode == "rgcl" else torch.tensor(10.0, requires_grad=mode != "gcl")
    idx = torch.tensor([0, 3, 7, 11, 12, 29])
    args = [x, y] + ([] if s is None else [s])

    def loss(fn):
        return lambda x, y, *s: fn(x, y, s[0] if s else None, idx)

    eager_in, comp_in = _leaves(*args), _leaves(*args)
    step = compiled(loss(comp_fn))
    for _ in range(2):  # the second step reads the u (and tau) the first one wrote
        want, got = loss(eager_fn)(*eager_in), step(*comp_in)
        torch.testing.assert_close(got, want)
        want.backward()
        got.backward()
    for a, b in zip(comp_in, eager_in, strict=True):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad)
    for (name, buf), (_, ref) in zip(
        comp_fn.state_dict().items(), eager_fn.state_dict().items(), strict=True
    ):
        if isinstance(buf, torch.Tensor):
            torch.testing.assert_close(buf, ref, msg=f"state {name}")


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention(causal):
    qkv = torch.randn(9, 3, 2, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    fn = lambda qkv: varlen_attention_qkvpacked(qkv, cu, 5, causal=causal, backend="triton")  # noqa: E731
    assert_same_value_and_grads(fn, qkv)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_interpreter)])
def test_patch_embed(backend):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 16, 16, generator=g)
    w, pos, cls = (torch.randn(*s, generator=g, requires_grad=True) for s in ((32, 3, 8, 8), (5, 32), (32,)))
    keep = torch.tensor([[0, 3], [2, 1]])
    fn = lambda w, pos, cls: patch_embed(images, w, None, pos, cls, keep, backend=backend).tokens  # noqa: E731
    assert_same_value_and_grads(fn, w, pos, cls, atol=1e-5)


def _params_grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def _same_model_step(model, call):
    twin = copy.deepcopy(model)
    want, got = call(model), compiled(call)(twin)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    want.sum().backward()
    got.sum().backward()
    for name, grad in _params_grads(model).items():
        torch.testing.assert_close(_params_grads(twin)[name], grad, atol=1e-5, rtol=1e-5, msg=name)


@needs_interpreter
def test_packed_vit():
    torch.manual_seed(0)
    vit = PackedViT(
        16, 8, width=32, layers=1, heads=2, output_dim=8, attn_backend="triton", patch_backend="triton"
    )
    images = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[0, 3], [2, 1]])
    _same_model_step(vit, lambda m: m(images, keep))


@needs_interpreter
def test_packed_text_transformer():
    torch.manual_seed(0)
    text = PackedTextTransformer(
        vocab_size=50, context_length=8, width=32, layers=1, heads=2, output_dim=8, attn_backend="triton"
    )
    ids = torch.randint(1, 50, (9,))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    _same_model_step(text, lambda m: m(ids, cu, 5))
