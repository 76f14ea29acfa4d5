"""A probe for device->host reads, usable on the CPU: every operation that would make a GPU step
wait for the device (a value read back to the host, or a copy to the CPU) is recorded.

Two layers, because CPU tensors skip the dispatcher for some reads:
    * ``__torch_function__`` (a TorchFunctionMode): ``.item()``, ``.tolist()``, ``.cpu()``,
      ``.numpy()`` / ``np.asarray(t)``, ``.to("cpu")``, ``bool(t)`` / ``int(t)`` / ``float(t)``, ``torch.equal``,
      ``torch.allclose`` (the Python calls, before any decomposition);
    * ``__torch_dispatch__`` (a TorchDispatchMode): aten ops that need a value on the host
      (``_local_scalar_dense``, ``nonzero``, ``masked_select``, ``unique``, ``equal``) and
      boolean-mask indexing (which runs ``nonzero``).

    >>> with HostReads() as reads:
    ...     step()
    >>> assert reads.ops == [], reads.ops

Argument checks that read *CPU* inputs (``fastclip_kernels._validation.host_checks``) are part of
what the probe sees; switch them off (as they are for CUDA tensors) when probing a step on CPU.
"""

import torch
from torch._library.custom_ops import OPDEFS
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

HOST_READ_ATEN = {
    "_local_scalar_dense",
    "nonzero",
    "is_nonzero",
    "item",
    "masked_select",
    "unique",
    "_unique2",
}
HOST_READ_ATEN |= {"equal"}
_T = torch.Tensor
HOST_READ_FUNCTIONS = {
    _T.item: "item",
    _T.tolist: "tolist",
    _T.cpu: "cpu",
    _T.numpy: "numpy",
    _T.__array__: "numpy",
    _T.__bool__: "bool",
    _T.__int__: "int",
    _T.__float__: "float",
    _T.__index__: "index",
    torch.equal: "torch.equal",
    torch.allclose: "torch.allclose",
}


def _to_cpu(args, kwargs) -> bool:
    """Tensor.to("cpu"): a device->host copy for a GPU tensor. Only the literal string counts: on a
    CPU run, ``.to(x.device)`` is a host->device upload in the GPU step and must not be flagged."""
    targets = [a for a in args[1:] if isinstance(a, str)] + [kwargs.get("device")]
    return any(isinstance(t, str) and torch.device(t).type == "cpu" for t in targets)


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])


def _on(device: str, args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type == device for a in args)


class _FunctionProbe(TorchFunctionMode):
    def __init__(self, ops: list, device: str | None = None):
        super().__init__()
        self.ops, self.device = ops, device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = HOST_READ_FUNCTIONS.get(func)
        if self.device is not None and not _on(self.device, args):
            pass  # a host tensor's read on a dry run of another device (tokenizer lengths, masks)
        elif name is not None:
            self.ops.append(name)
        elif func is _T.to and _to_cpu(args, kwargs):
            self.ops.append("to(cpu)")
        return func(*args, **kwargs)


class _DispatchProbe(TorchDispatchMode):
    def __init__(self, ops: list, device: str | None = None):
        super().__init__()
        self.ops, self.device = ops, device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.device is not None and not _on(self.device, torch.utils._pytree.tree_leaves((args, kwargs))):
            return func(*args, **kwargs)
        opdef = OPDEFS.get(func._schema.name)
        if opdef is not None:
            # A torch.library custom op (ours): a mode is off inside its own handler, so run the
            # op's Python implementation under fresh probes to see the host reads inside the op.
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))  # tensor lists too (the optimizers)
            device = next((a.device.type for a in leaves if isinstance(a, torch.Tensor)), "cpu")
            impl = opdef._backend_fns.get(device, opdef._init_fn)  # private API; torch 2.4+
            if device == "meta" and opdef._abstract_fn is not None:
                impl = opdef._abstract_fn  # a meta dry run: the op's fake implementation
            with _FunctionProbe(self.ops, self.device), _DispatchProbe(self.ops, self.device):
                return impl(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in HOST_READ_ATEN:
            self.ops.append(f"aten.{name}")
        elif name in ("index", "index_put", "index_put_") and _has_bool_index(args):
            self.ops.append(f"aten.{name} with a boolean mask")  # needs nonzero: a sync on a GPU
        return func(*args, **kwargs)


class HostReads:
    """Context manager; ``ops`` lists every host read seen inside it, in order.

    ``device="meta"``: a dry run of the GPU step on meta tensors (ops take their GPU dispatch and run
    their fake implementations); then only Python-level reads of meta tensors count (the host's own CPU
    tensors, e.g. the tokenizer's lengths, are read freely), and a read raises after it is recorded
    (meta tensors have no values)."""

    def __init__(self, device: str | None = None):
        self.ops: list[str] = []
        self._modes = (_FunctionProbe(self.ops, device), _DispatchProbe(self.ops, device))

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False
