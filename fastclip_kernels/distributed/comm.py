"""Count torch.distributed collectives and the bytes each rank sends, split into forward/backward.

``CommCounter`` patches the collective functions on the ``torch.distributed`` module while active
(restored on exit, also on exceptions). Code that calls ``dist.all_gather(...)`` etc. through the
module at call time is seen: this library, open_clip, ``torch.distributed.nn.functional``. Not seen:
DDP's gradient all-reduce (C++ reducer), functional collectives
(``torch.distributed._functional_collectives``), object collectives (``all_gather_object``: they
call the c10d functions directly), and ``barrier``.

Bytes SENT per rank, ring model, K = group size, n = bytes of the input buffer:

| op | bytes sent |
|---|---|
| all_gather, all_gather_into_tensor, all_gather_single | (K-1) * n |
| all_reduce | 2 (K-1) / K * n |
| reduce_scatter, reduce_scatter_tensor, reduce_scatter_single | (K-1) / K * n (n: full input) |
| all_to_all, all_to_all_single, reduce | (K-1) / K * n |
| broadcast | n on the source rank, 0 elsewhere (what leaves the root; a ring/tree relays more) |
| scatter | (K-1) * n_out on the source rank, 0 elsewhere |
| gather | n on every rank but the destination |
| send, isend, batch_isend_irecv | bytes of the sent tensors (recv / irecv: 0) |

Fractions round down. A backend may move more than the model (gloo's reduce_scatter_tensor is an
all-reduce, 2x): the model is what an NCCL ring sends.

A call is "backward" when it runs inside an autograd node's backward
(``torch._C._current_autograd_node() is not None``), e.g. the reduce-scatter of an all-gather
with grad, else "forward". Calls made from inside another counted call are not counted twice.
"""

import dataclasses
import functools
import inspect
import threading

import torch
import torch.distributed as dist


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def _is_rank(args, global_key: str, group_key: str) -> bool:
    """Whether this rank is the src/dst of a rooted collective (global rank or group rank)."""
    group = args.get("group")
    if args.get(group_key) is not None:
        return dist.get_rank(group) == args[group_key]
    return dist.get_rank() == args.get(global_key)


