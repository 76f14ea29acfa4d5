"""Caption tokenizer for the reference training loop, on HF ``tokenizers`` (Rust, no downloads).

A BPE model with CLIP's end-of-word marker ``</w>`` (so ``fastclip_kernels.tokens.pos_table`` can tag
each vocabulary entry for syntax masking), NFKC + lowercase normalization and a whitespace/punctuation
pre-tokenizer. It is trained on the training captions (``CaptionTokenizer.train``), or loaded from a
``tokenizer.json`` file that the user gives (``CaptionTokenizer.from_file``). Special tokens of a
trained tokenizer: ``<pad>`` = 0, ``<sot>`` = 1, ``<eot>`` = 2, ``<unk>`` = 3.

``encode_batch`` returns CLIP-style rows ``[SOT, tokens.., EOT, 0, 0, ..]`` of a fixed length: long
captions are truncated *before* EOT, so every row ends its caption with EOT (the text tower pools there).

Example::

    tok = CaptionTokenizer.train(["a dog runs on the grass", "two cats sleep"], vocab_size=200)
    ids, lengths = tok.encode_batch(["a dog sleeps"], context_length=8)   # [1, 8] int64, [1] int64
    tok.decode(ids[0])                                                    # 'a dog sleeps'
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

SPECIAL_TOKENS = ("<pad>", "<sot>", "<eot>", "<unk>")
PAD_ID = 0


def _require_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the training tokenizer needs HF tokenizers: pip install tokenizers") from e
    return tokenizers


def _canonical_ids(tok):
    """``tok`` with ids: specials, sorted base symbols, then the sorted merge results."""
    import json

    tk = _require_tokenizers()
    spec = json.loads(tok.to_str())
    model = spec["model"]
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    merged = ["".join(m) for m in merges]
    produced = set(merged) | set(SPECIAL_TOKENS)
    base = sorted(t for t in model["vocab"] if t not in produced)
    order = list(SPECIAL_TOKENS) + base + sorted(set(merged))
    if set(order) != set(model["vocab"]):
        raise RuntimeError("BPE vocabulary is not specials + base symbols + merge results")
    model["vocab"] = {t: i for i, t in enumerate(order)}
    for entry in spec.get("added_tokens", []):
        entry["id"] = model["vocab"][entry["content"]]
    return tk.Tokenizer.from_str(json.dumps(spec))


class CaptionTokenizer:
    """Wraps a ``tokenizers.Tokenizer``; ``sot``/``eot``/``unk`` name its special tokens."""

    def __init__(self, tokenizer, *, sot: str = "<sot>", eot: str = "<eot>", unk: str | None = "<unk>"):
        ids = {}
        for role, token in (("sot", sot), ("eot", eot)):
            ids[role] = tokenizer.token_to_id(token)
            if ids[role] is None:
                raise ValueError(f"{role} token {token!r} is not in the tokenizer's vocabulary")
        self._tok = tokenizer
        self.sot_id, self.eot_id = ids["sot"], ids["eot"]
        self.unk_id = tokenizer.token_to_id(unk) if unk is not None else None
        self.pad_id = PAD_ID
        self._tok.no_padding()
        self._tok.no_truncation()
        self._context_length: int | None = None

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def train(
        cls, captions: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2
    ) -> CaptionTokenizer:
        """Train a BPE tokenizer on ``captions`` (an iterable of strings; read once).

        Ids are renumbered canonically (special tokens, the single symbols sorted, then the merge
        results sorted), since HF's trainer numbers them in hash order: equal merge sets give equal
        ids. (The trainer may still order merges of equal count differently; ``build.tokenizer``
        shares one tokenizer between runs of one dataset.)"""
        if (
            isinstance(vocab_size, bool)
            or not isinstance(vocab_size, int)
            or vocab_size <= len(SPECIAL_TOKENS)
        ):
            raise ValueError(f"vocab_size must be an int > {len(SPECIAL_TOKENS)}, got {vocab_size!r}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
        tk = _require_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE(unk_token="<unk>", end_of_word_suffix="</w>"))
        tok.normalizer = tk.normalizers.Sequence(
            [tk.normalizers.NFKC(), tk.normalizers.Lowercase(), tk.normalizers.Strip()]
        )
        tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
        tok.decoder = tk.decoders.BPEDecoder(suffix="</w>")
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            end_of_word_suffix="</w>",
            show_progress=False,
        )
        tok.train_from_iterator((str(c) for c in captions), trainer=trainer)
        return cls(_canonical_ids(tok))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, sot: str = "<sot>", eot: str = "<eot>", unk: str | None = "<unk>"
    ) -> CaptionTokenizer:
        """Load a ``tokenizer.json`` (HF tokenizers format), e.g. one the user gives. Name its
        start/end tokens if they differ (CLIP's: ``sot="<|startoftext|>", eot="<|endoftext|>"``).
        Rows are always padded with id 0; use the returned lengths, not the pad id, to find the end."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {os.fspath(path)!r}")
        tk = _require_tokenizers()
        return cls(tk.Tokenizer.from_file(os.fspath(path)), sot=sot, eot=eot, unk=unk)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CaptionTokenizer:
        """Load a tokenizer written by :meth:`save`."""
        return cls.from_file(path)

    def save(self, path: str | os.PathLike) -> None:
        """Write one JSON file in tokenizers' own format."""
        self._tok.no_padding()
        self._tok.no_truncation()
        self._context_length = None
        self._tok.save(os.fspath(path))

    # -- use --------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def vocab(self) -> list[str]:
        """Token strings indexed by id (for ``pos_table.build_pos_rank``)."""
        table = [""] * self.vocab_size
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            table[i] = token
        return table

    def _configure(self, context_length: int) -> None:
        if self._context_length == context_length:
            return
        tk = _require_tokenizers()
        sot, eot = self._tok.id_to_token(self.sot_id), self._tok.id_to_token(self.eot_id)
        self._tok.post_processor = tk.processors.TemplateProcessing(
            single=f"{sot} $A {eot}", special_tokens=[(sot, self.sot_id), (eot, self.eot_id)]
        )
        # Truncation leaves room for the two special tokens, so EOT is always kept.
        self._tok.enable_truncation(max_length=context_length)
        self._tok.enable_padding(pad_id=self.pad_id, pad_token="<pad>", length=context_length)
        self._context_length = context_length

    def encode_batch(self, texts: Sequence[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize ``texts`` -> ``ids [B, context_length]`` int64 (``SOT tokens EOT`` then 0s) and
        ``lengths [B]`` int64 (tokens incl. SOT and EOT; at least 2, at most ``context_length``)."""
        if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
            raise ValueError(
                f"context_length must be an int >= 2 (room for SOT and EOT), got {context_length!r}"
            )
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        self._configure(context_length)
        encodings = self._tok.encode_batch([str(t) for t in texts], add_special_tokens=True)
        if not encodings:
            return torch.zeros(0, context_length, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        lengths = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64).sum(1)
        return ids, lengths

    def encode(self, text: str, context_length: int) -> tuple[torch.Tensor, int]:
        """One caption: ``ids [context_length]``, length."""
        ids, lengths = self.encode_batch([text], context_length)
        return ids[0], int(lengths[0])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids (list or 1-D tensor; padding and specials dropped) -> text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            specials = {self.pad_id, self.sot_id, self.eot_id}
            ids = [i for i in ids if i not in specials]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"CaptionTokenizer(vocab_size={self.vocab_size}, sot={self.sot_id}, eot={self.eot_id})"
