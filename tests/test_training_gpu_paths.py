"""Issue 17's GPU / NCCL defects, shown on CPU: the process-group timeout reaches ``dist.setup``,
evaluation scores in fp32 inside the training's autocast, DDP leaves the LLM2CLIP table alone,
a resume lands every optimizer / objective tensor on the run's device, and the step moves uint8
images before normalizing and resizing them on the device."""

import pytest
import torch

from training import train as train_mod
from training.config import parse_args


class _Stop(Exception):
    pass


def test_dist_timeout_minutes_reaches_dist_setup(monkeypatch):
    seen = {}

    def setup(device_kind, timeout_minutes=None):
        seen.update(kind=device_kind, timeout=timeout_minutes)
        raise _Stop

    monkeypatch.setattr(train_mod.dist, "setup", setup)
    cfg = parse_args(["--preset", "demo", "--dist.timeout_minutes", "42.5"])
    with pytest.raises(_Stop):
        train_mod.train(cfg)
    assert seen == {"kind": "cpu", "timeout": 42.5}
    assert parse_args(["--preset", "demo"]).dist_timeout_minutes == 30.0


# -- item 5: evaluation scores in fp32 inside the training's bf16 autocast -------------------------
class _RowTokenizer:
    """Text "<k>" -> ids [[k]]: the fake towers look row k up (no matmul, so autocast cannot touch it)."""

    def encode_batch(self, texts, context_length):
        return torch.tensor([[int(t)] for t in texts]), torch.ones(len(texts), dtype=torch.long)


class _LookupTowers(torch.nn.Module):
    def __init__(self, text_table):
        super().__init__()
        self.text_table = text_table

    def encode_image(self, images):  # the "images" are the unit-norm features themselves
        return images

    def encode_text(self, ids, lengths):
        return self.text_table[ids[:, 0]]


def _near_ties(n: int, dim: int = 32, spread: float = 0.1, noise: float = 0.01):
    """Image features around one center, each caption close to its image: similarities all ~0.999, so
    bf16 (3 digits) ties and reorders them (R@1 1.0 in fp32, ~0.8 in bf16)."""
    g = torch.Generator().manual_seed(0)
    center = torch.randn(dim, generator=g)
    base = torch.nn.functional.normalize(center + spread * torch.randn(n, dim, generator=g), dim=-1)
    near = torch.nn.functional.normalize(base + noise * torch.randn(n, dim, generator=g), dim=-1)
    return base, near


def test_evaluation_inside_bf16_autocast_scores_in_fp32():
    from training.data.datasets import Batch
    from training.evaluate import recall_at, retrieval_recall, scores, zero_shot_accuracy

    img, txt = _near_ties(256)
    owner = torch.arange(256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = scores(img, txt)
        recall_inside = recall_at(img, txt, owner)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, img @ txt.T, rtol=0, atol=1e-6)
    assert recall_inside == recall_at(img, txt, owner)

    tok, model = _RowTokenizer(), _LookupTowers(txt)
    loader = [Batch(img[i : i + 64], [str(k) for k in range(i, i + 64)], owner[i : i + 64], 0)
              for i in range(0, 256, 64)]  # fmt: skip
    classes = [str(k) for k in range(256)]
    labels = [Batch(b.images, b.indices, b.indices, 0) for b in loader]
    fp32 = (
        retrieval_recall(model, tok, loader, 1, "cpu"),
        zero_shot_accuracy(model, tok, labels, classes, ["{}"], 1, "cpu"),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = (
            retrieval_recall(model, tok, loader, 1, "cpu"),
            zero_shot_accuracy(model, tok, labels, classes, ["{}"], 1, "cpu"),
        )
    assert bf16 == fp32


# -- item 4: DDP leaves LLM2CLIP's constant embedding table alone ----------------------------------
def test_ddp_does_not_sync_the_adapter_table():
    import torch.distributed as tdist

    from training import dist
    from training.model import build_model

    cfg = parse_args(["--preset", "demo", "--model.text_tower", "adapter", "--data.text_embeddings", "x.pt"])
    table = torch.randn(10, 8)
    model = build_model(cfg, 10, table)
    model.register_buffer("step_count", torch.zeros(()))  # an ordinary buffer: still synced
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        net = dist.ddp(model, torch.device("cpu"))
        synced = set(net.named_module_buffers)
        assert "text.table" in dict(model.named_buffers())
        assert "text.table" not in synced and "step_count" in synced, synced
        assert not any(b is model.text.table for b in net.modules_buffers)
    finally:
        del net
        tdist.destroy_process_group()


# -- item 1: a resume puts every optimizer / objective tensor on the run's device --------------------
def _tensors(tree, path=""):
    if isinstance(tree, torch.Tensor):
        yield path, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{path}.{k}")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{path}[{i}]")


