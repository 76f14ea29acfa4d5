"""The declared experiments of ``training.experiments``: each seed paper's finding as a grid of arms
(command-line overrides of one base) x seeds, and the paper's claims about it as contrasts."""

from __future__ import annotations

from dataclasses import dataclass, field

from .contrasts import Contrast, difference, gap_growth, share_gap

__all__ = ["EXPERIMENTS", "Experiment"]


@dataclass(frozen=True)
class Experiment:
    """``arms``: name -> extra arguments after ``base``; ``contrasts``: the claims tested; ``paper``: what
    the paper reports (quoted for the README); ``note``: how this miniature differs from the paper."""

    base: tuple[str, ...]
    arms: dict
    seeds: tuple[int, ...] = (0, 1, 2)
    contrasts: tuple[Contrast, ...] = ()
    paper: str = ""
    note: str = ""
    proper_test: str = (
        ""  # what a test of the claim at the paper's scale needs (for "not shown" / "opposite")
    )
    needs: tuple[str, ...] = field(default=())  # files the arms read (checked before training)


# The miniature: Flickr8k train split (6,000 images), the "small" model, CLIPA stage 1 at 64 px (16
# patches) and 16 text tokens (the flickr8k preset), no intermediate evaluation, no zero-shot set.
_MINI = ("--preset", "flickr8k", "--clipa.stage2_epochs", "0", "--eval.every_steps", "0",
         "--eval.zeroshot_path", "", "--log.progress_bar", "false", "--ckpt.every_steps", "0")  # fmt: skip
# FastCLIP's gamma decays from 1 to gamma_min over half the run, as fast_clip's README recommends
_EPOCHS = ("--train.epochs", "6", "--loss.gamma_decay_epochs", "3")
_EPOCHS_8 = ("--train.epochs", "8", "--loss.gamma_decay_epochs", "4")
_KEEP_16_OF_49 = str(16 / 49)  # random / block keep 16 of the 7 x 7 patches at 112 px, as grid and resize

# FastCLIP-v3 (rgcl_g) against OpenCLIP's loss at two batch sizes, and the claims about them
_FASTCLIP_ARMS = {f"{mode}-b{b}": ("--loss.mode", mode, "--train.batch_size", str(b))
                  for b in (128, 32) for mode in ("clip", "rgcl_g")}  # fmt: skip
_FASTCLIP_CLAIMS = (
    difference("rgcl_g-b128", "clip-b128", "FastCLIP-v3 beats OpenCLIP's loss at batch 128"),
    difference("rgcl_g-b32", "clip-b32", "FastCLIP-v3 beats OpenCLIP's loss at batch 32"),
    gap_growth("rgcl_g-b128", "clip-b128", "rgcl_g-b32", "clip-b32", "the gap grows as the batch shrinks"),
)