# op name -> (the argument whose shape/dtype is recorded, bytes(args, tensor, K))
_SPECS = {
    "all_gather": ("tensor", lambda a, t, k: (k - 1) * _nbytes(t)),
    "all_gather_into_tensor": ("input_tensor", lambda a, t, k: (k - 1) * _nbytes(t)),
    "all_gather_single": ("input_tensor", lambda a, t, k: (k - 1) * _nbytes(t)),
    "_all_gather_base": ("input_tensor", lambda a, t, k: (k - 1) * _nbytes(t)),
    "all_reduce": ("tensor", lambda a, t, k: 2 * (k - 1) * _nbytes(t) // k),
    "reduce_scatter": ("output", lambda a, t, k: (k - 1) * sum(map(_nbytes, a["input_list"])) // k),
    "reduce_scatter_tensor": ("input", lambda a, t, k: (k - 1) * _nbytes(t) // k),
    "reduce_scatter_single": ("input", lambda a, t, k: (k - 1) * _nbytes(t) // k),
    "_reduce_scatter_base": ("input", lambda a, t, k: (k - 1) * _nbytes(t) // k),
    "all_to_all": (
        "output_tensor_list",
        lambda a, t, k: (k - 1) * sum(map(_nbytes, a["input_tensor_list"])) // k,
    ),
    "all_to_all_single": ("input", lambda a, t, k: (k - 1) * _nbytes(t) // k),
    "reduce": ("tensor", lambda a, t, k: (k - 1) * _nbytes(t) // k),
    "broadcast": ("tensor", lambda a, t, k: _nbytes(t) if _is_rank(a, "src", "group_src") else 0),
    "scatter": ("tensor", lambda a, t, k: (k - 1) * _nbytes(t) if _is_rank(a, "src", "group_src") else 0),
    "gather": ("tensor", lambda a, t, k: 0 if _is_rank(a, "dst", "group_dst") else _nbytes(t)),
    "send": ("tensor", lambda a, t, k: _nbytes(t)),
    "isend": ("tensor", lambda a, t, k: _nbytes(t)),
    "recv": ("tensor", lambda a, t, k: 0),
    "irecv": ("tensor", lambda a, t, k: 0),
    "batch_isend_irecv": (
        "p2p_op_list",
        lambda a, t, k: sum(_nbytes(p.tensor) for p in a["p2p_op_list"] if p.op == dist.isend),
    ),
}


@dataclasses.dataclass(frozen=True)
class CommEvent:
    """One counted call: op name, bytes this rank sent, "forward"/"backward", shape and dtype."""

    op: str
    bytes: int
    phase: str
    shape: tuple
    dtype: torch.dtype | None


class _Counted:
    """A counting stand-in for a torch.distributed function.

    It compares equal to the function it wraps, so ``dist.P2POp(dist.isend, ...)`` still passes
    torch's ``op in [isend, irecv]`` check while the counter is active.
    """

    def __init__(self, counter: "CommCounter", name: str, fn):
        functools.update_wrapper(self, fn)
        self._counter, self._name, self._fn = counter, name, fn
        self._signature = inspect.signature(fn)

    def __eq__(self, other):
        return other is self._fn or (isinstance(other, _Counted) and other._fn is self._fn)

    def __hash__(self):
        return hash(self._fn)

    def __call__(self, *args, **kwargs):
        counter = self._counter
        depth = getattr(counter._local, "depth", 0)  # autograd may run backward on another thread
        if depth:
            return self._fn(*args, **kwargs)
        bound = self._signature.bind(*args, **kwargs)
        bound.apply_defaults()
        counter._record(self._name, bound.arguments)
        if self._name == "batch_isend_irecv":  # torch tests `op.op is isend`: hand it the originals
            args = ([_unwrapped_p2p(p) for p in bound.arguments["p2p_op_list"]],)
            kwargs = {}
        counter._local.depth = depth + 1
        try:
            return self._fn(*args, **kwargs)
        finally:
            counter._local.depth = depth


def _unwrapped_p2p(p):
    op = p.op._fn if isinstance(p.op, _Counted) else p.op
    return p if op is p.op else dist.P2POp(op, p.tensor, group=p.group, tag=p.tag, group_peer=p.group_peer)


class CommCounter:
    """Context manager counting torch.distributed collectives and bytes sent by this rank.

    Example (on every rank):
        >>> with CommCounter() as comm:
        ...     loss = FastContrastiveLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=k)(
        ...         img, txt, scale)
        ...     loss.backward()
        >>> comm.calls("forward"), comm.bytes("forward"), comm.calls("backward")
        >>> print(comm.table())
    """

    def __init__(self):
        self.events: list[CommEvent] = []
        self._saved: dict = {}
        self._local = threading.local()

    def __enter__(self) -> "CommCounter":
        if self._saved:
            raise RuntimeError("this CommCounter is already active")
        for name in _SPECS:
            fn = getattr(dist, name, None)
            if fn is not None:
                self._saved[name] = fn
                setattr(dist, name, _Counted(self, name, fn))
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self._saved = {}

    def _record(self, name: str, args: dict) -> None:
        key, nbytes = _SPECS[name]
        t = args[key]
        t = t[0].tensor if name == "batch_isend_irecv" else (t[0] if isinstance(t, list | tuple) else t)
        k = dist.get_world_size(args.get("group"))
        phase = "backward" if torch._C._current_autograd_node() is not None else "forward"
        self.events.append(CommEvent(name, int(nbytes(args, t, k)), phase, tuple(t.shape), t.dtype))

    def _select(self, phase):
        if phase not in (None, "forward", "backward"):
            raise ValueError(f'phase must be None, "forward" or "backward", got {phase!r}')
        return [e for e in self.events if phase is None or e.phase == phase]

    def calls(self, phase: str | None = None) -> int:
        """Number of counted calls (in ``phase`` if given)."""
        return len(self._select(phase))

    def bytes(self, phase: str | None = None) -> int:
        """Bytes this rank sent (ring model; in ``phase`` if given)."""
        return sum(e.bytes for e in self._select(phase))

    def table(self) -> str:
        """One line per (phase, op): calls and bytes sent, then the total."""
        rows: dict = {}
        for e in self.events:
            calls, nbytes = rows.get((e.phase, e.op), (0, 0))
            rows[(e.phase, e.op)] = (calls + 1, nbytes + e.bytes)
        lines = [f"{'phase':<9} {'op':<24} {'calls':>6} {'bytes sent':>14}"]
        lines += [f"{p:<9} {op:<24} {c:>6} {b:>14,}" for (p, op), (c, b) in sorted(rows.items())]
        lines.append(f"{'total':<9} {'':<24} {self.calls():>6} {self.bytes():>14,}")
        return "\n".join(lines)


__all__ = ["CommCounter", "CommEvent"]