@pytest.mark.parametrize("optim", ["adamw", "lamb"])
@pytest.mark.parametrize("mode", ["clip", "siglip", "gcl", "gcl_g", "rgcl", "rgcl_g"])
def test_resume_lands_optimizer_and_objective_state_on_the_run_device(tmp_path, mode, optim):
    """A run saves on the CPU (as checkpoint.load maps a GPU run's file); the same run resumed on another
    device (``meta`` stands in for cuda) must hold no optimizer / objective tensor anywhere else."""
    from training import dist

    argv = ["--preset", "demo", "--run.output_dir", str(tmp_path), "--loss.mode", mode, "--optim.name", optim,
            "--data.num_samples", "64", "--train.batch_size", "16", "--data.num_workers", "0",
            "--eval.every_steps", "0", "--log.progress_bar", "false"]  # fmt: skip
    assert train_mod.train(parse_args(argv), stop_at=1)["interrupted"]
    run = train_mod.Run(
        parse_args([*argv, "--ckpt.resume", "latest"]), dist.Ranks(device=torch.device("meta"))
    )
    run.resume(str(tmp_path / "demo" / "latest.pt"))
    assert run.step == 1
    opt_state = {"state": list(run.opt.state.values()), "groups": run.opt.param_groups}
    tensors = [*_tensors(opt_state, "optimizer"), *_tensors(run.objective.state_dict(), "objective")]
    own_tau_group = mode in ("rgcl_g", "gcl_g")  # the temperature's group holds a tensor LR
    assert any(name.endswith(".lr") for name, _ in tensors) == own_tau_group
    assert len(run.opt.state) > 0
    off = {name: t.device for name, t in tensors if t.device.type != "meta"}
    assert not off, off


# -- item 8: uint8 images to the device, normalized and resized there; no per-step host read ---------
class _Reached(Exception):
    pass


class _NoLR:
    def set_lr(self, *args):
        pass


def test_step_moves_uint8_then_normalizes_and_resizes_on_the_device(monkeypatch):
    from fastclip_kernels import tokens
    from training import dist
    from training import step as step_mod
    from training.data.datasets import Batch
    from training.tokenizer import CaptionTokenizer

    moved, resized, seen = [], [], {}
    to_device, resize = step_mod.to_device, tokens.resize_images

    def record_move(images, *args):
        moved.append((images.dtype, images.device.type))
        return to_device(images, *args)

    def record_resize(images, size):
        resized.append((images.dtype, images.device.type))
        return resize(images, size)

    def towers(images, ids, lengths, keep_idx):
        seen.update(images=images)
        raise _Reached

    monkeypatch.setattr(step_mod, "to_device", record_move)
    monkeypatch.setattr(tokens, "resize_images", record_resize)
    cfg = parse_args(["--preset", "demo", "--clipa.image_strategy", "resize", "--clipa.image_resize", "32"])
    tok = CaptionTokenizer.train(["a red circle", "two blue squares"], vocab_size=40, min_frequency=1)
    meta = torch.device("meta")
    train_step = step_mod.TrainStep(cfg, tok, towers, None, _NoLR(), None, dist.Ranks(device=meta), meta)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    with pytest.raises(_Reached):
        train_step(
            Batch(images, ["a red circle"] * 4, torch.arange(4), 0), step=0, stage=1, lr=1e-3, total_steps=9
        )
    assert moved == [(torch.uint8, "cpu")]  # the host-to-device copy carries uint8
    assert resized == [(torch.float32, "meta")]  # normalized, then resized after the copy
    assert seen["images"].device == meta and seen["images"].shape == (4, 3, 32, 32)


