"""K ranks and bad data: with corrupt JPEGs planted in one rank's share, 2 gloo ranks keep full batches
(each corrupt row replaced by a spare of that rank), train on, never hang, count every replacement in
the log's ``skipped`` and resume exactly. Also the batch keys themselves (one process)."""

import os

import pytest
import torch
from dist_harness import run_ranks
from PIL import Image
from training_helpers import csv_rows, logged_losses, tiny_argv

from training import train
from training.config import parse_args
from training.data.batches import EpochBatches, TrainBatches
from training.data.datasets import CaptionFolderDataset
from training.data.sampler import GlobalIndexSampler

N, BATCH, SEED = 48, 16, 0  # 3 steps per epoch, 8 rows per rank


def _write_set(root) -> tuple[str, set[int]]:
    """A caption table + images; corrupt files at 3 rows of rank 1's share (2 in its first batch)."""
    os.makedirs(root / "images")
    gen = torch.Generator().manual_seed(1)
    share = GlobalIndexSampler(N, 2, 1, seed=SEED).indices(0)
    corrupt = {share[0], share[3], share[9]}
    lines = ["image\tcaption"]
    for i in range(N):
        name = f"im{i:03d}.jpg"
        if i in corrupt:
            (root / "images" / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        else:
            pixels = (torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / "images" / name, "JPEG")
        lines.append(f"{name}\ta {['red', 'blue', 'green'][i % 3]} picture number {i % 7}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")
    return str(root / "captions.tsv"), corrupt


def _argv(table, out, *extra):
    return [*tiny_argv(N), "--data.kind", "csv", "--data.path", table, "--data.image_size", "16",
            "--train.batch_size", str(BATCH), "--loss.mode", "rgcl", "--run.output_dir", str(out),
            "--train.max_steps", "6", "--eval.retrieval_split", "none", *extra]  # fmt: skip


def _rank(rank, world_size, argv, stop_at):
    return {"step": train.train(parse_args(argv), stop_at=stop_at)["step"]}


def _expected_skips(corrupt, steps_per_epoch=N // BATCH, epochs=2) -> int:
    rows = [
        GlobalIndexSampler(N, 2, r, seed=SEED).indices(e)[: steps_per_epoch * BATCH // 2]
        for e in range(epochs)
        for r in range(2)
    ]
    return sum(i in corrupt for share in rows for i in share)


def test_two_ranks_with_corrupt_images_stay_full_count_and_resume(tmp_path):
    table, corrupt = _write_set(tmp_path / "data")
    whole = run_ranks(_rank, 2, _argv(table, tmp_path, "--run.name", "whole"), None, timeout=300)
    assert [r["step"] for r in whole] == [6, 6]
    run_dir = tmp_path / "whole"
    rows = csv_rows(run_dir / "log.csv")
    assert sum(int(r["skipped"]) for r in rows) == _expected_skips(corrupt) >= 3
    tok = str(run_dir / "tokenizer.json")
    parts = _argv(table, tmp_path, "--run.name", "parts", "--data.tokenizer", tok)
    run_ranks(_rank, 2, parts, 4, timeout=300)  # mid-epoch 2
    run_ranks(_rank, 2, [*parts, "--ckpt.resume", "latest"], None, timeout=300)
    assert logged_losses(tmp_path / "parts") == logged_losses(run_dir), "resume must be exact"


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "decode"])
def test_batch_keys_replace_corrupt_rows_from_own_spares(tmp_path, cached):
    from training.data.batches import ImageCache
    from training.data.datasets import ImageTransform

    table, corrupt = _write_set(tmp_path / "data")
    ds = CaptionFolderDataset(table, tmp_path / "data" / "images")
    transform = ImageTransform(16, train=True, seed=SEED)
    data = TrainBatches(ds, transform, None, ImageCache(ds, 16) if cached else None)
    keys = [list(EpochBatches(GlobalIndexSampler(N, 2, r, seed=SEED), BATCH // 2)) for r in range(2)]
    for step in range(N // BATCH):
        batches = [data[keys[r][step]] for r in range(2)]
        got = [b.indices.tolist() for b in batches]
        assert all(len(g) == BATCH // 2 for g in got) and not set(got[0]) & set(got[1])
        assert not corrupt & set(got[0] + got[1])
        assert batches[1].skipped == len(corrupt & set(keys[1][step].indices)) and batches[0].skipped == 0
        again = data[keys[1][step]]  # a pure function of the key
        assert torch.equal(again.images, batches[1].images) and again.indices.tolist() == got[1]
