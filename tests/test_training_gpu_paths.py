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
@pytest.mark.parametrize("mode", ["clip", "siglip", "gcl", "rgcl", "rgcl_g"])
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
    assert any(name.endswith(".lr") for name, _ in tensors) == (mode == "rgcl_g")  # the temperature group
    assert len(run.opt.state) > 0
    off = {name: t.device for name, t in tensors if t.device.type != "meta"}
    assert not off, off
