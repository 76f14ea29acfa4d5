"""CLIPA text token reduction (arXiv 2305.07017, §3): shorten tokenized captions ``ids [B, L]`` to
``keep`` tokens on the device, batched, with no host sync.

A caption of length ``n`` (``lengths[b]``, SOT and EOT included) is ``[SOT, c_1 .. c_{n-2}, EOT,
pad ..]``. CLIP's text tower pools at the EOT token, so every strategy keeps **SOT (position 0) and
the last valid token (position n - 1, EOT)** and picks ``keep - 2`` of the content tokens ``c``;
the kept tokens stay in their original order and the output is ``[SOT, picked .., EOT, pad ..]``
of width ``keep`` with new lengths ``min(n, keep)``. Captions with ``n <= keep`` are unchanged.

* ``truncate``: the first ``keep - 2`` content tokens (open_clip truncation also ends with EOT).
* ``random_mask``: a uniformly random subset (open_clip ``random_mask_tokenize``, order kept).
* ``block_mask``: one contiguous span, start uniform (open_clip ``simple_mask_tokenize``).
* ``syntax_mask``: nouns, then adjectives, then verbs, then the rest, ties by position, ranked by a
  per-token-id table (``syntax_table.build_syntax_rank``), like CLIPA's JAX ``noun_tokenize``.

Each strategy is one priority key per position (SOT/EOT first, content by the strategy, padding
last, ties by position) followed by ``topk`` and a sort of the kept positions. ``pack`` turns the
padded output into ``(packed ids [T], cu_seqlens [B + 1])`` for variable-length attention.
"""

import torch

from .. import _validation
from .image import check_int, check_int_tensor, draw_device

__all__ = ["block_mask", "lengths_from_pad", "pack", "random_mask", "syntax_mask", "truncate"]

_PAD_CLASS = 1 << 20  # priority class of padding: after every content key (< 2**20 - 1)


