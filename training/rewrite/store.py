"""Resumable results of a generation job, and their export.

``ResultStore`` is an append-only JSONL file of finished items ``{"row": i, "k": k, "text": t}``.
Each batch goes out in one write, flushed and fsynced, so an interrupted job loses at most the batch
in flight; reopening reads what is there (a torn last line from a kill mid-write is dropped and cut
off) and the job only generates the items not done, so nothing is written twice.

Exports: LaCLIP's format (``original.txt`` and ``rewrite_{k}.txt``, one caption per line, aligned
by row) and webdataset shards whose json ``captions`` become ``[captions[0], *extra]`` (LaCLIP: the
original and its rewrites; VeCLIP: the alt-text and the enriched caption), ready for
``--data.caption_sampling laclip`` / ``veclip``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["ResultStore", "export_aligned", "write_augmented_shards"]


class ResultStore:
    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._items: dict[tuple[int, int], str] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        good = 0
        with open(self.path, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    self._items[int(rec["row"]), int(rec["k"])] = str(rec["text"])
                except (ValueError, KeyError):
                    break  # a torn line: everything after it is dropped
                good += len(line)
        with open(self.path, "r+b") as f:
            f.truncate(good)

    def done(self) -> set[tuple[int, int]]:
        return set(self._items)

    def get(self, row: int, k: int) -> str | None:
        return self._items.get((row, k))

    def add(self, records: list[tuple[int, int, str]]) -> None:
        """Append (row, k, text) records durably; an item already stored is an error (never twice)."""
        again = [(r, k) for r, k, _ in records if (r, k) in self._items]
        if again:
            raise ValueError(f"items already stored: {again[:5]}")
        lines = "".join(json.dumps({"row": r, "k": k, "text": t}) + "\n" for r, k, t in records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        self._items.update({(r, k): t for r, k, t in records})

    def __len__(self) -> int:
        return len(self._items)


def _text_or_original(store: ResultStore, row: int, k: int, original: str) -> str:
    text = store.get(row, k)
    return text if text else original  # empty or missing generations fall back to the original


def export_aligned(store: ResultStore, originals: list[str], out_dir, num_outputs: int) -> list[str]:
    """``original.txt`` + ``rewrite_{k}.txt`` for k < num_outputs (aligned by row); returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "original.txt", *(out / f"rewrite_{k}.txt" for k in range(num_outputs))]
    columns = [list(originals)] + [
        [_text_or_original(store, row, k, cap) for row, cap in enumerate(originals)]
        for k in range(num_outputs)
    ]
    for path, lines in zip(paths, columns, strict=True):
        path.write_text("".join(" ".join(line.split()) + "\n" for line in lines), encoding="utf-8")
    return [str(p) for p in paths]


def write_augmented_shards(urls, out_dir, extra_of, shard_size: int = 1000) -> list[str]:
    """Copy shards, setting each sample's json ``captions`` to ``[captions[0], *extra_of(index)]``.

    ``extra_of(index) -> list[str]`` gives the new captions of the sample with that global index
    (an empty list keeps just the first caption). Image bytes are copied as they are."""
    import webdataset as wds

    from ..data.datasets import sample_captions
    from ..data.stream import expand_urls

    os.makedirs(out_dir, exist_ok=True)
    pattern = str(Path(out_dir) / "shard-%06d.tar")
    sources = [{"url": u} for u in expand_urls(urls)]
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for position, sample in enumerate(wds.tarfile_samples(iter(sources))):
            index, captions = sample_captions(sample, position)  # the index iter_captions gives
            meta = {**(json.loads(sample["json"]) if "json" in sample else {}), "index": index}
            meta["captions"] = [captions[0], *extra_of(index)]
            out = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            out.update(json=meta, txt=meta["captions"][0])
            sink.write(out)
        n = sink.shard
    return [pattern % k for k in range(n)]
