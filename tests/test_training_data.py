"""Training data: synthetic scenes, Flickr8k/ImageFolder datasets, corrupt-image skipping, shards, caption
choice (LaCLIP/VeCLIP) and the global-index sampler with mid-epoch resume."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training.config import ConfigError, data_home
from training.data import (
    CaptionFolderDataset,
    GlobalIndexSampler,
    ImageFolderClasses,
    ImageTransform,
    LaCLIPSampler,
    ShardDataset,
    SkipCorrupt,
    SyntheticScenes,
    SyntheticZeroShot,
    VeCLIPMixer,
    WithCaptionChoice,
    write_shards,
)
from training.data.captions import alt_and_enriched, alt_text
from training.data.synthetic import COLORS, SHAPES

DATA = Path(data_home())
FLICKR = DATA / "flickr8k"
CIFAR = DATA / "cifar10_test"


# ---- synthetic scenes ----


def test_synthetic_deterministic_and_seeded():
    a, b, c = (
        SyntheticScenes(20, 32, seed=3),
        SyntheticScenes(20, 32, seed=3),
        SyntheticScenes(20, 32, seed=4),
    )
    for i in (0, 7, 19):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] and a[i][2] == i
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(20))
    image, captions, _ = a[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    assert 3 <= len(captions) <= 5 and len(set(captions)) == len(captions)


def test_synthetic_captions_match_drawn_scene():
    ds = SyntheticScenes(200, 32, seed=0)
    counts = set()
    for i in range(200):
        image, captions, _ = ds[i]
        objects = ds.scene(i)
        counts.add(len(objects))
        pixels = image.permute(1, 2, 0).reshape(-1, 3)
        for o in objects:
            assert o["color"] in captions[0] and o["shape"] in captions[0] and o["size"] in captions[0]
            drawn = (pixels == torch.tensor(COLORS[o["color"]], dtype=torch.uint8)).all(1).sum()
            assert drawn >= 4, (i, o)
        if len(objects) == 2:
            assert any(rel in captions[0] for rel in ("to the left of", "above"))
    assert counts == {1, 2}


def test_synthetic_zero_shot_labels():
    zs = SyntheticZeroShot(400, 32, seed=1, task="shape")
    labels = torch.tensor([zs[i][1] for i in range(len(zs))])
    assert zs.classes == list(SHAPES) and len(zs.prompts()) == 4
    assert all(c in p for c, ps in zip(zs.classes, zs.prompts(), strict=True) for p in ps)
    assert torch.bincount(labels, minlength=4).min() > 50  # every class present, roughly balanced
    for i in range(10):
        assert zs.classes[zs[i][1]] == zs.scenes.scene(i)[0]["shape"]
    assert SyntheticZeroShot(10, task="color").classes == list(COLORS)
    with pytest.raises(ValueError, match="task"):
        SyntheticZeroShot(10, task="texture")


# ---- real data ----


@pytest.mark.skipif(not FLICKR.is_dir(), reason=f"Flickr8k not found at {FLICKR} (set FASTCLIP_DATA)")
def test_flickr8k_subset(tmp_path):
    names = (FLICKR / "splits" / "test.txt").read_text().split()[:20]
    split = tmp_path / "test20.txt"
    split.write_text("\n".join(names))
    ds = CaptionFolderDataset(FLICKR / "captions.tsv", FLICKR / "images", split, transform=ImageTransform(64))
    assert len(ds) == 20 and ds.names == names
    loader = DataLoader(ds, batch_size=8, collate_fn=SkipCorrupt())
    batch = next(iter(loader))
    assert batch.images.shape == (8, 3, 64, 64) and batch.images.dtype == torch.float32
    assert batch.indices.tolist() == list(range(8)) and batch.skipped == 0
    assert all(len(c) == 5 for c in batch.targets) and ds.skipped == 0
    raw = CaptionFolderDataset(FLICKR / "captions.tsv", FLICKR / "images", split)
    assert raw[0][0].shape == (3, 112, 112) and raw[0][0].dtype == torch.uint8
    train = ImageTransform(48, train=True)
    assert train(Image.open(FLICKR / "images" / names[0]).convert("RGB")).shape == (3, 48, 48)


@pytest.mark.skipif(not CIFAR.is_dir(), reason=f"cifar10_test not found at {CIFAR} (set FASTCLIP_DATA)")
def test_cifar10_image_folder():
    ds = ImageFolderClasses(CIFAR, transform=ImageTransform(32))
    assert ds.classes[0] == "airplane" and len(ds.classes) == 10
    image, label, index = ds[len(ds) - 1]
    assert image.shape == (3, 32, 32) and ds.classes[label] == "truck" and index == len(ds) - 1


# ---- corrupt images, shards ----


def _tiny_folder(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    Image.new("RGB", (20, 16), (200, 10, 10)).save(tmp_path / "img" / "good.jpg")
    (tmp_path / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
    rows = ["image\tcaption_index\tcaption", "good.jpg\t1\ta red card", "good.jpg\t0\ta red rectangle"]
    rows += ["broken.jpg\t0\ta broken file", "missing.jpg\t0\ta missing file"]
    (tmp_path / "caps.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_corrupt_and_missing_images_skipped_and_counted(tmp_path):
    root = _tiny_folder(tmp_path)
    ds = CaptionFolderDataset(root / "caps.tsv", root / "img")
    assert ds.names == ["good.jpg", "broken.jpg", "missing.jpg"]
    assert ds.captions[0] == ["a red rectangle", "a red card"]  # caption_index order
    collate = SkipCorrupt()
    batches = list(DataLoader(ds, batch_size=3, collate_fn=collate))
    assert len(batches) == 1 and batches[0].images.shape == (1, 3, 16, 20)
    assert batches[0].skipped == 2 and collate.skipped == 2 and ds.skipped == 2
    assert batches[0].indices.tolist() == [0]


def test_shards_round_trip_synthetic(tmp_path):
    ds = SyntheticScenes(25, 32, seed=0)
    urls = write_shards(ds, tmp_path / "shards", shard_size=10)
    assert len(urls) == 3 and all(Path(u).is_file() for u in urls)
    back = list(ShardDataset(urls))
    assert [b[2] for b in back] == list(range(25))
    for image, captions, index in back:
        ref_image, ref_captions, _ = ds[index]
        assert captions == ref_captions
        # JPEG (quality 95) keeps the scene, not the per-pixel background noise: compare 4x4-pooled images.
        pooled = [torch.nn.functional.avg_pool2d(x.float(), 4) for x in (image, ref_image)]
        assert image.shape == ref_image.shape and (pooled[0] - pooled[1]).abs().max() < 12
    with_choice = next(iter(ShardDataset(urls, caption_choice=LaCLIPSampler(0))))
    assert isinstance(with_choice[1], str) and with_choice[1] in ds[0][1]


def test_shards_round_trip_caption_folder_exact(tmp_path):
    root = _tiny_folder(tmp_path)
    ds = CaptionFolderDataset(root / "caps.tsv", root / "img")
    urls = write_shards(ds, tmp_path / "shards", shard_size=100)
    back = list(ShardDataset(urls))
    assert ds.skipped == 2 and len(back) == 1
    image, captions, index = back[0]
    assert index == 0 and captions == ds.captions[0] and torch.equal(image, ds[0][0])


# ---- caption choice ----


def test_laclip_uniform_and_fallback():
    caps = ["the original caption", "rewrite one here", "rewrite two here", "rewrite three", "rewrite four"]
    choose, n = LaCLIPSampler(seed=0), 20000
    picks = [choose(caps, i) for i in range(n)]
    for c in caps:
        assert abs(picks.count(c) / n - 0.2) < 0.02
    short = ["a dog on grass", "dog", "a running dog"]
    picks = [choose(short, i) for i in range(6000)]
    assert "dog" not in picks and abs(picks.count(short[0]) / 6000 - 2 / 3) < 0.03
    again = LaCLIPSampler(seed=0)
    assert [again(caps, i) for i in range(100)] == [choose(caps, i) for i in range(100)]
    choose.set_epoch(1)
    assert [choose(caps, i) for i in range(100)] != [again(caps, i) for i in range(100)]
    assert [choose(caps, i) for i in range(100)] == [again(caps, i, epoch=1) for i in range(100)]


def test_veclip_mixing_probability():
    mix, n = VeCLIPMixer(p=0.3, seed=1), 20000
    enriched = sum(mix(["alt", "an enriched caption"], i) == "an enriched caption" for i in range(n))
    assert abs(enriched / n - 0.3) < 0.02
    assert all(mix(["alt", ""], i) == "alt" for i in range(200))
    assert all(VeCLIPMixer(p=1.0)(["alt", "rich"], i) == "rich" for i in range(200))
    with pytest.raises(ValueError, match="p must"):
        VeCLIPMixer(p=1.5)


def test_alt_text_and_the_veclip_pair():
    assert alt_text("A dog is running on the grass .") == "dog running grass"
    assert alt_text("The.") == "The."  # nothing left: the caption itself
    caps = ["A black dog runs through the tall green grass .", "A dog runs .", "Dog in a field ."]
    assert alt_and_enriched(caps) == ["dog runs", caps[0]]  # shortest: first of the 3-word ties
    with pytest.raises(ValueError, match="captions must"):
        alt_and_enriched([])


@pytest.mark.skipif(not FLICKR.is_dir(), reason=f"Flickr8k not found at {FLICKR} (set FASTCLIP_DATA)")
def test_alt_enriched_view_of_flickr8k_training_captions():
    """Training items carry [alt-text, longest caption]; the tokenizer trains on those; test keeps 5."""
    from training.config import parse_args
    from training.data.sources import train_dataset

    cfg = parse_args(["--preset", "flickr8k", "--data.train_captions", "alt-enriched"])
    ds, captions = train_dataset(cfg)
    plain, _ = train_dataset(parse_args(["--preset", "flickr8k"]))
    assert len(ds) == len(plain) and len(captions) == 2 * len(ds)
    for i in (0, 17, len(ds) - 1):
        alt, enriched = ds.captions[i]
        assert enriched == max(plain.captions[i], key=lambda c: len(c.split()))
        assert alt == alt_text(min(plain.captions[i], key=lambda c: len(c.split())))
        assert len(alt.split()) < len(enriched.split())
    with pytest.raises(ConfigError, match="data_train_captions"):
        parse_args(["--preset", "demo", "--data.train_captions", "alt-enriched"])


def test_caption_choice_in_dataset():
    ds = WithCaptionChoice(SyntheticScenes(50, 32, seed=0), LaCLIPSampler(seed=2))
    for i in range(50):
        image, text, index = ds[i]
        assert index == i and text in ds.dataset[i][1]


# ---- sampler ----


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_ranks_disjoint_and_covering(drop_last):
    n, world = 103, 4
    shares = [list(GlobalIndexSampler(n, world, r, seed=5, drop_last=drop_last)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    flat = [i for s in shares for i in s]
    if drop_last:
        assert len(flat) == len(set(flat)) == 100 and len(shares[0]) == 25
    else:
        assert set(flat) == set(range(n)) and len(flat) == 104


def test_sampler_deterministic_per_epoch():
    a, b = GlobalIndexSampler(50, 2, 1, seed=7), GlobalIndexSampler(50, 2, 1, seed=7)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    assert list(a) != e0 and sorted(a) != sorted(list(GlobalIndexSampler(50, 2, 0, seed=7)))
    assert list(GlobalIndexSampler(10, shuffle=False)) == list(range(10))
    with pytest.raises(ValueError, match="rank"):
        GlobalIndexSampler(10, world_size=2, rank=2)


def test_sampler_resume_mid_epoch():
    full = GlobalIndexSampler(101, 3, 2, seed=11)
    full.set_epoch(4)
    expected = list(full)
    run = GlobalIndexSampler(101, 3, 2, seed=11)
    run.set_epoch(4)
    it = iter(run)
    seen = [next(it) for _ in range(13)]
    state = run.state_dict()
    assert state["position"] == 13 and run.state_dict(consumed=10)["position"] == 10
    resumed = GlobalIndexSampler(101, 3, 2, seed=11)
    resumed.load_state_dict(state)
    assert len(resumed) == len(expected) - 13
    assert seen + list(resumed) == expected
    resumed.set_epoch(5)
    assert len(list(resumed)) == len(expected)  # later epochs are whole again