def lengths_from_pad(ids: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """``[B]`` int64: one past the last token that is not ``pad_id``. Robust to ``pad_id`` also
    being a real token (CLIP pads with 0, which is also "!"), as EOT is never padding."""
    _check_ids(ids)
    pos = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    return torch.where(ids != pad_id, pos, 0).amax(dim=1)


def _check_ids(ids) -> None:
    check_int_tensor("ids", ids, 2)
    if ids.numel() == 0:
        raise ValueError(f"ids must be non-empty [B, L] token ids, got shape {tuple(ids.shape)}")


def _check_lengths(lengths, ids: torch.Tensor, lo: int) -> torch.Tensor:
    """lengths: ``[B]`` ints in [lo, L] on ids' device (values read only where checks are on)."""
    b, L = ids.shape
    check_int_tensor("lengths", lengths, 1, (b,))
    if lengths.device != ids.device:
        raise ValueError(f"lengths is on {lengths.device}, expected {ids.device} (as ids)")
    if _validation.index_checks_enabled(lengths):
        lo_, hi = int(lengths.min()), int(lengths.max())
        if lo_ < lo or hi > L:
            raise ValueError(f"lengths must be in [{lo}, {L}] (the context length), got min {lo_}, max {hi}")
    return lengths.to(torch.int64)


def _check(ids, lengths, keep, pad_id) -> torch.Tensor:
    """Validate the common arguments; returns ``lengths`` (derived when None) as int64."""
    _check_ids(ids)
    L = ids.shape[1]
    check_int("keep", keep, -(1 << 62))
    if keep < 2:
        raise ValueError(f"keep must be >= 2 (SOT and EOT are always kept), got {keep}")
    if keep > L:
        raise ValueError(f"keep must be <= the context length L={L} of ids, got {keep}")
    check_int("pad_id", pad_id, -(1 << 62))
    if lengths is None:
        return lengths_from_pad(ids, pad_id)
    return _check_lengths(lengths, ids, 2)  # SOT and EOT at least


def _select(ids, lengths, keep: int, content_key, pad_id: int):
    """Keep SOT, EOT and the ``keep - 2`` content tokens of smallest ``content_key`` (ties by
    position), in their original order; ``content_key`` is ``[B, L]`` or broadcastable, in
    [0, 2**20 - 1)."""
    L = ids.shape[1]
    pos = torch.arange(L, device=ids.device)
    n = lengths[:, None]
    special = (pos == 0) | (pos == n - 1)
    cls = torch.where(special, 0, torch.where(pos < n, 1 + content_key, _PAD_CLASS))
    kept = (cls * L + pos).topk(keep, dim=1, largest=False, sorted=False).indices.sort(dim=1).values
    new_lengths = lengths.clamp(max=keep)
    valid = torch.arange(keep, device=ids.device) < new_lengths[:, None]
    return torch.where(valid, ids.gather(1, kept), pad_id), new_lengths


def truncate(ids: torch.Tensor, lengths: torch.Tensor | None, keep: int, *, pad_id: int = 0):
    """SOT, the first ``keep - 2`` content tokens and EOT: ``(ids [B, keep], lengths [B])``.

    ``lengths`` ``[B]`` counts SOT and EOT; ``None`` derives it from ``pad_id``.

    >>> ids = torch.tensor([[49406, 1, 2, 3, 4, 49407, 0, 0]])
    >>> truncate(ids, None, 4)[0].tolist()
    [[49406, 1, 2, 49407]]
    """
    lengths = _check(ids, lengths, keep, pad_id)
    return _select(ids, lengths, keep, 0, pad_id)


def random_mask(ids, lengths, keep: int, generator=None, *, pad_id: int = 0):
    """SOT, a uniformly random ``keep - 2``-subset of the content tokens (original order) and EOT.

    The draw (noise ``[B, L]`` on ``ids.device``, two argsorts) uses ``generator`` when given.

    >>> ids = torch.tensor([[49406, 1, 2, 3, 4, 49407, 0, 0]])
    >>> random_mask(ids, None, 4, torch.Generator().manual_seed(0))[1].tolist()
    [4]
    """
    lengths = _check(ids, lengths, keep, pad_id)
    device = draw_device(generator, ids.device)
    noise = torch.rand(ids.shape, generator=generator, device=device)
    return _select(ids, lengths, keep, noise.argsort(dim=1).argsort(dim=1), pad_id)


def block_mask(ids, lengths, keep: int, generator=None, *, pad_id: int = 0):
    """SOT, one contiguous span of ``keep - 2`` content tokens and EOT. The span's start is uniform
    in ``[0, n - keep]`` over the ``n - 2`` content tokens of each caption.

    >>> ids = torch.tensor([[49406, 1, 2, 3, 4, 49407, 0, 0]])
    >>> out = block_mask(ids, None, 4, torch.Generator().manual_seed(0))[0]
    >>> out[0, 2] - out[0, 1]
    tensor(1)
    """
    lengths = _check(ids, lengths, keep, pad_id)
    device = draw_device(generator, ids.device)
    span = keep - 2
    last_start = (lengths - 2 - span).clamp(min=0)
    u = torch.rand(lengths.shape, generator=generator, device=device, dtype=torch.float64)
    start = 1 + torch.minimum((u * (last_start + 1)).floor().to(torch.int64), last_start)
    pos = torch.arange(ids.shape[1], device=ids.device)
    outside = (pos < start[:, None]) | (pos >= start[:, None] + span)
    return _select(ids, lengths, keep, outside.to(torch.int64), pad_id)


def syntax_mask(ids, lengths, keep: int, syntax_rank: torch.Tensor, *, pad_id: int = 0):
    """SOT, the ``keep - 2`` content tokens of highest part-of-speech priority and EOT.

    ``syntax_rank [vocab]`` (int8..int64, from ``build_syntax_rank``; 0 noun, 1 adjective, 2 verb,
    3 other) ranks each token id; ties go to the earlier token; the output keeps the original order.
    Deterministic: the same caption gives the same tokens every epoch, as in CLIPA.

    >>> rank = torch.tensor([3, 2, 0, 1, 3], dtype=torch.int8)   # ids 1 verb, 2 noun, 3 adjective
    >>> ids = torch.tensor([[0, 1, 2, 3, 4]])                     # SOT=0 .. EOT=4 in this toy vocab
    >>> syntax_mask(ids, None, 4, rank, pad_id=-1)[0].tolist()
    [[0, 2, 3, 4]]
    """
    lengths = _check(ids, lengths, keep, pad_id)
    if not isinstance(syntax_rank, torch.Tensor) or syntax_rank.dim() != 1 or syntax_rank.is_floating_point():
        raise TypeError(
            f"syntax_rank must be a 1-D integer tensor [vocab], got {getattr(syntax_rank, 'dtype', type(syntax_rank))}"
        )
    if syntax_rank.device != ids.device:
        raise ValueError(
            f"syntax_rank is on {syntax_rank.device}, expected {ids.device} (as ids); move it once with .to()"
        )
    vocab = syntax_rank.shape[0]
    if vocab == 0:
        raise ValueError("syntax_rank must not be empty")
    if _validation.index_checks_enabled(ids):
        tokens = torch.where(
            torch.arange(ids.shape[1], device=ids.device) < lengths[:, None], ids, 0
        )  # padding may be any id
        if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
            raise ValueError(
                f"ids must be in [0, {vocab}) (syntax_rank's vocab), got max {int(tokens.max())}"
            )
        if int(syntax_rank.min()) < 0 or int(syntax_rank.max()) > 3:
            raise ValueError("syntax_rank must hold ranks in [0, 3] (noun, adjective, verb, other)")
    rank = syntax_rank.to(torch.int64)[ids.clamp(0, vocab - 1)]  # clamp: padding ids (unused ranks)
    return _select(ids, lengths, keep, rank, pad_id)


def pack(ids: torch.Tensor, lengths: torch.Tensor, *, total: int | None = None):
    """Padded ``ids [B, L]`` -> ``(packed [T], cu_seqlens [B + 1] int32)``, ``T = sum(lengths)``.

    For a GPU ``lengths`` give ``total`` (e.g. ``B * keep`` when no caption is shorter), or it is
    read back. ``max(lengths) <= keep`` is flash-attention's ``max_seqlen``.

    >>> pack(torch.tensor([[5, 6, 7], [8, 9, 0]]), torch.tensor([3, 2]))[0].tolist()
    [5, 6, 7, 8, 9]
    """
    _check_ids(ids)
    b, L = ids.shape
    counts = _check_lengths(lengths, ids, 0)
    if total is None:  # a host read for a GPU tensor; pass total= to avoid it
        total = int(counts.sum())
    elif _validation.index_checks_enabled(counts) and total != int(counts.sum()):
        raise ValueError(f"total must be the sum of lengths, {int(counts.sum())}, got {total}")
    total = check_int("total", total, 0, b * L)
    cu = torch.zeros(b + 1, dtype=torch.int64, device=ids.device)
    cu[1:] = counts.cumsum(0)
    row = torch.repeat_interleave(torch.arange(b, device=ids.device), counts, output_size=total)
    col = torch.arange(total, device=ids.device) - cu[row]
    return ids[row, col], cu.to(torch.int32)
