"""Embedded default data: procedurally drawn scenes with compositional captions.

A newcomer with no data trains on these. Each image holds one or two flat shapes (circle, square, triangle,
cross) in one of eight colors, at a position (left, right, top, bottom, center) and a size (small, large), on a
plain or noisy dark background. Everything is drawn with NumPy and is a pure function of (seed, index), so a
dataset of any length costs no disk and no download (about 0.5 ms per 64x64 image on one CPU core).

Captions are templates over the drawn attributes, 3 to 5 per image, e.g. "a small red circle on the left" or
"a blue square above a green triangle". Zero-shot labels: the shape (or the color) of a single-object scene,
with prompt templates, so a trained model's zero-shot accuracy can be compared with chance (1/4 for shapes).

    >>> ds = SyntheticScenes(num_samples=100, image_size=32, seed=0)
    >>> image, captions, index = ds[7]      # uint8 [3, 32, 32], list of 3-5 str, 7
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 210),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 215, 225),
}
POSITIONS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
SIZES = {"small": 0.12, "large": 0.21}  # half-extent as a fraction of the image side
ZERO_SHOT_TEMPLATES = {
    "shape": ("a {}.", "a photo of a {}.", "a drawing of a {}.", "a small {}.", "a large {}."),
    "color": ("a {} shape.", "a {} object.", "something {}."),
}
_POS_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed, index]))


def scene_spec(seed: int, index: int, max_objects: int = 2) -> list[dict]:
    """The objects of scene `index`: a list of 1-2 dicts with keys shape, color, position, size."""
    rng = _rng(seed, index)
    n = 1 if max_objects == 1 else int(rng.integers(1, max_objects + 1))
    if n == 1:
        positions = [list(POSITIONS)[rng.integers(len(POSITIONS))]]
    else:  # two objects on one axis, so the relation ("left of", "above") is well defined
        positions = ["left", "right"] if rng.random() < 0.5 else ["top", "bottom"]
    colors = rng.choice(len(COLORS), size=n, replace=False)
    return [
        {
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "color": list(COLORS)[colors[i]],
            "position": positions[i],
            "size": list(SIZES)[rng.integers(len(SIZES))],
        }
        for i in range(n)
    ]


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= r * 0.85) & (np.abs(dx) <= r * 0.85)
    if shape == "triangle":  # apex up; half-width grows linearly from 0 at the top to r at the base
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) * 0.5)
    if shape == "cross":
        w = r * 0.33
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render_scene(objects: list[dict], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `objects` (from `scene_spec`) on a dark plain or noisy background: uint8 [H, W, 3]."""
    s = image_size
    base = rng.integers(10, 70, size=3)
    if rng.random() < 0.5:
        img = np.broadcast_to(base, (s, s, 3)).astype(np.int16)
    else:
        img = (base + rng.integers(-10, 11, size=(s, s, 3))).astype(np.int16)
    yy, xx = np.ogrid[:s, :s]
    for obj in objects:
        fx, fy = POSITIONS[obj["position"]]
        jitter = rng.uniform(-0.03, 0.03, size=2) * s
        r = SIZES[obj["size"]] * s
        mask = _shape_mask(obj["shape"], yy, xx, fy * s + jitter[0], fx * s + jitter[1], r)
        img[mask] = COLORS[obj["color"]]
    return np.clip(img, 0, 255).astype(np.uint8)


def _phrase(o: dict, size: bool = True) -> str:
    return f"{o['size'] + ' ' if size else ''}{o['color']} {o['shape']}"


def scene_captions(objects: list[dict]) -> list[str]:
    """All template captions of a scene (5), the first the most complete."""
    return [re.sub(r"\ba (?=[aeiou])", "an ", c) for c in _templates(objects)]


