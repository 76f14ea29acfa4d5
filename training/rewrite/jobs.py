"""Generation jobs: LaCLIP rewrites, VeCLIP visual captions and caption fusion, all resumable.

    >>> lm = LocalLM("/models/llama")
    >>> store = rewrite_captions(captions, lm, "out/rewrites.jsonl", num_rewrites=4, batch_size=32)
    >>> export_aligned(store, captions, "out/", num_outputs=4)

Rewrite k of a caption uses style ``STYLES[k % 4]`` and 3 example pairs drawn with a seed of
(seed, row, k), so the prompt of an item is the same in a resumed run. A ``Captioner`` is any
callable ``list[PIL.Image] -> list[str]``; ``PipelineCaptioner`` wraps a local ``transformers``
image-to-text model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .prompts import REWRITE_EXAMPLES, fusion_prompt, parse_completion, rewrite_prompt
from .store import ResultStore

__all__ = ["STYLES", "PipelineCaptioner", "caption_images", "fuse_captions", "rewrite_captions"]

STYLES = tuple(REWRITE_EXAMPLES)
Captioner = Callable[[list], list[str]]


def _item_rng(seed: int, row: int, k: int) -> random.Random:
    return random.Random(f"{seed}:{row}:{k}")


def _run(store: ResultStore, todo: list[tuple[int, int]], make_prompt, lm, batch_size, gen_kw, desc):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in tqdm(range(0, len(todo), batch_size), desc=desc, disable=not todo):
        items = todo[start : start + batch_size]
        prompts = [make_prompt(row, k) for row, k in items]
        seed = gen_kw.get("seed", 0) * 1_000_003 + items[0][0] * 64 + items[0][1]
        texts = lm.complete(prompts, **{**gen_kw, "seed": seed})
        store.add([(row, k, parse_completion(t)) for (row, k), t in zip(items, texts, strict=True)])
    return store


def rewrite_captions(
    captions: Sequence[str], lm, store_path, *, num_rewrites: int = 4, batch_size: int = 32, seed: int = 0,
    temperature: float = 0.9, top_p: float = 0.95, max_new_tokens: int = 77, n_examples: int = 3,
) -> ResultStore:  # fmt: skip
    """K = ``num_rewrites`` LaCLIP rewrites of every caption into the JSONL ``store_path`` (resumes)."""
    if num_rewrites < 1:
        raise ValueError(f"num_rewrites must be >= 1, got {num_rewrites}")
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise ValueError(f"captions must be non-empty strings; empty at rows {bad[:5]}")
    store = ResultStore(store_path)
    done = store.done()
    todo = [(r, k) for r in range(len(captions)) for k in range(num_rewrites) if (r, k) not in done]

    def prompt(row, k):
        return rewrite_prompt(captions[row], STYLES[k % len(STYLES)], _item_rng(seed, row, k), n_examples)

    gen = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    return _run(store, todo, prompt, lm, batch_size, gen, "rewrite")


def fuse_captions(
    alt_texts: Sequence[str], visual_captions: Sequence[str], lm, store_path, *, batch_size: int = 32,
    seed: int = 0, temperature: float = 0.9, top_p: float = 0.95, max_new_tokens: int = 77,
) -> ResultStore:  # fmt: skip
    """One VeCap per row: the LLM merges the alt-text and the visual caption (k = 0 in the store)."""
    if len(alt_texts) != len(visual_captions):
        raise ValueError(
            f"alt_texts ({len(alt_texts)}) and visual_captions ({len(visual_captions)}) differ in length"
        )
    store = ResultStore(store_path)
    done = store.done()
    todo = [(r, 0) for r in range(len(alt_texts)) if (r, 0) not in done]
    blank = [(r, k) for r, k in todo if not str(visual_captions[r]).strip()]
    if blank:  # nothing seen: the alt-text stays the caption
        store.add([(r, 0, " ".join(alt_texts[r].split())) for r, _ in blank])
        todo = [item for item in todo if item not in set(blank)]

    def prompt(row, _k):
        return fusion_prompt(alt_texts[row], visual_captions[row], _item_rng(seed, row, 0))

    gen = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    return _run(store, todo, prompt, lm, batch_size, gen, "fuse")


def caption_images(images: Iterable, captioner: Captioner, store_path, *, batch_size: int = 16, decode=None):
    """Visual captions of the images in order (row = position) into a resumable store. ``images`` may
    hold encoded items that ``decode`` turns into PIL images; rows already done are not decoded."""
    store, decode = ResultStore(store_path), decode or (lambda x: x)
    done, pending = store.done(), []

    def flush():
        texts = captioner([img for _, img in pending])
        if len(texts) != len(pending):
            raise ValueError(f"the captioner returned {len(texts)} captions for {len(pending)} images")
        store.add([(r, 0, " ".join(str(t).split())) for (r, _), t in zip(pending, texts, strict=True)])
        pending.clear()

    for row, item in enumerate(tqdm(images, desc="caption")):
        if (row, 0) not in done:
            pending.append((row, decode(item)))
        if len(pending) == batch_size:
            flush()
    if pending:
        flush()
    return store


class PipelineCaptioner:
    """A local ``transformers`` image-to-text model (a VisionEncoderDecoder, BLIP, ... folder) as a
    Captioner: its processor, ``generate`` and the tokenizer's decode (what the image-to-text pipeline
    does, without the pipeline's Hub lookups)."""

    def __init__(self, model: str, device: str = "cpu", max_new_tokens: int = 40):
        import transformers as hf

        local = {"local_files_only": True}
        try:
            self.net = hf.AutoModelForImageTextToText.from_pretrained(model, **local).to(device).eval()
            self.tokenizer = hf.AutoTokenizer.from_pretrained(model, **local)
            processor = hf.AutoProcessor.from_pretrained(model, **local)
            if not isinstance(processor, hf.ProcessorMixin):  # AutoProcessor fell back to the tokenizer
                processor = hf.AutoImageProcessor.from_pretrained(model, **local)
        except OSError as e:
            raise FileNotFoundError(
                f"captioner model {model!r} is neither a local folder nor in the HF cache"
            ) from e
        self.processor, self.device, self.max_new_tokens = processor, device, max_new_tokens

    @torch.no_grad()
    def __call__(self, images: list) -> list[str]:
        inputs = self.processor(images=[img.convert("RGB") for img in images], return_tensors="pt").to(
            self.device
        )
        out = self.net.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
