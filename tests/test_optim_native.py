"""fastclip_kernels.ops.optim.native (the multi-tensor kernels of ``_C``) against ops/optim/naive.py.

The CPU kernels share the metadata table, the chunk loop and the per-element math (csrc/optim_math.h)
with the CUDA kernels, so these tests check that logic without a GPU: 20 steps of AdamW and LAMB over
30 tensors of odd sizes (1, 7, 65537 across the 65536-element chunks, an empty one, an all-zero one and
one with zero weights for the trust-ratio edge cases) within 1e-6 relative of the reference; fp16/bf16
params with fp32 masters (params == round(master) bit for bit); norms and clip coefficients; the table
cache; bad input. Tests marked gpu repeat the comparisons on CUDA and capture a step in a CUDA graph.
"""

import itertools
import math

import pytest
import torch
from helpers import assert_rel_close

from fastclip_kernels import _native
from fastclip_kernels.ops.optim import naive as reference
from fastclip_kernels.ops.optim import native

needs_native = pytest.mark.skipif(
    not native.available("cpu"),
    reason=f"fastclip_kernels._C without multi-tensor kernels ({_native.build_info()}); run `pip install -e .`",
)
needs_cuda = pytest.mark.skipif(
    not native.available("cuda"), reason="needs a CUDA GPU and _C built with nvcc"
)

SHAPES = [1, 7, 65537, 0, 3, 5, 2, 8, 9, 16, 31, 33, 64, 77, 100, 127, 128, 129, 255, 256, 257, 511, 512]
SHAPES = [(n,) for n in SHAPES] + [(1000,), (1025,), (4097,), (12345,), (77, 13), (3, 5, 7), (65536,)]
ZERO_WEIGHTS, ZERO_ALL = 4, 5  # weights 0 (||w|| = 0 at step 1); weights and grads 0 (both norms 0)
ADAM = dict(beta1=0.9, beta2=0.99, eps=1e-8)
LAMB = dict(beta1=0.9, beta2=0.99, eps=1e-6)


def make_state(dtype=torch.float32, masters=False, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=gen) for s in SHAPES]
    weights[ZERO_WEIGHTS].zero_()
    weights[ZERO_ALL].zero_()
    params = [w.to(device, dtype) for w in weights]
    return {
        "params": params,
        "exp_avgs": [torch.zeros(s, device=device) for s in SHAPES],
        "exp_avg_sqs": [torch.zeros(s, device=device) for s in SHAPES],
        "masters": [p.float() for p in params] if masters else None,
        "steps": [torch.zeros((), device=device) for _ in SHAPES],
    }


def clone(state, device=None):
    return {k: [t.to(device or t.device, copy=True) for t in v] if v else v for k, v in state.items()}


def make_grads(step, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(s, generator=gen) * 10.0 ** (i % 5 - 2) for i, s in enumerate(SHAPES)]
    grads[ZERO_ALL].zero_()
    return [g.to(device, dtype) for g in grads]


def lists(state, grads):
    return state["params"], grads, state["exp_avgs"], state["exp_avg_sqs"], state["masters"], state["steps"]


def take_step(impl, kind, state, grads, **kw):
    for t in state["steps"]:
        t += 1
    (impl.adamw_ if kind == "adamw" else impl.lamb_)(*lists(state, grads), **kw)


def assert_states_close(got, want, where, rtol=1e-6):
    for key in ("masters" if want["masters"] else "params", "exp_avgs", "exp_avg_sqs"):
        for i, (a, b) in enumerate(zip(got[key], want[key], strict=True)):
            if b.numel():
                assert_rel_close(f"{where} {key}[{i}] {tuple(b.shape)}", a, b, rtol)


def assert_params_rounded(state):
    """Native params are their fp32 masters rounded to the param dtype, bit for bit."""
    for i, (p, m) in enumerate(zip(state["params"], state["masters"], strict=True)):
        want = m.to(p.dtype)
        assert torch.equal(p.isnan(), want.isnan()), f"params[{i}]: NaN positions differ"
        same = p.view(torch.int16)[~p.isnan()] == want.view(torch.int16)[~p.isnan()]
        assert same.all(), f"params[{i}]: {(~same).sum().item()} elements are not round(master)"


def run_and_compare(kind, steps=20, dtype=torch.float32, masters=False, device="cpu", rtol=1e-6, **kw):
    """``steps`` steps of native on ``device`` vs the reference on the CPU, compared after each."""
    want = make_state(dtype, masters)
    got = clone(want, device)
    kw_got = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    for step in range(steps):
        grads = make_grads(step, dtype)
        take_step(reference, kind, want, grads, **kw)
        take_step(native, kind, got, [g.to(device) for g in grads], **kw_got)
        assert_states_close(clone(got, "cpu"), want, f"step {step + 1}", rtol)
    return got


