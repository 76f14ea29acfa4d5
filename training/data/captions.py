"""Per-sample caption choice at load time: LaCLIP rewrite sampling and VeCLIP alt-text/enriched mixing.

Both are deterministic functions of (seed, epoch, global index), so a resumed run draws the same texts as an
uninterrupted one, and they run in the dataset's `__getitem__` (or a webdataset `map`), in the loader workers:
the training step pays nothing.

- LaCLIP (arXiv 2305.20088, data.py `CsvDatasetAugCap`): `captions = [original, rewrite_1, ...]`; each load
  picks one uniformly; a pick with fewer than 2 whitespace-separated words falls back to the original.
- VeCLIP (arXiv 2310.07699): `captions = [alt_text, enriched]`; the enriched caption with probability `p`
  (the paper mixes 50/50), else the alt-text; a missing or empty enriched caption gives the alt-text.

    >>> choose = LaCLIPSampler(seed=0)
    >>> choose.set_epoch(3)
    >>> text = choose(["a dog runs on grass", "dog", "a brown dog running"], index=17)
"""

from __future__ import annotations

import re

from torch.utils.data import Dataset

_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a cheap, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform01(seed: int, epoch: int, index: int, salt: int = 0) -> float:
    """A uniform float in [0, 1), a pure function of its integer arguments."""
    h = _mix64(_mix64(_mix64(_mix64(salt) ^ seed) ^ epoch) ^ index)
    return (h >> 11) / float(1 << 53)


class _EpochChoice:
    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw a fresh choice per sample each epoch (call before building the epoch's loader iterator)."""
        self.epoch = int(epoch)


class LaCLIPSampler(_EpochChoice):
    """Pick uniformly among [original, *rewrites]; fewer than 2 words falls back to the original."""

    _SALT = 0x1AC1

    def __call__(self, captions: list[str], index: int, epoch: int | None = None) -> str:
        if not captions:
            raise ValueError("captions must hold at least the original caption, got an empty list")
        e = self.epoch if epoch is None else epoch
        pick = captions[int(uniform01(self.seed, e, index, self._SALT) * len(captions))]
        return pick if len(pick.split()) >= 2 else captions[0]


class VeCLIPMixer(_EpochChoice):
    """Pick the enriched caption (`captions[1]`) with probability p, else the alt-text (`captions[0]`)."""

    _SALT = 0xFEC1

    def __init__(self, p: float = 0.5, seed: int = 0):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        super().__init__(seed)
        self.p = float(p)

    def __call__(self, captions: list[str], index: int, epoch: int | None = None) -> str:
        if not captions:
            raise ValueError("captions must hold at least the alt-text, got an empty list")
        e = self.epoch if epoch is None else epoch
        enriched = captions[1] if len(captions) > 1 and captions[1].strip() else None
        if enriched is not None and uniform01(self.seed, e, index, self._SALT) < self.p:
            return enriched
        return captions[0]


class WithCaptionChoice(Dataset):
    """Wrap a (image, captions, index) dataset so items become (image, one caption, index).

    `choose(captions, index)` is a `LaCLIPSampler`, a `VeCLIPMixer` or any callable of that signature;
    `set_epoch` forwards to it. A None item (a corrupt image) stays None.
    """

    def __init__(self, dataset: Dataset, choose):
        self.dataset, self.choose = dataset, choose

    def set_epoch(self, epoch: int) -> None:
        self.choose.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if item is None:
            return None
        image, captions, gidx = item
        return image, self.choose(captions, gidx), gidx


# Function words dropped from a caption to make a keyword-like alt-text (articles, auxiliaries, prepositions,
# conjunctions, pronouns); content words stay in their order.
ALT_TEXT_STOP_WORDS = frozenset(
    "a an the is are was were be been being am has have had do does did of in on at to with without and or but "
    "for from by into onto over under near through while as up down out off its it his her their there this "
    "that these those who which what some".split()
)


def alt_text(caption: str) -> str:
    """A short keyword-like stand-in for web alt-text: the caption's lowercased words, punctuation and
    ``ALT_TEXT_STOP_WORDS`` dropped (``"A dog is running on the grass ." -> "dog running grass"``); the
    caption itself when nothing is left."""
    words = [w for w in re.findall(r"[a-z0-9']+", caption.lower()) if w not in ALT_TEXT_STOP_WORDS]
    return " ".join(words) or caption.strip()


def alt_and_enriched(captions: list[str]) -> list[str]:
    """VeCLIP's caption pair from several human captions: ``[alt_text(shortest), longest]`` (words counted;
    ties: the first). Flickr8k has no alt-text and no LLM-enriched captions; this stands in for both."""
    if not captions:
        raise ValueError("captions must hold at least one caption, got an empty list")
    n_words = [len(c.split()) for c in captions]
    shortest = captions[n_words.index(min(n_words))]
    longest = captions[n_words.index(max(n_words))]
    return [alt_text(shortest), longest]
