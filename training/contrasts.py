"""The statistics of ``training.experiments``: a paper's claim as a contrast of arm scores, the per-image
retrieval hits every score is computed from, the paired bootstrap over test images, and the verdict.

Score of a run: the mean of the six retrieval recalls (R@1/5/10, image->text and text->image). A
contrast is > 0 when its claim holds; its interval resamples test images with replacement (each image's
captions follow it; ranks stay those of the full gallery), the same resamples for every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Contrast", "bootstrap_weights", "contrast_interval", "difference", "gap_growth", "per_image_score",
           "share_gap", "verdict", "weighted_score"]  # fmt: skip

KS = (1, 5, 10)
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Contrast:
    """A claim as a function of the arms' scores: ``value({arm: score [R]}) -> [R]``, > 0 when it holds."""

    name: str
    claim: str
    arms: tuple[str, ...]
    value: Callable[[dict], torch.Tensor]
    unit: str = "pp"  # what 0.01 of ``value`` reads as: points of mean recall, or of a share


def difference(a: str, b: str, claim: str = "") -> Contrast:
    """``score(a) - score(b)``: the claim that arm ``a`` beats arm ``b``."""
    return Contrast(f"{a} - {b}", claim or f"{a} > {b}", (a, b), lambda s: s[a] - s[b])


def gap_growth(a_large: str, b_large: str, a_small: str, b_small: str, claim: str) -> Contrast:
    """``(a - b) at the small setting - (a - b) at the large one``: the gap grows as the setting shrinks."""
    return Contrast(f"({a_small} - {b_small}) - ({a_large} - {b_large})", claim,
                    (a_large, b_large, a_small, b_small),
                    lambda s: (s[a_small] - s[b_small]) - (s[a_large] - s[b_large]))  # fmt: skip


def share_gap(big_short: str, big_full: str, small_short: str, small_full: str, claim: str) -> Contrast:
    """``big_short / big_full - small_short / small_full``: the bigger model keeps a larger share (a
    difference of ratios: its unit is points of the share, not of recall)."""
    return Contrast(f"{big_short}/{big_full} - {small_short}/{small_full}", claim,
                    (big_short, big_full, small_short, small_full),
                    lambda s: s[big_short] / s[big_full] - s[small_short] / s[small_full],
                    unit="pp of share")  # fmt: skip


# -- scoring ---------------------------------------------------------------------------------------
def per_image_score(emb: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From saved embeddings {"image" [N_i, E], "text" [N_t, E], "owner" [N_t]}: (i2t hits [N_i, 3],
    t2i hit counts over each image's captions [N_i, 3], captions per image [N_i]), for k = 1, 5, 10."""
    img, txt, owner = emb["image"].double(), emb["text"].double(), emb["owner"].long()
    sims = img @ txt.T
    n_i, n_t = sims.shape
    i2t = sims.topk(min(max(KS), n_t), dim=1).indices
    i2t_hit = owner[i2t] == torch.arange(n_i).view(-1, 1)  # [N_i, k]
    t2i = sims.T.topk(min(max(KS), n_i), dim=1).indices
    t2i_hit = t2i == owner.view(-1, 1)  # [N_t, k]
    i2t_k = torch.stack([i2t_hit[:, :k].any(1) for k in KS], 1).double()
    t2i_k = torch.stack([t2i_hit[:, :k].any(1) for k in KS], 1).double()
    t2i_per_image = torch.zeros(n_i, len(KS), dtype=torch.float64).index_add_(0, owner, t2i_k)
    return i2t_k, t2i_per_image, torch.bincount(owner, minlength=n_i).double()


def weighted_score(parts, weights: torch.Tensor) -> torch.Tensor:
    """Mean of the six recalls with image weights [R, N_i] (a resample's counts) -> [R]."""
    i2t, t2i, n_caps = parts
    i2t_r = weights @ i2t / weights.sum(1, keepdim=True)  # [R, 3]
    t2i_r = weights @ t2i / (weights @ n_caps).unsqueeze(1)  # [R, 3]
    return torch.cat([i2t_r, t2i_r], 1).mean(1)


def bootstrap_weights(n_images: int, samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED):
    """[samples, n_images] counts of each image in each resample (with replacement)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_images, (samples, n_images), generator=gen)
    return torch.zeros(samples, n_images, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones_like(idx, dtype=torch.float64)
    )


def verdict(per_seed: list[float], lo: float, hi: float) -> str:
    if all(v > 0 for v in per_seed) and lo > 0:
        return "reproduces"
    if all(v < 0 for v in per_seed) and hi < 0:
        return "opposite"
    return "not shown"


def contrast_interval(contrast: Contrast, parts: dict, seeds, weights: torch.Tensor) -> dict:
    """``parts[(arm, seed)]``: per_image_score parts. The contrast on the full test set per seed, their
    mean, and the 95 % bootstrap interval of the mean over seeds (resampled test images); the verdict."""
    full = torch.ones(1, weights.shape[1], dtype=torch.float64)

    def on(w, seed):
        return contrast.value({a: weighted_score(parts[a, seed], w) for a in contrast.arms})

    per_seed = [float(on(full, s)) for s in seeds]
    boot = torch.stack([on(weights, s) for s in seeds]).mean(0)
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    mean = sum(per_seed) / len(per_seed)
    spread = (sum((v - mean) ** 2 for v in per_seed) / max(1, len(per_seed) - 1)) ** 0.5
    return {"contrast": contrast.name, "claim": contrast.claim, "mean": mean, "lo": lo, "hi": hi,
            "per_seed": dict(zip(map(str, seeds), per_seed, strict=True)), "seed_sd": spread,
            "verdict": verdict(per_seed, lo, hi), "unit": contrast.unit}  # fmt: skip