def lr_arg(lr, as_tensor):
    return torch.tensor(lr) if as_tensor else lr


@needs_native
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lr-float", "lr-tensor"])
@pytest.mark.parametrize("scaled", [False, True], ids=["no-scale", "grad-scale"])
@pytest.mark.parametrize("wd", [0.0, 0.1], ids=["wd0", "wd0.1"])
def test_adamw_fp32_matches_reference(wd, scaled, lr_tensor):
    scale = torch.tensor(0.37) if scaled else None
    run_and_compare("adamw", lr=lr_arg(1e-2, lr_tensor), weight_decay=wd, grad_scale=scale, **ADAM)


LAMB_FLAGS = list(itertools.product([True, False], repeat=3))


@needs_native
@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lr-float", "lr-tensor"])
@pytest.mark.parametrize("scaled", [False, True], ids=["no-scale", "grad-scale"])
@pytest.mark.parametrize("wd", [0.0, 0.1], ids=["wd0", "wd0.1"])
@pytest.mark.parametrize(
    "bias_correction,grad_averaging,use_trust_ratio",
    LAMB_FLAGS,
    ids=[
        "-".join(f"{n}{int(f)}" for n, f in zip(("bc", "avg", "trust"), flags, strict=True))
        for flags in LAMB_FLAGS
    ],
)
def test_lamb_fp32_matches_reference(bias_correction, grad_averaging, use_trust_ratio, wd, scaled, lr_tensor):
    run_and_compare(
        "lamb", lr=lr_arg(1e-2, lr_tensor), weight_decay=wd, grad_scale=torch.tensor(0.37) if scaled else None,
        bias_correction=bias_correction, grad_averaging=grad_averaging, use_trust_ratio=use_trust_ratio, **LAMB,
    )  # fmt: skip


LOW = [pytest.param(t, id=str(t).removeprefix("torch.")) for t in (torch.bfloat16, torch.float16)]


@needs_native
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("kind", ["adamw", "lamb"])
def test_mixed_precision_masters(kind, dtype):
    kw = dict(lr=torch.tensor(1e-2), weight_decay=0.1, grad_scale=torch.tensor(0.5), **ADAM)
    got = run_and_compare(kind, dtype=dtype, masters=True, **kw)
    assert_params_rounded(got)


@needs_native
@pytest.mark.parametrize("dtype", LOW)
def test_round_to_param_dtype_is_exact(dtype):
    """lr = 0 leaves each master as it is: params must be torch's rounding of it, for special values
    (ties, subnormals, overflow, inf, NaN) and 2^16 random bit patterns."""
    special = [0.0, -0.0, 1.0, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8, 65504.0, 65519.99, 65520.0]  # fmt: skip
    special += [2**-24, 2**-25, 1.5 * 2**-25, 3 * 2**-25, 2**-14 * (1 - 2**-12), 1e-30, 1e-40, 3.3895e38, 3.4e38]  # fmt: skip
    special += [math.inf, -math.inf, math.nan, -65520.0, -(2**-25) * 1.0000001]
    bits = torch.randint(-(2**31), 2**31 - 1, (1 << 16,), generator=torch.Generator().manual_seed(0))
    master = torch.cat([torch.tensor(special), bits.to(torch.int32).view(torch.float32)])
    state = {"params": [master.to(dtype)], "masters": [master.clone()], "steps": [torch.ones(())]}
    state.update(exp_avgs=[torch.zeros_like(master)], exp_avg_sqs=[torch.zeros_like(master)])
    native.adamw_(*lists(state, [torch.zeros_like(master, dtype=dtype)]), lr=0.0, weight_decay=0.0, **ADAM)
    torch.testing.assert_close(state["masters"][0], master, rtol=0, atol=0, equal_nan=True)  # NaNs: quieted
    assert_params_rounded(state)


@needs_native
def test_many_chunks_per_tensor(monkeypatch):
    """A 7-element chunk size: every tensor spans many chunks (and a trust-ratio sum over them)."""
    monkeypatch.setattr(native, "CHUNK_SIZE", 7)
    run_and_compare("adamw", steps=3, lr=1e-2, weight_decay=0.1, **ADAM)
    run_and_compare("lamb", steps=3, lr=1e-2, weight_decay=0.1, **LAMB)
    key = next(reversed(native._tables))
    assert native._tables[key].num_chunks == sum(math.ceil(math.prod(s) / 7) for s in SHAPES)


def norm_grads(device="cpu"):
    grads = make_grads(0)
    for i in range(0, len(grads), 3):  # one gradient list, three dtypes
        grads[i] = grads[i].to(torch.bfloat16 if i % 2 else torch.float16)
    return [g.to(device) for g in grads]


