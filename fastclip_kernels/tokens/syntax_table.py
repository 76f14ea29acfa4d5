"""Part-of-speech rank table for CLIPA syntax masking: one rank per token id, built once, saved, and
used on the device by ``text.syntax_mask`` (so training never runs a tagger).

Ranks: ``NOUN = 0`` (Penn NN*, universal NOUN/PROPN), ``ADJ = 1`` (JJ*, ADJ), ``VERB = 2`` (VB*,
VERB/AUX), ``OTHER = 3`` (everything else, special tokens, empty strings). As in CLIPA's JAX
``noun_tokenize``, each vocabulary entry is tagged in isolation as a one-word sentence: CLIP's
end-of-word marker ``</w>`` (and WordPiece's ``##``) is stripped first, and special tokens such as
``<|startoftext|>`` or ``[CLS]`` are ``OTHER``. CLIPA's torch version tags whole words in context
instead; a per-id table is what makes the masking a sort on the device.

Taggers: ``"lemminflect"`` (``pip install lemminflect``: its English lexicon ships in the wheel, so it
works offline; a word gets the first universal tag the lexicon lists for it, e.g. ``red -> ADJ``,
``dog -> NOUN``; words it lacks, such as function words, are ``OTHER``), ``"nltk"`` (``pip install
nltk``, then ``python -m nltk.downloader averaged_perceptron_tagger_eng``), ``"spacy"`` (``pip install
spacy``, then ``python -m spacy download en_core_web_sm``), or any callable ``word -> tag`` returning a
Penn or universal tag.
"""

import re
from collections.abc import Callable, Mapping, Sequence

import torch

__all__ = [
    "ADJ",
    "NOUN",
    "OTHER",
    "VERB",
    "build_syntax_rank",
    "load_syntax_rank",
    "save_syntax_rank",
    "tag_rank",
]

NOUN, ADJ, VERB, OTHER = 0, 1, 2, 3
_UNIVERSAL = {"NOUN": NOUN, "PROPN": NOUN, "ADJ": ADJ, "VERB": VERB, "AUX": VERB}
_SPECIAL = re.compile(r"^(<\|.*\|>|\[[A-Z]+\])$")


def tag_rank(tag: str) -> int:
    """Rank of a POS tag: universal (spaCy) tags or Penn Treebank (NLTK) prefixes NN/JJ/VB."""
    tag = tag.upper()
    if tag in _UNIVERSAL:
        return _UNIVERSAL[tag]
    for prefix, rank in (("NN", NOUN), ("JJ", ADJ), ("VB", VERB)):
        if tag.startswith(prefix):
            return rank
    return OTHER


def token_word(token: str) -> str:
    """The word a vocabulary entry stands for: ``"cat</w>" -> "cat"``, ``"##ing" -> "ing"``,
    special tokens -> ``""``."""
    if _SPECIAL.match(token):
        return ""
    word = token[: -len("</w>")] if token.endswith("</w>") else token
    return word.removeprefix("##").strip()


def _nltk_tags(words: list[str]) -> list[str]:
    try:
        import nltk
    except ImportError as e:
        raise ImportError(
            "build_syntax_rank(tagger='nltk') needs NLTK: pip install nltk && "
            "python -m nltk.downloader averaged_perceptron_tagger_eng "
            "(or use tagger='spacy' or a callable word -> tag)"
        ) from e
    try:
        return [sent[0][1] for sent in nltk.pos_tag_sents([[w] for w in words])]
    except LookupError as e:
        raise LookupError(
            "NLTK's POS tagger data is missing: python -m nltk.downloader averaged_perceptron_tagger_eng"
        ) from e


def _spacy_tags(words: list[str], model: str) -> list[str]:
    try:
        import spacy
    except ImportError as e:
        raise ImportError(
            f"build_syntax_rank(tagger='spacy') needs spaCy: pip install spacy && python -m spacy download {model} "
            "(or use tagger='nltk' or a callable word -> tag)"
        ) from e
    try:
        nlp = spacy.load(model, disable=["parser", "ner", "lemmatizer"])
    except OSError as e:
        raise OSError(f"spaCy model {model!r} is missing: python -m spacy download {model}") from e
    return [doc[0].pos_ if len(doc) else "X" for doc in nlp.pipe(words, batch_size=4096)]