def test_uint8_pipeline_normalizes_to_the_old_fp32_batch():
    """What the step makes of the new uint8 batches (``device_images``) equals the fp32 batches the data
    used to produce (augmented cache, PIL transform), resize included."""
    from types import SimpleNamespace

    from PIL import Image

    from fastclip_kernels.tokens import resize_images
    from training.data.batches import BatchKey, TrainBatches
    from training.data.datasets import ImageTransform, normalize
    from training.step import device_images

    cfg = parse_args(["--preset", "demo", "--clipa.image_strategy", "resize", "--clipa.image_resize", "8"])
    gen = torch.Generator().manual_seed(0)
    cached = torch.randint(0, 256, (6, 3, 24, 24), dtype=torch.uint8, generator=gen)
    cache = SimpleNamespace(images=cached, ok=torch.ones(6, dtype=torch.bool))
    ds = SimpleNamespace(captions=[[f"caption {i}"] for i in range(6)])
    key = BatchKey(2, [4, 1, 3], [0])
    old = TrainBatches(ds, ImageTransform(16, train=True, seed=3), None, cache)[key].images
    new = TrainBatches(ds, ImageTransform(16, train=True, seed=3, uint8=True), None, cache)[key].images
    assert old.dtype == torch.float32 and new.dtype == torch.uint8
    torch.testing.assert_close(device_images(cfg, new, stage=2), old, rtol=0, atol=1e-6)
    torch.testing.assert_close(device_images(cfg, new, stage=1), resize_images(old, 8), rtol=0, atol=1e-6)
    pil = Image.fromarray(cached[0].permute(1, 2, 0).numpy())
    for train in (True, False):
        fp32 = ImageTransform(16, train=train, seed=1)(pil, 5)
        u8 = ImageTransform(16, train=train, seed=1, uint8=True)(pil, 5)
        assert u8.dtype == torch.uint8
        torch.testing.assert_close(normalize(u8), fp32, rtol=0, atol=0)


class _CountedLoss:
    """Stands in for the step's mean loss; counts the host reads."""

    reads = 0

    def __init__(self, value):
        self.value = value

    def item(self):
        _CountedLoss.reads += 1
        return float(self.value)


def test_progress_bar_reads_the_loss_only_at_logging_steps(tmp_path, monkeypatch):
    import sys

    from training.step import TrainStep

    call = TrainStep.__call__

    def counted(self, *args, **kw):
        loss, flops = call(self, *args, **kw)
        return _CountedLoss(loss), flops

    monkeypatch.setattr(TrainStep, "__call__", counted)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the bar is on, as on a terminal
    _CountedLoss.reads = 0
    cfg = parse_args(["--preset", "demo", "--run.output_dir", str(tmp_path), "--data.num_samples", "96",
                      "--train.batch_size", "16", "--data.num_workers", "0", "--eval.every_steps", "0",
                      "--train.max_steps", "6", "--log.every_steps", "3", "--loss.mode", "clip"])  # fmt: skip
    monitor_bars = []
    from training import monitor

    init = monitor.Monitor.__init__

    def spy(self, *args, **kw):
        init(self, *args, **kw)
        monitor_bars.append(self.bar)

    monkeypatch.setattr(monitor.Monitor, "__init__", spy)
    train_mod.train(cfg)
    assert monitor_bars and monitor_bars[0] is not None
    assert _CountedLoss.reads == 2  # steps 3 and 6, for their log rows; none per step
