"""Caption tools: LaCLIP rewrites and VeCLIP caption fusion with local language models
(``fastclip-rewrite``); see ``cli``, ``jobs``, ``prompts``, ``store``, ``generate``."""

from .generate import LocalLM
from .jobs import STYLES, PipelineCaptioner, caption_images, fuse_captions, rewrite_captions
from .prompts import fusion_prompt, parse_completion, rewrite_prompt
from .store import ResultStore, export_aligned, write_augmented_shards

__all__ = [
    "STYLES", "LocalLM", "PipelineCaptioner", "ResultStore", "caption_images", "export_aligned", "fuse_captions",
    "fusion_prompt", "parse_completion", "rewrite_captions", "rewrite_prompt", "write_augmented_shards",
]  # fmt: skip