def _lemminflect_tags(words: list[str]) -> list[str]:
    try:
        from lemminflect import getAllLemmas
    except ImportError as e:
        raise ImportError(
            "build_syntax_rank(tagger='lemminflect') needs lemminflect: pip install lemminflect "
            "(or use tagger='nltk', 'spacy' or a callable word -> tag)"
        ) from e
    return [next(iter(getAllLemmas(w)), "X") for w in words]


def _callable_tags(words: list[str], tagger: Callable[[str], str]) -> list[str]:
    tags = [tagger(w) for w in words]
    bad = [t for t in tags if not isinstance(t, str)]
    if bad:
        raise TypeError(
            f"tagger must return a POS tag string (e.g. 'NOUN', 'NN'), got {type(bad[0]).__name__}"
        )
    return tags


def _id_to_token(vocab) -> list[str | None]:
    if isinstance(vocab, Mapping):
        ids = list(vocab.values())
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError("vocab must map tokens to non-negative int ids")
        table: list[str | None] = [None] * (max(ids, default=-1) + 1)
        for token, i in vocab.items():
            table[i] = token
        return table
    if isinstance(vocab, Sequence) and not isinstance(vocab, str):
        return list(vocab)
    raise TypeError(
        f"vocab must be a list of tokens (index = id) or a dict token -> id, got {type(vocab).__name__}"
    )


def build_syntax_rank(
    vocab: Sequence[str] | Mapping[str, int],
    tagger: str | Callable[[str], str] = "nltk",
    *,
    spacy_model: str = "en_core_web_sm",
) -> torch.Tensor:
    """``[vocab]`` int8 ranks (0 noun, 1 adjective, 2 verb, 3 other), one per token id.

    ``vocab``: a list of tokens (index = id) or a dict token -> id (e.g. open_clip's
    ``SimpleTokenizer().encoder``; ids with no token get ``OTHER``). ``tagger``: ``"lemminflect"``,
    ``"nltk"``, ``"spacy"`` or a callable ``word -> tag``. Each distinct word is tagged once.

    >>> build_syntax_rank(["<|startoftext|>", "cat</w>", "red</w>"], {"cat": "NOUN", "red": "ADJ"}.get).tolist()
    [3, 0, 1]
    """
    tokens = _id_to_token(vocab)
    if any(t is not None and not isinstance(t, str) for t in tokens):
        raise TypeError("vocab tokens must be strings")
    words = [token_word(t) if t is not None else "" for t in tokens]
    distinct = sorted({w for w in words if w})
    if callable(tagger):
        tags = _callable_tags(distinct, tagger)
    elif tagger == "lemminflect":
        tags = _lemminflect_tags(distinct)
    elif tagger == "nltk":
        tags = _nltk_tags(distinct)
    elif tagger == "spacy":
        tags = _spacy_tags(distinct, spacy_model)
    else:
        raise ValueError(
            f"tagger must be 'lemminflect', 'nltk', 'spacy' or a callable word -> tag, got {tagger!r}"
        )
    rank_of = {w: tag_rank(t) for w, t in zip(distinct, tags, strict=True)}
    return torch.tensor([rank_of.get(w, OTHER) for w in words], dtype=torch.int8)


def _check_table(table, where: str) -> torch.Tensor:
    if not isinstance(table, torch.Tensor) or table.dim() != 1 or table.is_floating_point():
        raise TypeError(
            f"{where} must be a 1-D integer tensor [vocab], got {getattr(table, 'dtype', type(table))}"
        )
    if table.numel() and (int(table.min()) < 0 or int(table.max()) > OTHER):
        raise ValueError(f"{where} must hold ranks in [0, 3] (noun, adjective, verb, other)")
    return table


def save_syntax_rank(table: torch.Tensor, path) -> None:
    """Save a rank table (as CPU int8) with ``torch.save``."""
    torch.save(_check_table(table, "table").detach().to("cpu", torch.int8), path)


def load_syntax_rank(path, device=None) -> torch.Tensor:
    """Load a table saved by ``save_syntax_rank`` (``weights_only``), optionally onto ``device``."""
    table = torch.load(path, map_location="cpu", weights_only=True)
    return _check_table(table, f"the table in {path}").to(device or "cpu")
