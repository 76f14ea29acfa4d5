"""training.model (CLIP, build_model, param_groups) and training.evaluate (zero-shot, retrieval)."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("tokenizers")

from training.config import get_preset  # noqa: E402
from training.data.datasets import Batch, SkipCorrupt  # noqa: E402
from training.data.synthetic import SyntheticScenes, SyntheticZeroShot  # noqa: E402
from training.evaluate import fill_template, retrieval_recall, zero_shot_accuracy  # noqa: E402
from training.model import CLIP, build_model, param_groups  # noqa: E402
from training.tokenizer import CaptionTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def cfg():
    return get_preset("demo")


@pytest.fixture(scope="module")
def tok():
    ds = SyntheticScenes(200, image_size=16, seed=3)
    caps = [c for i in range(len(ds)) for c in ds[i][1]]
    caps += [t.format(c) for zs in ("shape", "color") for c in SyntheticZeroShot(1, task=zs).classes
             for t in SyntheticZeroShot(1, task=zs).templates]  # fmt: skip
    return CaptionTokenizer.train(caps, vocab_size=256)


def test_build_model_encodes_unit_vectors(cfg, tok):
    torch.manual_seed(0)
    model = build_model(cfg, tok.vocab_size)
    assert isinstance(model, CLIP)
    E, S, L = cfg.model_dims()["output_dim"], cfg.data_image_size, cfg.data_context_length
    assert math.isclose(1 / float(model.logit_scale().detach()), cfg.loss_temperature, rel_tol=1e-5)
    assert model.logit_bias is None
    ids, lengths = tok.encode_batch(["a red circle", "two shapes: a cross and a square"], L)
    img, txt = model(torch.randn(2, 3, S, S), ids, lengths)
    assert img.shape == (2, E) and txt.shape == (2, E)
    assert img.dtype == txt.dtype == torch.float32
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    assert model.encode_image(torch.randn(3, 3, S, S), keep_idx=torch.tensor([[0, 1]] * 3)).shape == (3, E)


def test_build_model_siglip(cfg):
    model = build_model(dataclasses.replace(cfg, loss_mode="siglip"), 256)
    assert math.isclose(float(model.temperature.theta.detach()), math.log(10), rel_tol=1e-6)
    assert float(model.logit_bias.detach()) == -10.0


@pytest.mark.parametrize("lr_tau", [None, 2e-4])
@pytest.mark.parametrize("mode", ["rgcl_g", "siglip"])
def test_param_groups_partition(cfg, lr_tau, mode):
    model = build_model(dataclasses.replace(cfg, loss_mode=mode), 256)
    groups = param_groups(model, 0.1, lr_tau=lr_tau)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}
    decay = next(g for g in groups if g["weight_decay"] == 0.1)["params"]
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(p.ndim >= 2 for p in decay)
    assert all(id(p) in no_decay for p in model.parameters() if p.ndim < 2)
    for name in ("text.token_embedding.weight", "text.positional_embedding", "visual.class_embedding"):
        assert id(model.get_parameter(name)) in no_decay
    assert id(model.visual.conv1.weight) in {id(p) for p in decay}
    tau_groups = [g for g in groups if "fastclip_lr_tau" in g]
    if lr_tau is None:
        assert not tau_groups and id(model.temperature.theta) in no_decay
    else:
        assert len(tau_groups) == 1 and tau_groups[0]["params"] == [model.temperature.theta]


# -- stubs: "token" 0 of a text is the class / image index it names, pixel [0, 0, 0] the image's label --
class StubTokenizer:
    def encode_batch(self, texts, context_length):
        ids = torch.zeros(len(texts), context_length, dtype=torch.long)
        ids[:, 0] = torch.tensor([int(t.split("#")[1]) for t in texts])
        return ids, torch.ones(len(texts), dtype=torch.long)


class StubModel(nn.Module):
    def __init__(self, dim, image_map=None, random_images=False):
        super().__init__()
        self.dim, self.image_map, self.random_images = dim, image_map, random_images
        self.lin = nn.Linear(1, 1)

    def encode_text(self, ids, lengths):
        return F.one_hot(ids[:, 0], self.dim).float()

    def encode_image(self, images):
        assert not self.training
        if self.random_images:
            return F.normalize(torch.randn(images.shape[0], self.dim), dim=-1)
        label = images[:, 0, 0, 0].long()
        return F.one_hot(self.image_map[label] if self.image_map is not None else label, self.dim).float()


def _labelled_batches(labels, bs=50):
    out = []
    for i in range(0, len(labels), bs):
        y = labels[i : i + bs]
        images = torch.zeros(len(y), 3, 2, 2)
        images[:, 0, 0, 0] = y.float()
        out.append(Batch(images, y, torch.arange(i, i + len(y)), 0))
    return out


def test_zero_shot_perfect_and_chance():
    C = 10
    classes, templates = [f"#{c}#" for c in range(C)], ["a {}", "the {c}."]
    labels = torch.randint(0, C, (2000,))
    loader = _labelled_batches(labels) + [Batch(torch.empty(0, 3, 0, 0), [], torch.empty(0), 2)]
    model = StubModel(C).train()
    res = zero_shot_accuracy(model, StubTokenizer(), loader, classes, templates, 4, "cpu")
    assert res == {"top1": 1.0, "top5": 1.0, "n": 2000}
    assert model.training  # mode restored
    res = zero_shot_accuracy(
        StubModel(C, random_images=True), StubTokenizer(), loader, classes, templates, 4, "cpu"
    )
    assert 0.06 < res["top1"] < 0.14 and 0.44 < res["top5"] < 0.56
    three = zero_shot_accuracy(
        StubModel(3), StubTokenizer(), _labelled_batches(labels % 3), classes[:3], templates, 4, "cpu"
    )
    assert "top5" not in three and three["n"] == 2000  # top-5 of at most 5 classes is meaningless


def test_fill_template():
    assert fill_template("a photo of a {}.", "dog") == "a photo of a dog."
    assert fill_template("a {c} here", "dog") == "a dog here"
    assert fill_template(lambda c: f"itap of a {c}.", "dog") == "itap of a dog."


def _caption_batches(n, per_image=2, bs=4):
    out = []
    for i in range(0, n, bs):
        idx = torch.arange(i, min(i + bs, n))
        images = torch.zeros(len(idx), 3, 2, 2)
        images[:, 0, 0, 0] = idx.float()
        caps = [[f"caption {j} of #{int(k)}#" for j in range(per_image)] for k in idx]
        out.append(Batch(images, caps, idx, 0))
    return out


def test_retrieval_perfect_and_permuted():
    n = 10
    loader = _caption_batches(n)
    res = retrieval_recall(StubModel(n), StubTokenizer(), loader, 4, "cpu")
    assert res["n_images"] == n and res["n_texts"] == 2 * n
    assert all(res[f"{d}_r{k}"] == 1.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
    perm = torch.tensor([0, 1, 2, 3, 4, 5, 7, 6, 9, 8])  # images 6..9 look like their neighbour
    res = retrieval_recall(StubModel(n, image_map=perm), StubTokenizer(), loader, 4, "cpu")
    assert res["i2t_r1"] == pytest.approx(0.6) and res["t2i_r1"] == pytest.approx(0.6)
    assert res["t2i_r10"] == 1.0  # all 10 images are candidates


def test_real_model_zero_shot_and_retrieval(cfg, tok):
    torch.manual_seed(0)
    S, L = cfg.data_image_size, cfg.data_context_length
    model = build_model(cfg, tok.vocab_size)
    zs = SyntheticZeroShot(24, image_size=S, seed=1)
    loader = torch.utils.data.DataLoader(zs, batch_size=16, collate_fn=SkipCorrupt())
    res = zero_shot_accuracy(model, tok, loader, zs.classes, list(zs.templates), L, "cpu")
    assert res["n"] == 24 and 0.0 <= res["top1"] <= 1.0
    assert "top5" not in res  # 4 classes
    scenes = SyntheticScenes(12, image_size=S, seed=2)
    loader = torch.utils.data.DataLoader(scenes, batch_size=8, collate_fn=SkipCorrupt())
    res = retrieval_recall(model, tok, loader, L, "cpu")
    assert res["n_images"] == 12 and res["n_texts"] >= 3 * 12
    assert all(
        0.0 <= res[f"{d}_r{k}"] <= 1.0 and math.isfinite(res[f"{d}_r{k}"])
        for d in ("i2t", "t2i")
        for k in (1, 5, 10)
    )
    assert res["i2t_r1"] <= res["i2t_r5"] <= res["i2t_r10"]
