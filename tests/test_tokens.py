"""CLIPA token reduction (fastclip_kernels/tokens): masks, class token, text, POS table, errors."""

import doctest
import sys

import pytest
import torch
from test_no_host_sync import HostReads

import fastclip_kernels._validation as validation
from fastclip_kernels import tokens as tk
from fastclip_kernels.tokens import image, syntax_table, text

SOT, EOT, PAD = 900, 901, 0


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_sorted_distinct(idx: torch.Tensor, n: int) -> None:
    assert (idx[..., 1:] > idx[..., :-1]).all(), "indices must be strictly increasing (sorted, distinct)"
    assert idx.dtype == torch.int64 and idx.min() >= 0 and idx.max() < n


@pytest.mark.parametrize("batch,grid,keep,n", [(1, 4, 1, 16), (7, (3, 5), 8, 15), (3, 7, 49, 49)], ids=str)
def test_random_keep(batch, grid, keep, n):
    idx = tk.random_keep(batch, grid, keep, generator=gen(1))
    assert idx.shape == (batch, keep)
    assert_sorted_distinct(idx, n)


RANDOM_OPS = {
    "random_keep": lambda g: tk.random_keep(16, 14, 49, generator=g),
    "random_keep_varlen": lambda g: tk.random_keep_varlen(16, 14, list(range(10, 26)), generator=g)[0],
    "grid_keep": lambda g: tk.grid_keep(64, 14, generator=g),
    "grid_keep_per_window": lambda g: tk.grid_keep(16, 14, per_window=True, generator=g),
    "block_keep": lambda g: tk.block_keep(64, 14, 16, generator=g),
    "random_mask": lambda g: tk.random_mask(toy_ids(16, 32)[0], None, 8, g)[0],
    "block_mask": lambda g: tk.block_mask(toy_ids(64, 32)[0], None, 8, g)[0],
}


@pytest.mark.parametrize("op", RANDOM_OPS.values(), ids=list(RANDOM_OPS))
def test_seeded(op):
    assert torch.equal(op(gen(3)), op(gen(3))), "same seed must give the same mask"
    assert not torch.equal(op(gen(3)), op(gen(4))), "different seeds must give different masks"


def test_random_keep_uniform():  # each patch kept with frequency keep / N (std ~0.01 here)
    freq = torch.bincount(tk.random_keep(4000, 4, 4, generator=gen(0)).flatten(), minlength=16) / 4000
    assert (freq - 4 / 16).abs().max() < 0.04, freq
    idx, cu = tk.random_keep_varlen(6000, (4, 4), [2, 8, 14] * 2000, generator=gen(5))
    rows = torch.repeat_interleave(torch.arange(6000) % 3, (cu[1:] - cu[:-1]).long())
    for b, k in enumerate([2, 8, 14]):
        freq = torch.bincount(idx[rows == b], minlength=16) / 2000
        assert (freq - k / 16).abs().max() < 0.05, (k, freq)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_random_keep_varlen(as_tensor):
    counts = [1, 5, 16, 3, 9, 12, 7]
    kc = torch.tensor(counts) if as_tensor else counts
    idx, cu = tk.random_keep_varlen(len(counts), (4, 4), kc, generator=gen(2))
    assert cu.dtype == torch.int32 and cu.tolist() == [0, *torch.tensor(counts).cumsum(0).tolist()]
    assert idx.shape == (sum(counts),)
    for b in range(len(counts)):
        assert_sorted_distinct(idx[cu[b] : cu[b + 1]], 16)
    idx2, cu2 = tk.random_keep_varlen(len(counts), (4, 4), kc, total=sum(counts), generator=gen(2))
    assert torch.equal(idx, idx2) and torch.equal(cu, cu2)


