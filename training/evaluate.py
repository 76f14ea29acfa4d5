"""Evaluation of the reference training loop: zero-shot classification and image<->text retrieval.

Both take a loader of ``training.data.datasets.Batch`` (the ``SkipCorrupt`` collate): zero-shot with int
labels as targets, retrieval with the list of captions of each image as targets. uint8 images are
normalized with CLIP's mean/std; float images are used as they are. Both put the model in eval mode and
restore its previous mode. Scores are fp32 matmuls on every device, also inside a bf16 autocast.

    >>> zero_shot_accuracy(model, tok, loader, ds.classes, ds.templates, 16, "cpu")  # {'top1', 'top5', 'n'}
    >>> retrieval_recall(model, tok, loader, 16, "cpu")  # {'i2t_r1', ..., 't2i_r10', 'n_images', 'n_texts'}
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .data.datasets import normalize

__all__ = ["encode_texts", "fill_template", "recall_at", "retrieval_embeddings", "retrieval_recall", "scores",
           "zero_shot_accuracy"]  # fmt: skip

TEXT_CHUNK = 1024  # captions encoded per forward


@contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def fill_template(template, classname: str) -> str:
    """``"a photo of a {}."`` / ``"a photo of a {c}."`` / a callable -> the prompt for ``classname``."""
    if callable(template):
        return template(classname)
    if "{c}" in template:
        return template.replace("{c}", classname)
    if "{}" in template:
        return template.replace("{}", classname)
    return f"{template} {classname}"


def _images(images: torch.Tensor, device) -> torch.Tensor:
    if images.dtype == torch.uint8:
        images = normalize(images)
    return images.to(device, non_blocking=True)


def scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, M] fp32 similarities ``a @ b.T`` of a [N, E] and b [M, E], with autocast off: evaluation runs
    inside the training's bf16 autocast, whose matmul would round them to ~3 digits (ties, reordered top-k)."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float().T


def encode_texts(model, tokenizer, texts: Sequence[str], context_length: int, device) -> torch.Tensor:
    """[N, E] unit-norm fp32 text embeddings of ``texts``, encoded in chunks."""
    out = []
    for i in range(0, len(texts), TEXT_CHUNK):
        ids, lengths = tokenizer.encode_batch(list(texts[i : i + TEXT_CHUNK]), context_length)
        out.append(model.encode_text(ids.to(device), lengths).float())
    return torch.cat(out) if out else torch.empty(0, 0, device=device)


@torch.no_grad()
def zero_shot_accuracy(
    model, tokenizer, loader, classes: list[str], templates: list[str], context_length: int, device
) -> dict:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) of classifying by the nearest class embedding.

    A class embedding is the normalized mean over ``templates`` of the normalized prompt embeddings.
    Returns {"top1", "top5", "n"} (n: images scored); no "top5" with at most 5 classes."""
    if not classes or not templates:
        raise ValueError("zero-shot needs at least one class and one template")
    with _eval_mode(model):
        prompts = [fill_template(t, c) for c in classes for t in templates]
        emb = encode_texts(model, tokenizer, prompts, context_length, device)
        emb = emb.view(len(classes), len(templates), -1).mean(dim=1)
        class_emb = F.normalize(emb, dim=-1)  # [C, E]
        k5 = min(5, len(classes))
        top1 = top5 = n = 0
        for batch in loader:
            images, targets = batch[0], batch[1]
            if images.shape[0] == 0:
                continue
            feats = model.encode_image(_images(images, device)).float()
            pred = scores(feats, class_emb).topk(k5, dim=1).indices  # [B, k5]
            hit = pred == torch.as_tensor(targets, device=pred.device).view(-1, 1)
            top1 += int(hit[:, 0].sum())
            top5 += int(hit.any(dim=1).sum())
            n += images.shape[0]
    out = {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "n": n}
    if len(classes) <= 5:  # top-5 of at most 5 classes is always 1
        del out["top5"]
    return out


@torch.no_grad()
def retrieval_recall(model, tokenizer, loader, context_length: int, device, ks=(1, 5, 10), embeddings=None):
    """Image->text and text->image recall@k over the whole set the loader yields.

    Each image has one or more captions (``Batch.targets`` is a list of caption lists, or of single
    strings); image->text is a hit when any of the image's captions ranks in the top k, text->image
    when the caption's image does. k is capped at the number of candidates. Returns fractions
    {"i2t_r{k}", "t2i_r{k}" for k in ks, "n_images", "n_texts"}. A dict given as ``embeddings``
    receives {"image": [N_i, E], "text": [N_t, E], "owner": [N_t]} (on the CPU)."""
    img, txt, owner_t = retrieval_embeddings(model, tokenizer, loader, context_length, device)
    if embeddings is not None:
        embeddings.update(image=img.cpu(), text=txt.cpu(), owner=owner_t.cpu())
    return recall_at(img, txt, owner_t, ks)


def recall_at(img: torch.Tensor, txt: torch.Tensor, owner_t: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """Recall@k of unit-norm image [N_i, E] and text [N_t, E] embeddings; owner_t [N_t]: each text's image."""
    sims = scores(img, txt)  # [N_i, N_t]
    n_i, n_t = sims.shape
    i2t_top = sims.topk(min(max(ks), n_t), dim=1).indices  # [N_i, k]
    i2t_hit = owner_t[i2t_top] == torch.arange(n_i, device=img.device).view(-1, 1)
    t2i_top = sims.T.topk(min(max(ks), n_i), dim=1).indices  # [N_t, k]
    t2i_hit = t2i_top == owner_t.view(-1, 1)
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float(i2t_hit[:, :k].any(dim=1).float().mean())
        out[f"t2i_r{k}"] = float(t2i_hit[:, :k].any(dim=1).float().mean())
    return {**out, "n_images": n_i, "n_texts": n_t}


@torch.no_grad()
def retrieval_embeddings(model, tokenizer, loader, context_length: int, device):
    """(image [N_i, E], text [N_t, E] unit-norm fp32, owner [N_t]: the image of each caption)."""
    with _eval_mode(model):
        img_feats, texts, owner = [], [], []
        for batch in loader:
            images, targets = batch[0], batch[1]
            if images.shape[0] == 0:
                continue
            base = sum(f.shape[0] for f in img_feats)
            img_feats.append(model.encode_image(_images(images, device)).float())
            for j, caps in enumerate(targets):
                caps = [caps] if isinstance(caps, str) else list(caps)
                texts += caps
                owner += [base + j] * len(caps)
        if not img_feats or not texts:
            raise ValueError("retrieval needs at least one image with a caption")
        img = torch.cat(img_feats)  # [N_i, E]
        txt = encode_texts(model, tokenizer, texts, context_length, device)  # [N_t, E]
    return img, txt, torch.tensor(owner, device=img.device)