EXPERIMENTS = {
    "clipa-image": Experiment(
        base=(*_MINI, *_EPOCHS, "--clipa.text_strategy", "none", "--clipa.stage2_epochs", "1"),
        arms={
            "resize": ("--clipa.image_strategy", "resize", "--clipa.image_resize", "64"),
            "random": ("--clipa.image_strategy", "random", "--clipa.image_keep", _KEEP_16_OF_49),
            "grid": ("--clipa.image_strategy", "grid"),
            "block": ("--clipa.image_strategy", "block", "--clipa.image_keep", _KEEP_16_OF_49),
        },
        contrasts=(
            difference("resize", "random", "resizing is at least as good as random masking"),
            difference("random", "grid", "random masking beats grid masking"),
            difference("grid", "block", "grid masking beats block masking"),
        ),
        paper="CLIPA (arXiv 2305.07017; open_clip docs/clipa.md): resizing > random masking > grid / block "
        "(resizing 'retains full image information'). GLIP (CC12M, B/16, 17 tokens, ImageNet zero-shot after "
        "tuning): resize 25.6 vs random 24.5.",
        note="16 of 49 image tokens at 112 px (resize: 64 px), 6 epochs, then 1 epoch at 112 px; full text.",
        proper_test="ImageNet-scale data (CLIPA: LAION-400M / CC12M) and a B/16 at 224 px, where 16 of 196 "
        "tokens still cover the object; at 112 px a 16-token block covers a third of the image.",
    ),
    "clipa-text": Experiment(
        base=(*_MINI, *_EPOCHS, "--clipa.text_length", "8", "--clipa.stage2_epochs", "1"),
        arms={
            "truncate": ("--clipa.text_strategy", "truncate"),
            "random": ("--clipa.text_strategy", "random"),
            "block": ("--clipa.text_strategy", "block"),
            "syntax": ("--clipa.text_strategy", "syntax"),
        },
        contrasts=(
            difference("random", "truncate", "random masking beats truncation at short lengths"),
            difference("block", "truncate", "block masking beats truncation at short lengths"),
            difference("syntax", "truncate", "syntax masking beats truncation"),
            difference("syntax", "random", "syntax masking is the best strategy"),
        ),
        paper="CLIPA: syntax masking is best at short lengths, truncation worst. CLIPF (CC3M, B/16, 8 "
        "tokens, ImageNet zero-shot after tuning): truncation 12.0, random 17.4, block 16.6, syntax 17.5.",
        note="8 of 32 text tokens (SOT and EOT kept) for 6 epochs at 64 px, then 1 epoch at full length and "
        "112 px. The POS table is context-free (lemminflect's lexicon per vocabulary entry).",
        proper_test="CC3M-scale captions (long, varied web text, where which 8 tokens survive matters) and "
        "ImageNet zero-shot after full-length tuning, as CLIPA's Table; Flickr8k captions are short and "
        "similar.",
    ),
    "inverse-scaling": Experiment(
        base=(*_MINI, *_EPOCHS),
        arms={
            "tiny-full": ("--model.size", "tiny", "--clipa.text_strategy", "none"),
            "tiny-8": ("--model.size", "tiny", "--clipa.text_length", "8"),
            "small-full": ("--model.size", "small", "--clipa.text_strategy", "none"),
            "small-8": ("--model.size", "small", "--clipa.text_length", "8"),
        },
        contrasts=(
            difference("small-full", "tiny-full", "the larger model is better at full text length"),
            share_gap(
                "small-8",
                "small-full",
                "tiny-8",
                "tiny-full",
                "the larger text encoder keeps a larger share of its full-length score at 8 tokens",
            ),
        ),  # fmt: skip
        paper="CLIPA's inverse scaling law: larger encoders lose less from shorter token sequences. Its "
        "accuracy-vs-compute figure (resizing to 17 image tokens, ImageNet zero-shot): S/16 -6.2, B/16 about "
        "-4.0, L/16 -3.0 points.",
        note="Text side only (the two sizes differ in patch size, which cancels within a size). Tiny: 2+2 "
        "layers of width 128; small: 6+4 layers of width 256. Evaluated at the trained length. The share "
        "contrast is in points of the share (each size's 8-token score as a percentage of its full-length "
        "score); a ratio of two small recalls, so its interval is wide.",
        proper_test="Models a size class apart trained to convergence on large data (CLIPA: S/16, B/16, L/16 "
        "on LAION-400M), where the large model's full-length lead is several points; here both sizes are "
        "far from converged and data-limited, the lead is a fraction of a point, and both keep about the same "
        "share at 8 tokens.",
    ),
    "laclip": Experiment(
        base=(*_MINI, *_EPOCHS_8),
        arms={
            "first-caption": ("--data.caption_sampling", "none"),
            "laclip": ("--data.caption_sampling", "laclip"),
        },
        contrasts=(difference("laclip", "first-caption", "sampling among rewritten captions helps"),),
        paper="LaCLIP (arXiv 2305.20088, README): ImageNet zero-shot, ViT-B/16, CC3M 15.8 -> 21.5, CC12M "
        "40.2 -> 48.4.",
        note="Flickr8k's 5 human captions stand in for the LLM rewrites (the first caption is the 'original').",
        proper_test="Real LLM rewrites of web alt-text (noisy, one caption per image) on CC3M-scale data; human "
        "captions are already diverse and clean, which is what LaCLIP's rewrites add.",
    ),
    "veclip": Experiment(
        base=(*_MINI, *_EPOCHS, "--data.train_captions", "alt-enriched", "--clipa.text_strategy", "none"),
        arms={
            "alt-text": ("--data.caption_sampling", "none"),
            "mix": ("--data.caption_sampling", "veclip", "--data.veclip_p", "0.5"),
            "enriched": ("--data.caption_sampling", "veclip", "--data.veclip_p", "1.0"),
        },
        contrasts=(
            difference("mix", "alt-text", "mixing enriched captions in beats alt-text only"),
            difference("mix", "enriched", "mixing beats enriched captions only"),
        ),
        paper="VeCLIP (arXiv 2310.07699, README; 3M web pairs, B/16): Flickr i2t R@1 12.20 (CLIP, alt-text) "
        "-> 40.60 (50/50 mix); enriched-only loses zero-shot at scale (VeCap-300M alone 46.43 vs 76.19 mixed "
        "with DFN).",
        note="Alt-text: the shortest human caption without function words; enriched: the longest caption; "
        "test keeps the 5 human captions. Full text length.",
        proper_test="Real web alt-text (noisy, often unrelated) and captioner-plus-LLM enriched captions on "
        "millions of pairs; derived alt-text from human captions keeps their content.",
    ),
    "fastclip": Experiment(
        base=(*_MINI, *_EPOCHS, "--optim.grad_clip", "0"),
        arms={
            **_FASTCLIP_ARMS,
            # diagnostic: the global estimator u at a constant tau (v1 = SogCLR), tau as clip's ends up
            "gcl-b32": ("--loss.mode", "gcl", "--train.batch_size", "32"),
        },
        contrasts=(
            *_FASTCLIP_CLAIMS,
            difference(
                "gcl-b32",
                "clip-b32",
                "the global contrastive loss (v1, constant tau) beats OpenCLIP's at batch 32",
            ),
        ),
        paper="FastCLIP (arXiv 2407.01445, README figures; IN & variants average): CC3M RN50 v3 / OpenCLIP "
        "18.4 / 14.2 (+4.2) on 1 node, 19.2 / 16.0 (+3.2) on 8 nodes: the gap shrinks as the global batch "
        "grows.",
        note="Same epochs (samples and FLOPs) per arm; gradient clipping off for every arm (the two losses' "
        "gradient norms at init differ about 9x, so one clip threshold would treat them differently); gamma "
        "decays over 3 of the 6 epochs (half the run, fast_clip's recommendation; the clip arms do not read it).",
        proper_test="Tens of epochs on millions of pairs (FastCLIP: CC3M, 37 epochs, one caption per image; u "
        "and tau settle over many passes) with the temperature LR of the paper. Here u is refreshed 6 times "
        "per sample, from a different one of the image's 5 captions each epoch (the flickr8k preset samples "
        "them, so each u averages normalizers of different pairs: see fastclip-onecap), and tau's LR is 10x "
        "the paper's (short runs): rgcl_g's tau falls to 0.02-0.04 while clip's stays at 0.07; gcl-b32 "
        "(constant tau 0.07) separates the estimator from the temperature.",
    ),
    # The same claims with one fixed caption per image (as FastCLIP's CC3M), so that each sample's u
    # estimates the normalizer of one pair; declared after the fastclip results (caption sampling confound).
    "fastclip-onecap": Experiment(
        base=(*_MINI, *_EPOCHS, "--optim.grad_clip", "0", "--data.caption_sampling", "none"),
        arms=_FASTCLIP_ARMS,
        contrasts=_FASTCLIP_CLAIMS,
        paper="FastCLIP (arXiv 2407.01445): as the fastclip experiment.",
        note="The fastclip experiment with the first caption of each image only (data.caption_sampling none), "
        "as FastCLIP's CC3M (one caption per image): each sample's u then estimates the normalizer of one pair. "
        "This is what separates the two experiments' verdicts: with 5 sampled captions v3 loses at both "
        "batches; with one it wins at batch 32 and the gap grows as the batch shrinks, as the paper says.",
        proper_test="As fastclip: tens of epochs on millions of pairs with the paper's temperature LR; and a "
        "u kept per (image, caption) pair where captions are sampled.",
    ),
    # LLM2CLIP's adapter over raw vs caption-contrastive-tuned MiniLM (needs the two embedding caches of
    # ``python -m training.llm2clip.cache``, see README) vs the transformer text tower.
    "llm2clip": Experiment(
        base=(*_MINI, *_EPOCHS_8),
        arms={
            "transformer": ("--data.caption_sampling", "laclip"),
            "adapter-raw": ("--model.text_tower", "adapter", "--data.text_embeddings", "runs/emb-raw"),
            "adapter-cc": ("--model.text_tower", "adapter", "--data.text_embeddings", "runs/emb-cc"),
        },
        contrasts=(
            difference("adapter-cc", "adapter-raw", "the caption-contrastive-tuned encoder is better"),
        ),
        paper="LLM2CLIP (arXiv 2411.04997): caption retrieval accuracy (COCO) Llama3-8B 18.4 -> 73.0 after "
        "caption-contrastive tuning; CLIP then trains on the tuned LLM's embeddings.",
        note="MiniLM stands in for the LLM. The transformer arm is laclip's laclip arm (the same "
        "configuration: its records are reused, not rerun).",
        proper_test="A decoder LLM (LLM2CLIP: Llama-3-8B, CRA 18 -> 73 after tuning) whose raw embeddings are "
        "poor; MiniLM is already sentence-contrastive, so tuning it has little to add: here the tuning (300 LoRA "
        "steps pulling an image's 5 captions together) raised CRA by 1.5 points (llm2clip-cra) and still "
        "lowered the adapter tower's retrieval, perhaps because the loop's captions of one image become "
        "near-duplicates to it. Both adapter arms beat the transformer trained from scratch (6.3 / 5.9 vs "
        "3.7 %).",
        needs=("runs/emb-raw", "runs/emb-cc"),
    ),
}
