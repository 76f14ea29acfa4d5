"""Caption embedding cache for LLM2CLIP: the frozen encoder runs once, offline; training reads vectors.

    python -m training.llm2clip.cache --model runs/cc-minilm/model --out runs/emb-flickr8k --preset flickr8k
    fastclip-train --preset flickr8k --model.text_tower adapter --data.text_embeddings runs/emb-flickr8k

Layout of the folder: ``emb-00000.pt``, ... (``[rows, dim]`` fp16 or bf16 tensors, ``shard_rows``
rows each) and ``index.json`` {"dim", "dtype", "model", "shards": [{"file", "rows"}], "texts"}: row r of
the concatenated table is the embedding of ``texts[r]`` (distinct texts; unit norm before the cast).
The CLI embeds every text a run can ask for: all captions of every training sample (LaCLIP / VeCLIP
choose among them), the retrieval captions and the zero-shot prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

__all__ = ["CacheTokenizer", "EmbeddingCache", "build_cache", "run_texts"]


def build_cache(
    encoder, texts, out_dir, *, shard_rows: int = 65536, dtype: str = "float16", batch_size: int = 256
):
    """Embed the distinct ``texts`` (first-seen order) into ``out_dir``; returns the index dict."""
    distinct = list(dict.fromkeys(" ".join(t.split()) for t in texts))
    if not distinct or not all(distinct):
        raise ValueError("texts must be a non-empty list of non-empty captions")
    if dtype not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype!r}")
    os.makedirs(out_dir, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, len(distinct), shard_rows)):
        emb = encoder.encode(distinct[start : start + shard_rows], batch_size).to(getattr(torch, dtype))
        name = f"emb-{k:05d}.pt"
        torch.save(emb.detach().cpu().contiguous(), os.path.join(out_dir, name))  # device-neutral file
        shards.append({"file": name, "rows": emb.shape[0]})
    index = {"dim": encoder.dim, "dtype": dtype, "model": getattr(encoder, "model_name", ""), "shards": shards,
             "texts": distinct}  # fmt: skip
    with open(os.path.join(out_dir, "index.json"), "w") as f:
        json.dump(index, f)
    return index


class EmbeddingCache:
    """A built cache: ``table`` [rows, dim] on ``device`` (CPU by default: the adapter tower that holds
    it moves with the model to each rank's device) and ``rows(texts)``."""

    def __init__(self, path, device="cpu"):
        index_path = os.path.join(path, "index.json")
        if not os.path.exists(index_path):
            raise FileNotFoundError(
                f"data.text_embeddings: no embedding cache at {path} (index.json missing)"
            )
        with open(index_path) as f:
            self.index = json.load(f)
        parts = [
            torch.load(os.path.join(path, s["file"]), map_location="cpu", weights_only=True)
            for s in self.index["shards"]
        ]  # files saved from a GPU would otherwise land on the device they were saved from (cuda:0)
        self.table = torch.cat(parts).to(device)
        if self.table.shape != (len(self.index["texts"]), self.index["dim"]):
            raise ValueError(f"{path}: table {tuple(self.table.shape)} does not match its index")
        self._row = {t: i for i, t in enumerate(self.index["texts"])}

    @property
    def dim(self) -> int:
        return int(self.index["dim"])

    def rows(self, texts) -> torch.Tensor:
        out = []
        for t in texts:
            key = " ".join(t.split())
            if key not in self._row:
                raise KeyError(f"caption not in the embedding cache (rebuild it for this data): {t!r}")
            out.append(self._row[key])
        return torch.tensor(out, dtype=torch.long)


class CacheTokenizer:
    """Stands in for the text tokenizer: a caption's "ids" are ``[row]`` ([B, 1], length 1), so
    CLIPA's text reduction (which acts on ids longer than its target length) leaves them alone."""

    def __init__(self, cache: EmbeddingCache):
        self.cache = cache
        self.vocab_size = cache.table.shape[0]

    def encode_batch(self, texts, context_length: int):
        return self.cache.rows(texts).view(-1, 1), torch.ones(len(texts), dtype=torch.long)


def run_texts(cfg) -> list[str]:
    """Every text a run of ``cfg`` may embed: training captions (all of them), eval captions, prompts."""
    from ..data import sources
    from ..evaluate import fill_template

    ds, _ = sources.train_dataset(cfg)
    texts = [] if ds is not None else sources.shard_captions(cfg, limit=None)
    sets = sources.eval_sets(cfg, cfg.data_image_size)
    for d in (getattr(ds, "dataset", ds), sets["retrieval"]):
        if d is None:
            continue
        caps = d.captions if hasattr(d, "captions") else (d[i][1] for i in range(len(d)))
        texts += [c for group in caps for c in ([group] if isinstance(group, str) else group)]
    if sets["zero_shot"] is not None:
        _, classes, templates = sets["zero_shot"]
        texts += [fill_template(t, c) for c in classes for t in templates]
    return texts


def main(argv=None) -> int:
    from ..config import parse_args
    from .encoder import MeanPoolEncoder

    p = argparse.ArgumentParser(
        prog="python -m training.llm2clip.cache", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", required=True, help="the (CC-tuned) text encoder: a local transformers folder")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default="cpu")
    args, rest = p.parse_known_args(argv)
    cfg = parse_args(rest)
    encoder = MeanPoolEncoder(args.model, device=args.device)
    encoder.model_name = args.model
    index = build_cache(encoder, run_texts(cfg), args.out, dtype=args.dtype)
    print(f"{len(index['texts'])} texts x {index['dim']} ({args.dtype}) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