def _templates(objects: list[dict]) -> list[str]:
    if len(objects) == 1:
        o = objects[0]
        where = _POS_PHRASE[o["position"]]
        return [
            f"a {_phrase(o)} {where}",
            f"a {_phrase(o, size=False)}",
            f"a picture of a {o['size']} {o['shape']} colored {o['color']}",
            f"{where}, a {_phrase(o, size=False)}",
            f"one {o['color']} {o['shape']} on a dark background",
        ]
    a, b = objects
    if a["position"] == "left":
        rel, inv, pa, pb = "to the left of", "to the right of", "on the left", "on the right"
    else:
        rel, inv, pa, pb = "above", "below", "at the top", "at the bottom"
    return [
        f"a {_phrase(a)} {rel} a {_phrase(b)}",
        f"a {_phrase(b, size=False)} {inv} a {_phrase(a, size=False)}",
        f"a {_phrase(a, size=False)} and a {_phrase(b, size=False)}",
        f"a {_phrase(a, size=False)} {pa} and a {_phrase(b, size=False)} {pb}",
        f"two shapes: a {a['shape']} and a {b['shape']}",
    ]


class SyntheticScenes(Dataset):
    """Procedural scenes with 3-5 captions each, deterministic per (seed, index).

    Args:
        num_samples: dataset length.
        image_size: side H = W in pixels (e.g. 32 or 64).
        seed: scenes differ across seeds; use different seeds for train and eval sets.
        max_objects: 1 (single-object scenes, the zero-shot setting) or 2.
        transform: optional callable on the uint8 [3, H, W] tensor (e.g. normalization).

    Returns per item: (image uint8 [3, H, W] or transform(image), list of captions, global index).
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 32,
        seed: int = 0,
        max_objects: int = 2,
        transform: Callable | None = None,
    ):
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels, got {image_size}")
        if max_objects not in (1, 2):
            raise ValueError(f"max_objects must be 1 or 2, got {max_objects}")
        self.num_samples, self.image_size, self.seed = num_samples, image_size, seed
        self.max_objects, self.transform = max_objects, transform

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> list[dict]:
        """The drawn objects of item `index` (shape, color, position, size)."""
        return scene_spec(self.seed, index, self.max_objects)

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        objects = self.scene(index)
        draw_rng = _rng(self.seed + 1_000_003, index)  # separate stream: layout and pixels vary independently
        image = (
            torch.from_numpy(render_scene(objects, self.image_size, draw_rng)).permute(2, 0, 1).contiguous()
        )
        captions = scene_captions(objects)
        k = 3 + int(draw_rng.integers(0, 3))  # 3-5 captions, the complete one first
        captions = captions[:1] + [captions[i] for i in sorted(draw_rng.permutation(4)[: k - 1] + 1)]
        if self.transform is not None:
            image = self.transform(image)
        return image, captions, index


class SyntheticZeroShot(Dataset):
    """Single-object scenes labelled by shape (4 classes) or color (8 classes), for zero-shot evaluation.

    `classes` and `templates` give the prompts: "a photo of a {class}." etc. Returns (image, label, index).
    """

    def __init__(
        self,
        num_samples: int,
        image_size: int = 32,
        seed: int = 1,
        task: str = "shape",
        transform: Callable | None = None,
    ):
        if task not in ZERO_SHOT_TEMPLATES:
            raise ValueError(f"task must be one of {tuple(ZERO_SHOT_TEMPLATES)}, got {task!r}")
        self.scenes = SyntheticScenes(num_samples, image_size, seed, max_objects=1, transform=transform)
        self.task = task
        self.classes = list(SHAPES) if task == "shape" else list(COLORS)
        self.templates = ZERO_SHOT_TEMPLATES[task]

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int):
        image, _, index = self.scenes[index]
        return image, self.classes.index(self.scenes.scene(index)[0][self.task]), index

    def prompts(self) -> list[list[str]]:
        """Per class, the prompt texts: [num_classes][num_templates]."""
        return [[t.format(c) for t in self.templates] for c in self.classes]