@needs_native
def test_global_grad_norm_and_clip_coefficient():
    grads = norm_grads()
    want = reference.global_grad_norm(grads)
    got = native.global_grad_norm(grads)
    assert got.shape == () and got.dtype == torch.float32
    assert_rel_close("global norm", got, want, 1e-6)
    norm, coef = native.grad_norm_and_clip_coefficient(grads, 1.5)
    assert torch.equal(norm, got) and torch.equal(coef, native.clip_coefficient(got, 1.5))
    assert native.global_grad_norm([]).item() == 0.0
    assert native.global_grad_norm([torch.zeros(0)]).item() == 0.0


@needs_native
@pytest.mark.parametrize("max_norm", [1.0, 0.5, 5.0])
def test_clip_coefficient_matches_reference(max_norm):
    for value in [0.0, 1e-7, 0.5, 1 - 1e-6, 1.0, 3.0, 1e30, math.inf, math.nan]:
        total = torch.tensor(value)
        torch.testing.assert_close(
            native.clip_coefficient(total, max_norm), reference.clip_coefficient(total, max_norm), rtol=0,
            atol=0, equal_nan=True,
        )  # fmt: skip


@needs_native
def test_table_is_cached(monkeypatch):
    monkeypatch.setattr(native, "_tables", type(native._tables)())
    state, grads = make_state(), make_grads(0)
    kw = dict(lr=1e-3, weight_decay=0.0, **ADAM)
    take_step(native, "adamw", state, grads, **kw)
    (first,) = native._tables.values()
    take_step(native, "adamw", state, grads, **kw)
    assert list(native._tables.values()) == [first]
    monkeypatch.setattr(native, "_MAX_TABLES", 2)
    for _ in range(3):
        take_step(native, "adamw", make_state(), grads, **kw)
    assert len(native._tables) == 2 and first not in native._tables.values()


def bad_call(mutate):
    """Arguments of a valid adamw_ call, changed by ``mutate(state, kw)``."""
    state = make_state(masters=False)
    state["params"], state["exp_avgs"], state["exp_avg_sqs"], state["steps"] = (
        state[k][:3] for k in ("params", "exp_avgs", "exp_avg_sqs", "steps")
    )
    kw = dict(grads=make_grads(0)[:3], lr=1e-3, weight_decay=0.0, **ADAM)
    mutate(state, kw)
    return state, kw


def _set(key, index, value):
    def mutate(state, kw):
        target = state if key in state else kw
        if index is None:
            target[key] = value
        else:
            target[key] = list(target[key])
            target[key][index] = value(target[key][index]) if callable(value) else value

    return mutate


def _alias(state, kw):
    """params[1] is params[0] (and so are its grad, moments and step): the GPU would race."""
    for tensors in (state["params"], kw["grads"], state["exp_avgs"], state["exp_avg_sqs"], state["steps"]):
        tensors[1] = tensors[0]


BAD = [
    ("short-grads", _set("grads", None, [torch.ones(1)]), ValueError, r"grads has 1 entries, expected 3"),
    ("grad-dtype", _set("grads", 1, lambda g: g.double()), TypeError, r"grads\[1\] has dtype torch.float64"),
    ("sparse", _set("grads", 0, lambda g: g.to_sparse()), TypeError, r"grads\[0\] is torch.sparse_coo"),
    ("grad-shape", _set("grads", 2, torch.ones(4)), ValueError, r"grads\[2\] has shape \(4,\), expected"),
    ("strided", _set("params", 1, torch.ones(14)[::2]), ValueError, r"params\[1\] must be contiguous"),
    ("moment-fp16", _set("exp_avgs", 0, lambda m: m.half()), TypeError, r"exp_avgs\[0\] has dtype torch.f"),
    ("step-shape", _set("steps", 1, torch.ones(2)), ValueError, r"steps\[1\] must be a 0-d tensor"),
    ("step-int", _set("steps", 1, torch.ones((), dtype=torch.int64)), TypeError, r"steps\[1\] has dtype"),
    ("fp64-params", _set("params", 0, lambda p: p.double()), TypeError, r"params have dtype torch.float64"),
    ("no-masters", _set("params", None, [torch.ones(1).bfloat16()] * 3), ValueError, "need fp32 masters"),
    ("master-shape", _set("masters", None, [torch.ones(2)] * 3), ValueError, r"masters\[0\] has shape"),
    ("device", _set("exp_avg_sqs", 2, torch.ones(65537, device="meta")), ValueError, r"sqs\[2\] is on meta"),
    ("not-a-tensor", _set("params", 1, [0.0] * 7), TypeError, r"params\[1\] must be a torch.Tensor"),
    ("aliased", _alias, ValueError, r"params\[1\] and params\[0\] share memory"),
    ("lr-str", _set("lr", None, "1e-3"), TypeError, r"lr must be a real number, got str"),
    ("lr-cpu-fp64", _set("lr", None, torch.tensor(1e-3, dtype=torch.float64)), TypeError, "lr has dtype"),
    ("grad-scale", _set("grad_scale", None, 2.0), TypeError, r"grad_scale must be a 0-d fp32 tensor or None"),
    ("beta-tensor", _set("beta1", None, torch.tensor(0.9)), TypeError, "beta1 must be a real number"),
]


