"""Image-text datasets without torchvision: a caption TSV/CSV + image folder, ImageFolder classes, tar shards.

Every caption dataset yields (image, captions, global index): `captions` is the list of texts of that image
(a caption chooser from `captions.py` turns it into one) and the global index addresses FastCLIP's per-sample
state. A missing or undecodable image makes `__getitem__` return None and increments `skipped`; the
`SkipCorrupt` collate drops those items and reports how many it dropped in `Batch.skipped`, so a run counts
them across worker processes and never crashes.

    >>> ds = CaptionFolderDataset("data/flickr8k/captions.tsv", "data/flickr8k/images",
    ...                           split_file="data/flickr8k/splits/train.txt",
    ...                           transform=ImageTransform(112, train=True))
    >>> loader = DataLoader(ds, batch_size=64, num_workers=2, collate_fn=SkipCorrupt())
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, IterableDataset

from .captions import uniform01

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# What PIL raises on a missing, truncated or unrecognized file (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError)


def decode_image(data: bytes | str | Path) -> Image.Image:
    """Decode an encoded image (bytes or a path) to an RGB PIL image, forcing the full decode now."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    img.load()
    return img.convert("RGB")


def pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] (or [B, 3, H, W]) -> float32 on its device, scaled to [0, 1] and normalized with CLIP
    mean/std."""
    shape, device = (3, 1, 1), image.device
    mean, std = (
        torch.tensor(CLIP_MEAN, device=device).view(shape),
        torch.tensor(CLIP_STD, device=device).view(shape),
    )
    return (image.float() / 255.0 - mean) / std


_AUGMENT_SALT = 0xA6A6


def apply_transform(transform, img, index: int):
    """``transform(img, index)`` for an ImageTransform (keyed augmentation), else ``transform(img)``."""
    return transform(img, index) if isinstance(transform, ImageTransform) else transform(img)


class ImageTransform:
    """PIL image -> normalized float tensor [3, size, size] (``uint8=True``: the uint8 image [3, size, size],
    normalized later, e.g. by the training step on the device).

    train=True: random resized crop (area fraction in `scale`, aspect ratio in `ratio`, log-uniform) and a
    horizontal flip with probability 1/2. Called with the sample's global `index`, the draw is a pure
    function of (seed, epoch, index), as the caption choice is: a resumed run, any number of workers
    and any number of ranks see the same crops (`set_epoch` before each epoch's loader). Without an
    index it draws from torch's global RNG. train=False: resize the short side to `size`, center crop.
    """

    def __init__(
        self,
        size: int,
        train: bool = False,
        scale=(0.5, 1.0),
        ratio=(3 / 4, 4 / 3),
        seed: int = 0,
        uint8=False,
    ):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.size, self.train, self.scale, self.ratio, self.uint8 = size, train, scale, ratio, bool(uint8)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _crop_box(self, w: int, h: int, gen) -> tuple[int, int, int, int]:
        for _ in range(10):
            area = w * h * float(torch.empty(1).uniform_(*self.scale, generator=gen))
            log_r = torch.empty(1).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]), generator=gen)
            aspect = math.exp(float(log_r))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                return x0, y0, x0 + cw, y0 + ch
        side = min(w, h)  # fallback: the central square
        return (w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2

    def generator(self, index: int, epoch: int | None = None) -> torch.Generator:
        """The augmentation stream of sample ``index`` in ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        key = int(uniform01(self.seed, int(epoch), int(index), _AUGMENT_SALT) * 2**53)
        return torch.Generator().manual_seed(key)

    def __call__(self, img: Image.Image, index: int | None = None) -> torch.Tensor:
        s = self.size
        if self.train:
            gen = None if index is None else self.generator(index)
            img = img.resize((s, s), Image.BICUBIC, box=self._crop_box(*img.size, gen))
            if torch.rand((), generator=gen) < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        else:
            img = ImageOps.fit(img, (s, s), Image.BICUBIC)  # central square crop, resized
        image = pil_to_uint8(img)
        return image if self.uint8 else normalize(image)


def _read_caption_table(tsv_path: str | Path) -> dict[str, list[str]]:
    """image name -> captions, in caption_index order when that column exists, in file order otherwise."""
    delimiter = "," if str(tsv_path).endswith(".csv") else "\t"
    rows: dict[str, list[tuple[int, str]]] = {}
    with open(tsv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else 0)
        missing = {"image", "caption"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{tsv_path}: the header must name columns {sorted(missing)}")
        for n, row in enumerate(reader):
            order = int(row["caption_index"]) if row.get("caption_index") else n
            rows.setdefault(row["image"], []).append((order, row["caption"].strip()))
    return {name: [c for _, c in sorted(caps)] for name, caps in rows.items()}


class _SkipsCorrupt(Dataset):
    skipped = 0  # corrupt or missing images met by this process

    def _decode(self, path: Path) -> Image.Image | None:
        try:
            return decode_image(path)
        except _DECODE_ERRORS:
            self.skipped += 1
            return None


class CaptionFolderDataset(_SkipsCorrupt):
    """Images in a folder, captions in a TSV/CSV (header: image, [caption_index,] caption), grouped by image.

    Args:
        tsv_path: the caption table (.csv comma-separated, anything else tab-separated).
        image_root: folder the `image` column is relative to.
        split_file: optional list of image names (one per line) to keep, in that order.
        transform: PIL image -> tensor; default uint8 [3, H, W] at the stored size.
        caption_choice: optional `choose(captions, index) -> str` (LaCLIP/VeCLIP) applied at load time.

    Returns per item: (image, captions list (or one str with caption_choice), global index), or None.
    """

    def __init__(self, tsv_path, image_root, split_file=None, transform=None, caption_choice=None):
        table = _read_caption_table(tsv_path)
        if split_file is not None:
            names = [n.strip() for n in Path(split_file).read_text().splitlines() if n.strip()]
            absent = [n for n in names if n not in table]
            if absent:
                raise ValueError(f"split_file {split_file}: {len(absent)} images lack captions: {absent[0]}")
        else:
            names = list(table)
        self.image_root = Path(image_root)
        self.names, self.captions = names, [table[n] for n in names]
        self.transform, self.caption_choice = transform or pil_to_uint8, caption_choice

    def __len__(self) -> int:
        return len(self.names)

    def raw(self, index: int) -> tuple[bytes, list[str]] | None:
        """The encoded image bytes (checked to decode) and all captions of item `index`, or None."""
        path = self.image_root / self.names[index]
        return None if self._decode(path) is None else (path.read_bytes(), self.captions[index])

    def __getitem__(self, index: int):
        img = self._decode(self.image_root / self.names[index])
        if img is None:
            return None
        captions = self.captions[index]
        if self.caption_choice is not None:
            captions = self.caption_choice(captions, index)
        return apply_transform(self.transform, img, index), captions, index


class ImageFolderClasses(_SkipsCorrupt):
    """ImageFolder layout `root/<class>/<image>` for zero-shot evaluation: (image, label, index) or None.

    `classes` are the sorted folder names; label k means `classes[k]`.
    """

    def __init__(self, root, transform: Callable | None = None):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root must be a folder of class folders, got {root}")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [
            (p, k)
            for k, c in enumerate(self.classes)
            for p in sorted((root / c).iterdir())
            if p.suffix.lower() in IMAGE_EXTENSIONS
        ]
        self.transform = transform or pil_to_uint8

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        img = self._decode(path)
        return None if img is None else (self.transform(img), label, index)


class Batch(NamedTuple):
    """A collated batch: images [B, 3, H, W]; targets (list of captions / texts, or int labels [B]);
    indices int64 [B] (global); skipped: items dropped as corrupt from this batch."""

    images: torch.Tensor
    targets: list | torch.Tensor
    indices: torch.Tensor
    skipped: int


class SkipCorrupt:
    """DataLoader collate_fn: drops None items (corrupt or missing images) and counts them.

    `Batch.skipped` carries the count out of worker processes; `self.skipped` sums it in this process
    (only meaningful with num_workers=0). An all-corrupt batch gives B = 0 tensors.
    """

    def __init__(self):
        self.skipped = 0

    def __call__(self, items: list) -> Batch:
        kept = [it for it in items if it is not None]
        dropped = len(items) - len(kept)
        self.skipped += dropped
        if not kept:
            return Batch(torch.empty(0, 3, 0, 0), [], torch.empty(0, dtype=torch.long), dropped)
        images, targets, indices = zip(*kept, strict=True)
        if all(isinstance(t, int) for t in targets):
            targets = torch.tensor(targets, dtype=torch.long)
        return Batch(torch.stack(images), list(targets) if isinstance(targets, tuple) else targets,
                     torch.tensor(indices, dtype=torch.long), dropped)  # fmt: skip


def _encoded_item(dataset: Dataset, i: int, quality: int) -> tuple[bytes, list[str], int] | None:
    if hasattr(dataset, "raw"):  # the original file bytes, no re-encode
        item = dataset.raw(i)
        return None if item is None else (item[0], list(item[1]), i)
    item = dataset[i]
    if item is None:
        return None
    image, captions, index = item
    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue(), [captions] if isinstance(captions, str) else list(captions), int(index)


def write_shards(dataset: Dataset, out_dir, shard_size: int = 1000, quality: int = 95) -> list[str]:
    """Write `dataset` as webdataset tar shards `out_dir/shard-000000.tar`, ...; returns their paths.

    Each sample: key = the global index (9 digits), `jpg` (the original bytes when the dataset has `raw()`,
    else the uint8 [3, H, W] image as JPEG, 4:4:4), `txt` (first caption), `json` {"captions", "index"}.
    Corrupt items are skipped (counted in the dataset's `skipped`).
    """
    import webdataset as wds

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    os.makedirs(out_dir, exist_ok=True)
    pattern = str(Path(out_dir) / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for item in map(lambda i: _encoded_item(dataset, i, quality), range(len(dataset))):
            if item is not None:
                data, captions, index = item
                meta = {"captions": captions, "index": index}
                sink.write({"__key__": f"{index:09d}", "jpg": data, "txt": captions[0], "json": meta})
        n_shards = sink.shard  # ShardWriter opens its first shard eagerly, so this counts every file
    return [pattern % k for k in range(n_shards)]


def sample_captions(sample: dict, default_index: int = -1) -> tuple[int, list[str]]:
    """(global index, captions) of a raw webdataset sample: its json {"captions", "index"}, else
    ([txt], ``default_index``)."""
    if "json" in sample:
        meta = json.loads(sample["json"])
        return int(meta.get("index", default_index)), list(meta["captions"])
    return default_index, [sample.get("txt", b"").decode("utf-8")]


class ShardDataset(IterableDataset):
    """Read shards from `write_shards` (or any jpg/txt[/json] webdataset): yields (image, captions, index).

    urls: a list of paths or a brace pattern ("shards/shard-{000000..000009}.tar"). Shards are split across
    DataLoader workers and, with `split_by_node=True`, across torch.distributed ranks. Samples without json
    get captions [txt] and index -1. Undecodable images are dropped and counted in `skipped` (per process).
    """

    def __init__(self, urls, transform: Callable | None = None, caption_choice=None, split_by_node=False):
        self.urls, self.transform, self.caption_choice = urls, transform or pil_to_uint8, caption_choice
        self.split_by_node = split_by_node
        self.skipped = 0

    def _decode(self, sample: dict):
        try:
            img = decode_image(sample["jpg"])
        except (KeyError, *_DECODE_ERRORS):
            self.skipped += 1
            return None
        index, captions = sample_captions(sample)
        if self.caption_choice is not None:
            captions = self.caption_choice(captions, index)
        return apply_transform(self.transform, img, index), captions, index

    def __iter__(self):
        import webdataset as wds

        split = wds.split_by_node if self.split_by_node else wds.single_node_only
        pipeline = wds.WebDataset(
            self.urls, shardshuffle=False, nodesplitter=split, handler=wds.warn_and_continue
        )
        yield from (item for item in map(self._decode, pipeline) if item is not None)
