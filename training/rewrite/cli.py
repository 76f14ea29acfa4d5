"""``fastclip-rewrite``: LaCLIP caption rewrites and VeCLIP caption fusion with local models.

    fastclip-rewrite rewrite --shards 'shards/shard-{000000..000005}.tar' --model /models/llama \\
        --out out/laclip --num-rewrites 4            # -> out/laclip/{rewrites.jsonl, *.txt, shards/}
    fastclip-rewrite rewrite --captions captions.txt --model /models/llama --out out/laclip
    fastclip-rewrite fuse --shards 'shards/...' --model /models/llama --captioner /models/blip \\
        --out out/veclip                             # -> out/veclip/{visual.jsonl, fused.jsonl, shards/}

Interrupt and rerun the same command to continue: finished items are kept and never redone.
Then train with ``--data.kind shards --data.path out/laclip/shards/... --data.caption_sampling laclip``
(or ``veclip``).
"""

from __future__ import annotations

import argparse
import os
import sys

from ..data.stream import iter_captions

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastclip-rewrite", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="job", required=True)
    for name in ("rewrite", "fuse"):
        s = sub.add_parser(name)
        s.add_argument(
            "--shards", help="webdataset shard pattern (json captions[0] is the original / alt-text)"
        )
        if name == "rewrite":
            s.add_argument("--captions", help="text file, one caption per line (instead of --shards)")
            s.add_argument("--num-rewrites", type=int, default=4, help="rewrites per caption (K)")
        else:
            s.add_argument("--captioner", help="local image-to-text model for the visual captions")
            s.add_argument(
                "--visual-captions", help="or a text file of visual captions aligned with the shards"
            )
        s.add_argument("--model", required=True, help="local causal LM folder or cached name")
        s.add_argument("--out", required=True, help="output folder")
        s.add_argument("--device", default="cpu")
        s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        s.add_argument("--batch-size", type=int, default=32)
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--temperature", type=float, default=0.9)
        s.add_argument("--top-p", type=float, default=0.95)
        s.add_argument("--max-new-tokens", type=int, default=77)
    return p


def _rewrite(args, lm, gen) -> None:
    from .jobs import rewrite_captions
    from .store import export_aligned, write_augmented_shards

    if bool(args.shards) == bool(args.captions):
        raise SystemExit("rewrite: give exactly one of --shards and --captions")
    if args.captions:
        with open(args.captions, encoding="utf-8") as f:
            rows = [(i, [line.rstrip("\n")]) for i, line in enumerate(f)]
    else:
        rows = list(iter_captions(args.shards))
    originals = [caps[0] for _, caps in rows]
    store = rewrite_captions(originals, lm, os.path.join(args.out, "rewrites.jsonl"),
                             num_rewrites=args.num_rewrites, batch_size=args.batch_size, **gen)  # fmt: skip
    export_aligned(store, originals, args.out, args.num_rewrites)
    if args.shards:
        row_of = {index: row for row, (index, _) in enumerate(rows)}
        K = args.num_rewrites

        def extra(index):
            row = row_of[index]
            return [store.get(row, k) or originals[row] for k in range(K)]

        write_augmented_shards(args.shards, os.path.join(args.out, "shards"), extra)


def _fuse(args, lm, gen) -> None:
    from .jobs import PipelineCaptioner, fuse_captions
    from .store import write_augmented_shards

    if not args.shards or bool(args.captioner) == bool(args.visual_captions):
        raise SystemExit("fuse: give --shards and exactly one of --captioner and --visual-captions")
    rows = list(iter_captions(args.shards))
    alt = [caps[0] for _, caps in rows]
    if args.visual_captions:
        with open(args.visual_captions, encoding="utf-8") as f:
            visual = [line.strip() for line in f]
    else:
        visual = _caption_shards(args, PipelineCaptioner(args.captioner, args.device), len(rows))
    store = fuse_captions(
        alt, visual, lm, os.path.join(args.out, "fused.jsonl"), batch_size=args.batch_size, **gen
    )
    row_of = {index: row for row, (index, _) in enumerate(rows)}
    shards_out = os.path.join(args.out, "shards")
    write_augmented_shards(args.shards, shards_out, lambda i: [store.get(row_of[i], 0) or alt[row_of[i]]])


def _caption_shards(args, captioner, n) -> list[str]:
    import webdataset as wds

    from ..data.datasets import decode_image
    from ..data.stream import expand_urls
    from .jobs import caption_images

    jpegs = (s["jpg"] for s in wds.tarfile_samples(iter({"url": u} for u in expand_urls(args.shards))))
    store = caption_images(jpegs, captioner, os.path.join(args.out, "visual.jsonl"), decode=decode_image)
    return [store.get(i, 0) or "" for i in range(n)]


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from .generate import LocalLM

    lm = LocalLM(args.model, device=args.device, dtype=args.dtype)
    gen = dict(
        seed=args.seed, temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens
    )
    (_rewrite if args.job == "rewrite" else _fuse)(args, lm, gen)
    print(f"done: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