@needs_native
@pytest.mark.parametrize("mutate,exc,match", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input(mutate, exc, match):
    state, kw = bad_call(mutate)
    grads = kw.pop("grads")
    with pytest.raises(exc, match=match):
        native.adamw_(*lists(state, grads), **kw)


@needs_native
def test_native_library_checks_the_table():
    lib = _native._lib()
    p, g, m, v, t = (torch.zeros(10) for _ in range(5))
    row = [p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), 0, t.data_ptr(), 10]
    hyper = dict(lr=1e-3, lr_ptr=0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, grad_scale_ptr=0)

    def adamw(table, **kw):
        table = torch.tensor(table, dtype=torch.int64)
        args = dict(table_ptr=table.data_ptr(), num_tensors=1, num_chunks=1, chunk_size=8, dtype_code=0)
        lib.multi_tensor_adamw_cpu(**{**args, **hyper, **kw})

    t.fill_(1.0)
    adamw(row + [0, 0])  # valid
    with pytest.raises(ValueError, match="dtype_code must be 0 .float32., 2 .float16. or 3"):
        adamw(row + [0, 0], dtype_code=1)
    with pytest.raises(ValueError, match="chunk 0 names tensor 1, expected"):
        adamw(row + [1, 0])
    with pytest.raises(ValueError, match="chunk 0 starts at element 16 of tensor 0, which has 10"):
        adamw(row + [0, 16])
    with pytest.raises(ValueError, match="tensor 0 has a null grad pointer"):
        adamw(row[:1] + [0] + row[2:] + [0, 0])
    with pytest.raises(ValueError, match=r"chunk_size must be in \[1, 2\^30\]"):
        adamw(row + [0, 0], chunk_size=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="float32"), *LOW])
@pytest.mark.parametrize("kind", ["adamw", "lamb"])
def test_cuda_matches_reference(kind, dtype):
    kw = dict(lr=torch.tensor(1e-2), weight_decay=0.1, grad_scale=torch.tensor(0.5), **LAMB)
    got = run_and_compare(kind, dtype=dtype, masters=dtype != torch.float32, device="cuda", rtol=2e-5, **kw)
    if dtype != torch.float32:
        assert_params_rounded(got)
    grads = norm_grads("cuda")
    assert_rel_close(
        "cuda norm", native.global_grad_norm(grads).cpu(), reference.global_grad_norm(grads).cpu(), 1e-5
    )


@pytest.mark.gpu
@needs_cuda
def test_cuda_misaligned_tensors_and_graph_capture():
    """Tensors at odd offsets take the scalar path; a step captured in a CUDA graph (lr as a tensor)
    replays like eager steps, without host synchronization."""
    sizes = [65537, 3, 1000]
    bufs = [torch.randn(n + 1, device="cuda") for n in sizes]
    params = [b[1:] for b in bufs]  # contiguous, 4-byte but not 16-byte aligned
    state = {"params": params, "masters": None, "steps": [torch.zeros((), device="cuda") for _ in sizes]}
    state.update(
        exp_avgs=[torch.zeros_like(p) for p in params], exp_avg_sqs=[torch.zeros_like(p) for p in params]
    )
    grads = [torch.randn_like(p) for p in params]
    lr = torch.tensor(1e-2, device="cuda")
    want = clone(state, "cpu")
    kw = dict(weight_decay=0.1, **ADAM)
    torch.cuda.set_sync_debug_mode("error")
    try:
        take_step(native, "adamw", state, grads, lr=lr, **kw)  # warm-up: builds the table
    finally:
        torch.cuda.set_sync_debug_mode("default")
    take_step(reference, "adamw", want, [g.cpu() for g in grads], lr=torch.tensor(1e-2), **kw)
    assert_states_close(clone(state, "cpu"), want, "misaligned", 2e-5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        take_step(native, "adamw", state, grads, lr=lr, **kw)
    for _ in range(3):
        graph.replay()
        take_step(reference, "adamw", want, [g.cpu() for g in grads], lr=torch.tensor(1e-2), **kw)
    torch.cuda.synchronize()
    assert_states_close(clone(state, "cpu"), want, "graph replay", 2e-5)
