"""Convert a caption table + image folder to webdataset shards for ``data.kind=shards``.

    python -m training.data.make_shards --table flickr8k/captions.tsv --images flickr8k/images \\
        --split flickr8k/splits/train.txt --out shards/flickr8k-train --shard-size 1000

The table is a TSV/CSV with ``image`` and ``caption`` columns (several rows per image give several
captions, as ``CaptionFolderDataset`` reads it). Each sample keeps the original image bytes and
stores all captions and its global index (0..N-1, the order of the split) in its json, which is the
index FastCLIP's per-sample state uses. Prints the shard pattern and the sample count to put in
``--data.path`` and ``--data.num_samples``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .datasets import CaptionFolderDataset, write_shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.data.make_shards", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--table", required=True, help="TSV/CSV with image and caption columns")
    p.add_argument("--images", required=True, help="folder the image names are relative to")
    p.add_argument("--split", default=None, help="optional file of image names to include, one per line")
    p.add_argument("--out", required=True, help="output folder for shard-000000.tar, ...")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = p.parse_args(argv)
    ds = CaptionFolderDataset(args.table, args.images, args.split)
    paths = write_shards(ds, args.out, shard_size=args.shard_size)
    count = len(ds) - ds.skipped
    last = len(paths) - 1
    print(f"{count} samples in {len(paths)} shards ({ds.skipped} unreadable images skipped)")
    print(f"--data.kind shards --data.path {os.path.join(args.out, f'shard-{{000000..{last:06d}}}.tar')} "
          f"--data.num_samples {len(ds)}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