@pytest.mark.parametrize("grid", [(4, 4), (5, 6), (7, 7), (1, 3)], ids=str)
@pytest.mark.parametrize("per_window", [False, True])
def test_grid_keep_one_per_window(grid, per_window):
    gh, gw = grid
    idx = tk.grid_keep(50, grid, per_window=per_window, generator=gen(6))
    wy, wx = (gh + 1) // 2, (gw + 1) // 2
    assert idx.shape == (50, wy * wx)
    assert_sorted_distinct(idx, gh * gw)
    window = (idx // gw // 2) * wx + (idx % gw) // 2  # the 2x2 window of each kept patch
    assert torch.equal(window.sort(1).values, torch.arange(wy * wx).expand_as(window)), "one per window"


def test_grid_keep_offsets():  # per image: one corner (dy, dx) in every window; per window: independent
    for per_window, same in [(False, 1.0), (True, 1 / 64)]:
        idx = tk.grid_keep(4000, 4, per_window=per_window, generator=gen(7))  # 4x4: full windows only
        corner = (idx // 4 % 2) * 2 + idx % 4 % 2
        assert abs((corner == corner[:, :1]).all(dim=1).double().mean() - same) < 0.02, per_window
        freq = torch.bincount(corner.flatten(), minlength=4) / corner.numel()
        assert (freq - 0.25).abs().max() < 0.04, freq


BLOCKS = [((14, 14), 16, (4, 4)), ((14, 14), 12, (3, 4)), ((14, 14), 50, (7, 8)), ((14, 14), 196, (14, 14))]


@pytest.mark.parametrize("grid,keep,shape", [*BLOCKS, ((5, 5), 7, (3, 3)), ((2, 100), 100, (2, 50))], ids=str)
def test_block_keep(grid, keep, shape):
    (gh, gw), (bh, bw) = grid, shape
    assert tk.block_shape(grid, keep) == shape
    idx = tk.block_keep(300, grid, keep, generator=gen(8))
    assert idx.shape == (300, keep)
    assert_sorted_distinct(idx, gh * gw)
    r, c = idx // gw, idx % gw
    y0, x0 = r.min(1, keepdim=True).values, c.min(1, keepdim=True).values
    t = torch.arange(keep)
    assert torch.equal(r - y0, (t // bw).expand_as(r)) and torch.equal(c - x0, (t % bw).expand_as(c))
    corners = set(zip(y0.flatten().tolist(), x0.flatten().tolist(), strict=True))
    if (gh - bh + 1) * (gw - bw + 1) <= 30:  # every position where the block fits is drawn
        assert corners == {(y, x) for y in range(gh - bh + 1) for x in range(gw - bw + 1)}


def test_resize():
    out = tk.resize_images(torch.full((2, 3, 224, 224), 0.5), 112)
    assert out.shape == (2, 3, 112, 112) and torch.allclose(out, torch.tensor(0.5))
    assert tk.resize_images(torch.rand(1, 3, 64, 48), (32, 16)).shape == (1, 3, 32, 16)
    assert tk.resized_grid(112, 16) == (7, 7) and tk.resized_grid(70, 14) == (5, 5)
    assert tk.resized_grid((64, 96), 16) == (4, 6)


def test_class_token_and_gather():
    idx = tk.random_keep(3, 4, 5, generator=gen(9))
    tok, cu = tk.with_class_token(idx, grid=4)
    assert tok.shape == (3, 6) and (tok[:, 0] == 0).all() and torch.equal(tok[:, 1:], idx + 1)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 6, 12, 18]
    x = torch.randn(3, 17, 8)
    assert torch.equal(tk.gather_tokens(x, tok), torch.stack([x[b, tok[b]] for b in range(3)]))
    pidx, pcu = tk.random_keep_varlen(3, 4, [1, 16, 4], generator=gen(9))
    ptok, tcu = tk.with_class_token(pidx, pcu, grid=4)
    assert tcu.dtype == torch.int32 and tcu.tolist() == [0, 2, 19, 24]
    for b in range(3):
        seg = ptok[tcu[b] : tcu[b + 1]]
        assert seg[0] == 0 and torch.equal(seg[1:], pidx[pcu[b] : pcu[b + 1]] + 1), "CLS first, kept"
    expected = torch.cat([x[b, ptok[tcu[b] : tcu[b + 1]]] for b in range(3)])
    assert torch.equal(tk.gather_tokens(x, ptok, tcu), expected)


def toy_ids(batch: int, width: int, seed: int = 0):
    """Captions [SOT, content .., EOT, PAD ..] with content id = 1 + position, lengths in [2, width]."""
    lengths = torch.randint(2, width + 1, (batch,), generator=gen(seed))
    lengths[0], lengths[-1] = 2, width
    ids = torch.where(torch.arange(width) < lengths[:, None], 1 + torch.arange(width), PAD)
    ids[:, 0] = SOT
    ids[torch.arange(batch), lengths - 1] = EOT
    return ids, lengths


STRATEGIES = {
    "truncate": lambda ids, n, k: tk.truncate(ids, n, k),
    "random": lambda ids, n, k: tk.random_mask(ids, n, k, gen(1)),
    "block": lambda ids, n, k: tk.block_mask(ids, n, k, gen(1)),
    "syntax": lambda ids, n, k: tk.syntax_mask(ids, n, k, torch.arange(1000) % 4),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("keep", [2, 3, 8, 16])
def test_text_keeps_sot_eot_and_order(name, keep):
    ids, lengths = toy_ids(33, 16)
    out, new = STRATEGIES[name](ids, lengths, keep)
    assert out.shape == (33, keep) and torch.equal(new, lengths.clamp(max=keep))
    for b in range(33):
        n, m, row = lengths[b].item(), new[b].item(), out[b].tolist()
        assert row[0] == SOT and row[m - 1] == EOT and all(t == PAD for t in row[m:])
        content = row[1 : m - 1]
        assert content == sorted(set(content)) and all(2 <= t <= n - 1 for t in content), "order kept"
        if n <= keep:
            assert torch.equal(out[b, :n], ids[b, :n]), "short captions are unchanged"
        if name == "truncate":
            assert content == list(range(2, m))
        if name == "block" and content:
            assert content == list(range(content[0], content[0] + len(content))), "one contiguous span"
    derived = STRATEGIES[name](ids, None, keep)  # lengths from the padding
    assert torch.equal(derived[0], out) and torch.equal(derived[1], new)


def test_text_random_and_block_uniform():
    ids, lengths = torch.tensor([[SOT, *range(1, 11), EOT]] * 3000), torch.full((3000,), 12)
    kept = tk.random_mask(ids, lengths, 6, gen(2))[0][:, 1:5]
    freq = torch.bincount(kept.flatten(), minlength=11)[1:].double() / 3000
    assert (freq - 0.4).abs().max() < 0.05, freq
    start = tk.block_mask(ids, lengths, 6, gen(2))[0][:, 1]
    freq = torch.bincount(start, minlength=8)[1:].double() / 3000  # starts 1..7 equally likely
    assert (freq - 1 / 7).abs().max() < 0.04, freq


WORDS = {"cat": "NOUN", "dog": "NN", "red": "ADJ", "big": "JJ", "runs": "VBZ", "the": "DT", "on": "ADP"}
WORDS |= {"ca": "X", "!": "."}  # a BPE piece without </w>, punctuation
VOCAB = ["<|startoftext|>", "<|endoftext|>"] + [f"{w}</w>" for w in WORDS if w != "ca"] + ["ca"]
toy_tag = WORDS.__getitem__


def test_syntax_table_and_syntax_priority(tmp_path):
    calls = []
    rank = tk.build_syntax_rank(VOCAB, lambda w: calls.append(w) or toy_tag(w))
    assert rank.dtype == torch.int8 and rank.tolist() == [3, 3, 0, 0, 1, 1, 2, 3, 3, 3, 3]
    assert sorted(calls) == sorted(WORDS), "each distinct word tagged once, </w> stripped, specials skipped"
    assert torch.equal(tk.build_syntax_rank({t: i for i, t in enumerate(VOCAB)}, toy_tag), rank)
    tk.save_syntax_rank(rank, tmp_path / "rank.pt")
    assert torch.equal(tk.load_syntax_rank(tmp_path / "rank.pt"), rank)
    vid = {t.removesuffix("</w>"): i for i, t in enumerate(VOCAB)}
    ids = torch.tensor([[0] + [vid[w] for w in "the red cat runs on the big dog".split()] + [1]])
    for keep, want in [(3, "cat"), (4, "cat dog"), (5, "red cat dog"), (7, "red cat runs big dog")]:
        out = tk.syntax_mask(ids, None, keep, rank, pad_id=-1)[0][0, 1:-1]  # ties: the earlier token
        assert " ".join(VOCAB[i].removesuffix("</w>") for i in out.tolist()) == want


def test_syntax_mask_matches_sort_reference():
    ids, lengths = toy_ids(20, 24, seed=3)
    rank = torch.randint(0, 4, (1000,), generator=gen(4), dtype=torch.int64).to(torch.int8)
    out, _ = tk.syntax_mask(ids, lengths, 9, rank)
    for b in range(20):
        n = lengths[b].item()
        order = sorted(range(1, n - 1), key=lambda p: (rank[ids[b, p]].item(), p))[:7]
        ref = [SOT] + [ids[b, p].item() for p in sorted(order)] + [EOT]
        assert out[b, : len(ref)].tolist() == ref


def test_tag_rank_and_bad_table(tmp_path):
    tags = ["NNS", "PROPN", "JJR", "ADJ", "VBD", "AUX", "DT", "NUM"]
    assert [tk.tag_rank(t) for t in tags] == [0, 0, 1, 1, 2, 2, 3, 3]
    torch.save(torch.tensor([0.5]), tmp_path / "bad.pt")
    with pytest.raises(TypeError, match="table"):
        tk.load_syntax_rank(tmp_path / "bad.pt")
    for tagger in ({"cat": "NN"}.get, lambda w: 3):  # None (an unknown word) or a non-string tag
        with pytest.raises(TypeError, match="tagger must return a POS tag string"):
            tk.build_syntax_rank(["cat</w>", "sat</w>"], tagger)


def test_syntax_table_from_the_lemminflect_lexicon():
    """The offline tagger: content words get their lexicon's first reading, function words OTHER."""
    pytest.importorskip("lemminflect")
    vocab = ["<|startoftext|>", "dog</w>", "red</w>", "climbing</w>", "the</w>", "of</w>", "##s"]
    got = tk.build_syntax_rank(vocab, "lemminflect").tolist()
    assert got == [tk.OTHER, tk.NOUN, tk.ADJ, tk.VERB, tk.OTHER, tk.OTHER, tk.OTHER]


@pytest.mark.parametrize(
    "tagger,hint",
    [
        ("nltk", "pip install nltk"),
        ("spacy", "pip install spacy"),
        ("lemminflect", "pip install lemminflect"),
    ],
)
def test_missing_tagger_dependency(tagger, hint, monkeypatch):
    monkeypatch.setitem(sys.modules, tagger, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=hint):
        tk.build_syntax_rank(VOCAB, tagger)


def test_pack_and_lengths_from_pad():
    ids = torch.tensor([[SOT, 0, 5, EOT], [SOT, EOT, 0, 0]])  # 0 is padding and also a token ("!")
    assert (lengths := tk.lengths_from_pad(ids)).tolist() == [4, 2]
    packed, cu = tk.pack(ids, lengths)
    assert packed.tolist() == [SOT, 0, 5, EOT, SOT, EOT] and cu.tolist() == [0, 4, 6]
    assert cu.dtype == torch.int32
    assert torch.equal(tk.pack(ids, lengths, total=6)[0], packed)


def test_no_host_reads(monkeypatch):
    monkeypatch.setattr(validation, "index_checks_enabled", lambda t: False)
    ids, lengths = toy_ids(8, 16)
    total = int(lengths.clamp(max=8).sum())
    with HostReads() as reads:
        tok, cu = tk.with_class_token(*tk.random_keep_varlen(3, 4, [2, 3, 4], generator=gen(0)))
        tk.gather_tokens(torch.randn(3, 17, 4), tok, cu)
        tk.gather_tokens(torch.randn(8, 17, 4), tk.with_class_token(tk.random_keep(8, 4, 5))[0])
        tk.grid_keep(8, 5, per_window=True), tk.block_keep(8, 5, 7)
        for strategy in STRATEGIES.values():
            out, new = strategy(ids, None, 8)
            tk.pack(out, new, total=total)
    assert reads.ops == [], f"host reads: {reads.ops}"


IDS, LENS = toy_ids(4, 8)
BAD = [
    (lambda: tk.random_keep(2, 4, 17), ValueError, "keep must be in"),
    (lambda: tk.random_keep(2, 4, 2.0), TypeError, "keep"),
    (lambda: tk.random_keep(0, 4, 1), ValueError, "batch"),
    (lambda: tk.random_keep(2, (4,), 2), TypeError, "grid"),
    (lambda: tk.random_keep(2, 4, 2, generator="seed"), TypeError, "generator"),
    (lambda: tk.random_keep_varlen(2, 4, [1]), ValueError, "keep_counts"),
    (lambda: tk.random_keep_varlen(2, 4, [1, 17]), ValueError, "keep_counts"),
    (lambda: tk.random_keep_varlen(2, 4, torch.tensor([1.0, 2.0])), TypeError, "keep_counts"),
    (lambda: tk.random_keep_varlen(2, 4, torch.tensor([1, 2]), total=4), ValueError, "total"),
    (lambda: tk.with_class_token(torch.tensor([[16]]), grid=4), ValueError, "idx"),
    (lambda: tk.with_class_token(torch.tensor([[1.0]])), TypeError, "idx"),
    (lambda: tk.with_class_token(torch.arange(3), torch.tensor([0, 5])), ValueError, "cu_seqlens"),
    (lambda: tk.gather_tokens(torch.randn(2, 5, 3), torch.full((2, 2), 5)), ValueError, "token_idx"),
    (lambda: tk.resize_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4), ValueError, "images"),
    (lambda: tk.resized_grid(8, 16), ValueError, "size"),
    (lambda: tk.truncate(IDS, LENS, 1), ValueError, "keep must be >= 2"),
    (lambda: tk.truncate(IDS, LENS, 9), ValueError, "keep must be <= the context length"),
    (lambda: tk.truncate(IDS.float(), LENS, 4), TypeError, "ids"),
    (lambda: tk.truncate(IDS, LENS[:2], 4), ValueError, "lengths"),
    (lambda: tk.truncate(IDS, torch.tensor([1, 4, 4, 4]), 4), ValueError, "lengths"),
    (lambda: tk.random_mask(IDS, LENS, 4, generator=3), TypeError, "generator"),
    (lambda: tk.syntax_mask(IDS, LENS, 4, torch.zeros(1000)), TypeError, "syntax_rank"),
    (lambda: tk.syntax_mask(IDS, LENS, 4, torch.zeros(10, dtype=torch.int8)), ValueError, "ids"),
    (lambda: tk.syntax_mask(IDS, LENS, 4, torch.full((1000,), 5)), ValueError, "syntax_rank"),
    (lambda: tk.build_syntax_rank(VOCAB, "stanza"), ValueError, "tagger"),
    (lambda: tk.build_syntax_rank(VOCAB, lambda w: 0), TypeError, "tagger"),
    (lambda: tk.build_syntax_rank(42), TypeError, "vocab"),
]


@pytest.mark.parametrize("fn,exc,match", BAD)
def test_bad_input(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize("module", [tk, image, text, syntax_table], ids=lambda m: m.__name__.split(".")[-1])
def test_docstring_examples(module):
    result = doctest.testmod(module, extraglobs={"torch": torch})
    assert result.failed == 0 and result.attempted > 0
