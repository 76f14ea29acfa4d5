"""Webdataset shards end to end: the caption-table -> shards tool (an unreadable image skipped and its
index kept reserved), the per-rank shard stream (disjoint shards per rank, resume by skipping equals
the uninterrupted stream with 0 and 2 workers), keyed augmentation, and the training loop on shards
with exact resume."""

import csv
import os

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from training_helpers import csv_rows, logged_losses

from training import train
from training.config import parse_args
from training.data.datasets import ImageTransform, SkipCorrupt
from training.data.make_shards import main as make_shards
from training.data.stream import ShardStream, count_samples

N, BAD = 24, 5  # images; the index of the unreadable one


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr_like")
    os.makedirs(root / "images")
    with open(root / "captions.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["image", "caption_index", "caption"])
        for i in range(N):
            name = f"{i:03d}.jpg"
            if i == BAD:
                (root / "images" / name).write_bytes(b"not a jpeg")
            else:
                color = (i * 10 % 256, 255 - i * 10 % 256, i * 37 % 256)
                Image.new("RGB", (40 + i, 32), color).save(root / "images" / name)
            w.writerow([name, 0, f"a picture number {i} in color {color[0]}"])
            w.writerow([name, 1, f"photo {i}"])
    out = root / "shards"
    assert make_shards(["--table", str(root / "captions.tsv"), "--images", str(root / "images"),
                        "--out", str(out), "--shard-size", "5"]) == 0  # fmt: skip
    return str(out / "shard-{000000..000004}.tar")


def _indices(stream, workers, batch=3):
    loader = DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=SkipCorrupt())
    return [b.indices.tolist() for _, b in zip(range(6), loader, strict=False)]


def test_make_shards_skips_the_unreadable_image_and_keeps_indices(shards):
    assert count_samples(shards) == N  # 1 + the largest index: the skipped index stays reserved
    stream = ShardStream(shards, batch_size=1)
    seen = [item[2] for _, item in zip(range(N - 1), stream, strict=False)]
    assert sorted(seen) == [i for i in range(N) if i != BAD]


def test_ranks_get_disjoint_shards_and_every_shard(shards):
    parts = [ShardStream(shards, rank=r, world_size=2, seed=3).rank_shards() for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and len(parts[0]) + len(parts[1]) == 5
    with pytest.raises(ValueError, match="cannot feed world_size=6"):
        ShardStream(shards, world_size=6, rank=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_by_skipping_equals_the_uninterrupted_stream(shards, workers):
    stream = ShardStream(shards, rank=1, world_size=2, seed=7, batch_size=3, transform=ImageTransform(16))
    stream.set_epoch(2)
    whole = _indices(stream, workers)
    stream.set_epoch(2, skip_batches=3)
    assert _indices(stream, workers)[:3] == whole[3:6]
    stream.set_epoch(3)
    assert _indices(stream, workers) != whole, "another epoch, another shard order"


def test_keyed_augmentation_is_a_function_of_seed_epoch_and_index():
    img = Image.new("RGB", (50, 40), (10, 200, 30))
    img.putpixel((3, 4), (255, 0, 0))
    t = ImageTransform(16, train=True, seed=1)
    first = [t(img, i) for i in range(4)]
    assert all(torch.equal(t(img, i), first[i]) for i in range(4))
    assert any(not torch.equal(first[0], other) for other in first[1:]), "indices draw different crops"
    t.set_epoch(1)
    assert any(not torch.equal(t(img, i), first[i]) for i in range(4)), "epochs draw different crops"


def test_training_on_shards_resumes_exactly(shards, tmp_path):
    args = ["--preset", "demo", "--data.kind", "shards", "--data.path", shards, "--data.num_samples", "none",
            "--data.num_workers", "2", "--train.batch_size", "6", "--train.max_steps", "7", "--log.every_steps", "1",
            "--eval.every_steps", "0", "--ckpt.every_steps", "0", "--optim.warmup_steps", "2", "--data.vocab_size", "64",
            "--data.caption_sampling", "laclip", "--eval.retrieval_split", "none", "--run.output_dir", str(tmp_path)]  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = parse_args([*args, "--run.name", "whole"])
        final = train.train(whole)
        tok = ["--data.tokenizer", os.path.join(whole.output_path, "tokenizer.json")]
        parts = parse_args([*args, *tok, "--run.name", "parts"])
        assert train.train(parts, stop_at=5)["interrupted"]  # mid-epoch 2 (4 steps per epoch)
        train.train(parse_args([*args, *tok, "--run.name", "parts", "--ckpt.resume", "latest"]))
    finally:
        torch.set_num_threads(threads)
    assert final["step"] == 7

    want = logged_losses(whole.output_path)
    assert logged_losses(parts.output_path) == want and len(want) == 7


@pytest.mark.parametrize("preset", ["cc3m-b16", "laion-b16"])
def test_paper_presets_run_at_tiny_size_on_shards(shards, tmp_path, preset):
    """The papers' recipes (CLIPA resize + truncate, FastCLIP-v3 hyper-parameters) with a tiny model."""
    cfg = parse_args(["--preset", preset, "--model.size", "tiny", "--data.image_size", "32", "--data.path", shards,
                      "--data.num_samples", "none", "--data.num_workers", "0", "--data.vocab_size", "64",
                      "--data.context_length", "24", "--clipa.image_resize", "16", "--train.batch_size", "6",
                      "--train.max_steps", "2", "--log.every_steps", "1", "--run.output_dir", str(tmp_path),
                      "--run.device", "cpu"])  # fmt: skip
    assert train.train(cfg)["step"] == 2
    assert [r["stage"] for r in csv_rows(os.path.join(cfg.output_path, "log.csv"))] == ["1", "1"]
