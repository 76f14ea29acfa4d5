"""Prompts for caption rewriting (LaCLIP) and caption fusion (VeCLIP), and parsing of the model output.

LaCLIP rewrites a caption by in-context learning: a one-line instruction, then ``n`` example pairs
``"{source} => {target}"`` drawn at random from a pool of meta-input -> output pairs, then
``"{caption} =>"``; the rewrite is the first line the model generates. The pools below are this
project's own examples, written in four styles (as LaCLIP mixed ChatGPT, Bard, COCO and human
rewrites): ``concise``, ``detailed``, ``reordered`` and ``casual``. One style per rewrite gives K
differently worded rewrites per caption.

VeCLIP fuses a web alt-text (proper nouns, world knowledge) with a visual caption (what a captioner
sees) into one enriched caption, by the same few-shot format with ``alt-text | visual caption``
as the source.

    >>> prompt = rewrite_prompt("a dog runs on grass", style="concise", rng=random.Random(0))
    >>> parse_completion(" a dog running across a lawn\\nanother line")
    'a dog running across a lawn'
"""

from __future__ import annotations

import random

__all__ = ["FUSION_EXAMPLES", "REWRITE_EXAMPLES", "fusion_prompt", "parse_completion", "rewrite_prompt"]

REWRITE_INSTRUCTION = "Rewrite each image caption differently, keeping its meaning:"
FUSION_INSTRUCTION = "Merge the alt-text and the visual description into one accurate image caption:"
SEPARATOR = " => "

REWRITE_EXAMPLES: dict[str, list[tuple[str, str]]] = {
    "concise": [
        (
            "a large brown dog is running through the tall green grass in a park",
            "a brown dog running in a park",
        ),
        (
            "two young children are sitting on a wooden bench eating ice cream cones",
            "two kids eating ice cream on a bench",
        ),
        ("a red double decker bus driving down a busy city street", "a red bus on a busy street"),
        ("a woman in a blue dress is standing next to a white horse", "a woman beside a white horse"),
        ("several people are walking along the beach at sunset", "people walking on a beach at sunset"),
        ("a plate of pasta with tomato sauce and basil on a table", "pasta with tomato sauce"),
    ],
    "detailed": [
        ("a cat on a sofa", "a gray tabby cat curled up asleep on a soft beige sofa cushion"),
        ("man riding a bike", "a man in a helmet riding his bicycle along a quiet paved road"),
        ("boats in a harbor", "small white sailing boats moored side by side in a calm harbor"),
        ("a snowy mountain", "a tall mountain peak covered in fresh snow under a clear blue sky"),
        ("kids playing soccer", "a group of children chasing a soccer ball across a grassy field"),
        ("a bowl of fruit", "a ceramic bowl filled with apples, bananas and oranges on a kitchen counter"),
    ],
    "reordered": [
        ("a black dog jumps to catch a frisbee", "jumping to catch a frisbee, a black dog"),
        ("a girl reads a book under a tree", "under a tree, a girl is reading a book"),
        ("a train crosses a bridge over a river", "over a river, a train is crossing a bridge"),
        ("two men play chess in the park", "in the park, two men are playing a game of chess"),
        ("a chef slices vegetables in a kitchen", "in a kitchen, vegetables being sliced by a chef"),
        ("a surfer rides a big wave", "a big wave with a surfer riding it"),
    ],
    "casual": [
        ("a dog sitting in the snow", "this pup is just chilling in the snow"),
        ("a crowd at a concert", "tons of people packed in to watch the show"),
        ("a child blowing out birthday candles", "the kid is blowing out the candles on the birthday cake"),
        ("a man fishing from a small boat", "a guy out on his little boat trying to catch some fish"),
        ("a couple walking in the rain with an umbrella", "two people sharing an umbrella on a rainy walk"),
        ("a cat looking out of a window", "kitty staring out the window at something outside"),
    ],
}

FUSION_EXAMPLES: list[tuple[str, str, str]] = [
    ("JY-AYA | Airbus A320-212 | Royal Jordanian", "a white airplane landing on a runway",
     "a Royal Jordanian Airbus A320-212, registration JY-AYA, landing on a runway"),
    ("Golden Gate Bridge sunset 2019", "a red suspension bridge over water at sunset",
     "the red Golden Gate Bridge spanning the bay at sunset"),
    ("Labrador retriever puppy for sale", "a small yellow dog lying on a wooden floor",
     "a yellow Labrador retriever puppy lying on a wooden floor"),
    ("IMG_2045.jpg", "a plate with a sandwich and french fries",
     "a plate with a sandwich and french fries"),
    ("Eiffel Tower Paris travel guide", "a tall iron tower with people walking in front",
     "people walking in front of the Eiffel Tower in Paris"),
    ("Nike Air Max 90 white", "a white sneaker on a gray background",
     "a white Nike Air Max 90 sneaker on a gray background"),
]  # fmt: skip


def _check_text(name: str, text: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{name} must be a non-empty string, got {text!r}")
    return " ".join(text.split())  # one line: the format is line-based


def rewrite_prompt(caption: str, style: str, rng: random.Random, n_examples: int = 3) -> str:
    """The few-shot rewrite prompt for ``caption``: ``n_examples`` random pairs of ``style``."""
    caption = _check_text("caption", caption)
    if style not in REWRITE_EXAMPLES:
        raise ValueError(f"style must be one of {sorted(REWRITE_EXAMPLES)}, got {style!r}")
    pool = REWRITE_EXAMPLES[style]
    shots = rng.sample(pool, min(n_examples, len(pool)))
    lines = [
        REWRITE_INSTRUCTION,
        *(f"{src}{SEPARATOR}{tgt}" for src, tgt in shots),
        f"{caption}{SEPARATOR.rstrip()}",
    ]
    return "\n".join(lines)


def fusion_prompt(alt_text: str, visual_caption: str, rng: random.Random, n_examples: int = 3) -> str:
    """The few-shot VeCap fusion prompt: ``alt-text | visual caption =>``."""
    alt_text, visual_caption = (
        _check_text("alt_text", alt_text),
        _check_text("visual_caption", visual_caption),
    )
    shots = rng.sample(FUSION_EXAMPLES, min(n_examples, len(FUSION_EXAMPLES)))
    lines = [FUSION_INSTRUCTION, *(f"{a} | {v}{SEPARATOR}{f}" for a, v, f in shots)]
    return "\n".join([*lines, f"{alt_text} | {visual_caption}{SEPARATOR.rstrip()}"])


def parse_completion(generated: str) -> str:
    """The first non-empty generated line, cut at a following example (``=>``) and stripped;
    "" when the model produced nothing usable (the caller keeps the original then)."""
    for line in generated.splitlines():
        text = line.split(SEPARATOR.strip(), 1)[0].strip().strip('"').strip()
        if text:
            return " ".join(text.split())
    return ""
