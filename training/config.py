"""Training configuration: one dataclass, named presets, and the command line generated from it.

Every field has a help text (``fastclip-train --help`` prints them by section) and can be set on the
command line as ``--section.name value``, ``--section_name value`` or ``--section-name value``:
bools as true/false, tuples as comma lists, optional fields as ``none``. ``--preset NAME`` first picks
the starting point (default ``demo``). Presets: ``demo``, ``flickr8k``, ``cc3m-b16``, ``laion-b16``.

Example::

    cfg = parse_args(["--preset", "flickr8k", "--optim.lr", "5e-4", "--train.compile", "true"])
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field

__all__ = ["MODEL_SIZES", "PRESETS", "ConfigError", "TrainConfig", "data_home", "get_preset", "parse_args"]

# name -> (vision width, layers, heads, patch, text width, layers, heads, output dim)
MODEL_SIZES = {
    "tiny": (128, 2, 4, 8, 128, 2, 4, 128),
    "small": (256, 6, 4, 16, 256, 4, 4, 256),
    "S/16": (384, 12, 6, 16, 384, 12, 6, 384),
    "B/32": (768, 12, 12, 32, 512, 12, 8, 512),
    "B/16": (768, 12, 12, 16, 512, 12, 8, 512),
    "L/14": (1024, 24, 16, 14, 768, 12, 12, 768),
}
# fmt: off
CHOICES = {  # fields with a fixed set of values
    "run_device": ("auto", "cpu", "cuda"), "data_kind": ("synthetic", "flickr8k", "csv", "shards"),
    "data_caption_sampling": ("none", "laclip", "veclip"), "data_train_captions": ("as-given", "alt-enriched"),
    "model_size": tuple(MODEL_SIZES), "clipa_syntax_tagger": ("lemminflect", "nltk", "spacy"),
    "model_pos_embed": ("learned", "sincos"), "model_text_tower": ("transformer", "adapter"), "loss_mode": ("clip", "siglip", "gcl", "gcl_g", "rgcl", "rgcl_g"),
    "loss_lr_tau_schedule": ("step_thresh", "const", "cosine"), "optim_name": ("adamw", "lamb"),
    "train_precision": ("auto", "bf16", "fp32"), "eval_retrieval_split": ("dev", "test", "none"),
    "train_kernels": ("auto", "triton"),
    "clipa_image_strategy": ("none", "random", "grid", "block", "resize"),
    "clipa_text_strategy": ("none", "truncate", "random", "block", "syntax"),
}
# fmt: on
# fmt: off
BOUNDS = {  # numeric fields: allowed interval (optional fields may also be None)
    "data_num_samples": "[2, inf)", "data_num_workers": "[0, inf)", "data_veclip_p": "[0, 1]",
    "data_vocab_size": "(8, inf)", "data_context_length": "[3, inf)", "model_output_dim": "(0, inf)",
    "loss_temperature": "(0, 1]", "loss_gamma_min": "(0, 1]", "loss_gamma_decay_epochs": "[1, inf)",
    "loss_rho": "[0, inf)", "loss_eps": "[0, inf)", "loss_lr_tau": "[0, inf)", "optim_lr": "(0, inf)",
    "optim_warmup_steps": "[0, inf)", "optim_weight_decay": "[0, inf)", "optim_eps": "(0, inf)",
    "optim_grad_clip": "[0, inf)", "train_batch_size": "[2, inf)", "train_epochs": "(0, inf)",
    "train_max_steps": "(0, inf)", "clipa_image_keep": "(0, 1]", "clipa_stage2_epochs": "[0, inf)",
    "clipa_stage2_lr": "(0, inf)", "eval_every_steps": "[0, inf)", "eval_batch_size": "[1, inf)", "eval_text_length": "[3, inf)",
    "log_every_steps": "[1, inf)", "ckpt_every_steps": "[0, inf)", "dist_timeout_minutes": "(0, inf)",
}
# fmt: on
FASTCLIP_FIELDS = ("loss_gamma_min", "loss_gamma_decay_epochs", "loss_rho", "loss_eps", "loss_lr_tau")


class ConfigError(ValueError):
    """A bad configuration value or command line; the message names the field."""


def data_home() -> str:
    """Directory holding the datasets: ``$FASTCLIP_DATA``, else ``../shared/data``."""
    return os.environ.get("FASTCLIP_DATA") or "../shared/data"


def _within(x: float, spec: str) -> bool:
    lo, hi = (float(t) for t in spec[1:-1].split(","))
    return (lo <= x if spec[0] == "[" else lo < x) and (x <= hi if spec[-1] == "]" else x < hi)


def _f(default, help: str):
    kw = {"default_factory": default} if callable(default) else {"default": default}
    return field(metadata={"help": help}, **kw)


@dataclass
class TrainConfig:
    # fmt: off
    run_name: str = _f("demo", "Run name; outputs go to <run.output_dir>/<run.name>.")
    run_output_dir: str = _f("runs", "Parent directory of run outputs (checkpoints, CSV log, plots).")
    run_seed: int = _f(0, "Seed of model init, data order and token masking.")
    run_device: str = _f("auto", "Device: auto (cuda if available), cpu or cuda.")
    data_kind: str = _f("synthetic", "Dataset format.")
    data_root: str = _f(data_home, "Directory holding the datasets (default $FASTCLIP_DATA, else ../shared/data).")
    data_path: str = _f("", "Dataset: flickr8k folder, CSV/TSV file or shard pattern; relative to data.root.")
    data_num_samples: int | None = _f(4096, "Training samples: how many to generate (synthetic), the count (shards); none: counted.")
    data_image_size: int = _f(64, "Image side in pixels at full resolution (stage 2 / no CLIPA).")
    data_num_workers: int = _f(2, "Data loader worker processes (0: load in the main process).")
    data_cache_images: bool = _f(True, "flickr8k / csv: decode every training image once into memory (uint8, data.image_size).")
    data_caption_sampling: str = _f("none", "Several captions per image: none (first), laclip (uniform), veclip (mix).")
    data_train_captions: str = _f("as-given", "flickr8k / csv training captions: as-given, or alt-enriched (a VeCLIP stand-in: [keyword alt-text of the shortest caption, the longest caption]; evaluation keeps the given captions).")
    data_veclip_p: float = _f(0.5, "VeCLIP: probability of the enriched caption instead of the alt-text.")
    data_tokenizer: str = _f("", "tokenizer.json to load; empty: train one on the training captions.")
    data_vocab_size: int = _f(4096, "Vocabulary size when training the tokenizer.")
    data_context_length: int = _f(32, "Full text length in tokens, SOT and EOT included.")
    data_text_embeddings: str = _f("", "LLM2CLIP: caption embedding cache (python -m training.llm2clip.cache).")
    model_size: str = _f("tiny", "Model size (widths/layers/heads/patch from MODEL_SIZES).")
    model_output_dim: int | None = _f(None, "Embedding dimension; none: the size's default.")
    model_pos_embed: str = _f("learned", "Image position embeddings: learned or fixed 2-D sin-cos.")
    model_text_tower: str = _f("transformer", "Text tower: the packed transformer, or LLM2CLIP's adapter over cached embeddings.")
    model_init: str = _f("", "Start from a local Hugging Face CLIP folder: hf:DIR (both towers), hf-vision:DIR, hf-text:DIR; empty: random init.")
    loss_mode: str = _f("rgcl_g", "Loss: clip, siglip, gcl (FastCLIP-v1), gcl_g (v0: gcl with a learned global tau), rgcl (v2), rgcl_g (v3).")
    loss_temperature: float = _f(0.07, "Initial temperature tau (constant for gcl; siglip: 0.1).")
    loss_gamma_min: float = _f(0.8, "FastCLIP: final inner learning rate gamma of the u estimator.")
    loss_gamma_decay_epochs: int = _f(10, "FastCLIP: epochs of the cosine decay of gamma from 1 to gamma_min.")
    loss_rho: float = _f(8.5, "FastCLIP: rho of RGCL / RGCL-g (6.5 CC3M, 8.5 CC12M, 16 LAION).")
    loss_eps: float = _f(1e-14, "FastCLIP: epsilon in log(eps + g) (1e-6 in the LAION recipe).")
    loss_lr_tau: float = _f(2e-4, "FastCLIP: learning rate of the temperature (rgcl_g, gcl_g, rgcl).")
    loss_lr_tau_schedule: str = _f("step_thresh", "Temperature LR (rgcl_g, gcl_g): step_thresh (x1/3 once tau <= 0.03), const, cosine (lr_tau to 0 over the run).")
    optim_name: str = _f("adamw", "Optimizer (the library's fused versions).")
    optim_lr: float = _f(1e-3, "Peak learning rate, reached after warmup.")
    optim_min_lr: float = _f(0.0, "Floor of the cosine learning-rate decay.")
    optim_warmup_steps: int = _f(100, "Linear warmup steps.")
    optim_weight_decay: float = _f(0.1, "Weight decay (not on biases, norms, embeddings' gains, tau).")
    optim_betas: tuple[float, float] = _f((0.9, 0.98), "Adam betas, as beta1,beta2.")
    optim_eps: float = _f(1e-6, "Adam epsilon.")
    optim_grad_clip: float = _f(1.0, "Clip the gradient norm to this (0: off).")
    train_batch_size: int = _f(128, "Global batch size (split evenly over ranks).")
    train_epochs: float = _f(10.0, "Epochs of training (of stage 1 when CLIPA is on).")
    train_max_steps: int | None = _f(None, "Stop after this many steps (smoke tests); none: no limit.")
    train_precision: str = _f("auto", "auto (bf16 autocast on GPU, fp32 on CPU), bf16, fp32.")
    train_compile: bool = _f(False, "torch.compile the model.")
    train_kernels: str = _f("auto", "Op implementations: auto (Triton on GPU, PyTorch on CPU) or triton (every op of the step on its GPU kernels, on CPU through the Triton interpreter: needs TRITON_INTERPRET=1; slow, for tests).")
    train_activation_checkpointing: bool = _f(False, "Recompute transformer blocks in backward to save memory.")
    clipa_image_strategy: str = _f("none", "Stage-1 image tokens: random, grid (1 per 2x2), block, resize, none.")
    clipa_image_keep: float = _f(0.5, "Stage 1: fraction of patches kept by random / block, in (0, 1].")
    clipa_image_resize: int = _f(32, "Stage 1: image side in pixels for the resize strategy.")
    clipa_text_strategy: str = _f("none", "Stage-1 text tokens: truncate, random, block, syntax, none.")
    clipa_text_length: int = _f(16, "Stage 1: text length in tokens, SOT and EOT included.")
    clipa_pos_table: str = _f("", "Syntax masking: saved POS rank table; empty: built at start with clipa.syntax_tagger.")
    clipa_syntax_tagger: str = _f("lemminflect", "Syntax masking: tagger of the POS rank table (lemminflect: offline lexicon from the package index; nltk / spacy need their tagger data).")
    clipa_stage2_epochs: float = _f(0.0, "Stage 2: epochs at full resolution and text length (0: no stage 2).")
    clipa_stage2_lr: float | None = _f(None, "Stage 2 peak LR (own cosine; warmup min(optim.warmup_steps, 10% of stage 2)); none: one schedule.")
    clipa_stage2_interp_pos_embed: bool = _f(True, "Stage 2: interpolate position embeddings (else re-init).")
    eval_every_steps: int = _f(200, "Evaluate every N steps (0: only at the end).")
    eval_zeroshot_path: str = _f("", "Zero-shot set (ImageFolder-style); relative to data.root; empty: none.")
    eval_retrieval_split: str = _f("test", "Split for image<->text retrieval R@1/5/10.")
    eval_batch_size: int = _f(256, "Batch size of evaluation.")
    eval_text_length: int | None = _f(None, "Text length of evaluation; none: the length last trained at.")
    log_every_steps: int = _f(10, "One log line (and CSV row) every N steps; the loss is read back only then (a non-finite loss stops the run at the next log, eval or checkpoint step).")
    log_tensorboard: bool = _f(False, "Also write TensorBoard events.")
    log_progress_bar: bool = _f(True, "Show a progress bar on interactive terminals.")
    ckpt_every_steps: int = _f(500, "Save a checkpoint every N steps (0: only at the end).")
    ckpt_resume: str = _f("", "Checkpoint to resume from ('latest': the run's last one); empty: fresh start.")
    dist_timeout_minutes: float = _f(30.0, "torchrun ranks: how long a collective may wait before the process group aborts. The other ranks wait in a barrier while rank 0 evaluates (all of eval's sets, in its process) and writes a checkpoint: keep it above the longest of those (NCCL's own default is 10).")
    # fmt: on

    # -- derived --------------------------------------------------------------------------------
    @property
    def output_path(self) -> str:
        return os.path.join(self.run_output_dir, self.run_name)

    def resolve(self, path: str) -> str:
        """A dataset path relative to ``data_root`` (absolute paths are kept)."""
        return path if not path or os.path.isabs(path) else os.path.join(self.data_root, path)

    def model_dims(self) -> dict:
        w, n, h, p, tw, tn, th, out = MODEL_SIZES[self.model_size]
        return dict(vision_width=w, vision_layers=n, vision_heads=h, patch_size=p, text_width=tw,
                    text_layers=tn, text_heads=th, output_dim=self.model_output_dim or out)  # fmt: skip

    # -- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, hints[k], v) for k, v in d.items()})

    def save(self, path) -> None:
        with open(path, "w") as fh:
            json.dump(self.to_dict(), fh, indent=2)

    @classmethod
    def load(cls, path) -> TrainConfig:
        with open(path) as fh:
            return cls.from_dict(json.load(fh))

    # -- checks ---------------------------------------------------------------------------------
    def validate(self) -> TrainConfig:
        """Raise ConfigError listing every bad field; return self."""
        bad = [
            f"{k}={getattr(self, k)!r}: must be one of {v}"
            for k, v in CHOICES.items()
            if getattr(self, k) not in v
        ]
        if bad:
            raise ConfigError("invalid config:\n  " + "\n  ".join(bad))
        c, patch = self, self.model_dims()["patch_size"]
        for k, spec in BOUNDS.items():
            v = getattr(c, k)
            if v is not None and not _within(v, spec):
                bad.append(f"{k}={v!r}: must be in {spec}")
        # fmt: off
        checks = [
            ("data_path", c.data_kind == "synthetic" or bool(c.data_path), f"needed for data_kind={c.data_kind}"),
            ("data_image_size", c.data_image_size > 0 and c.data_image_size % patch == 0,
             f"must be a positive multiple of the patch size ({patch})"),
            ("data_train_captions", c.data_train_captions == "as-given" or c.data_kind in ("flickr8k", "csv"),
             "alt-enriched needs data_kind flickr8k or csv"),
            ("optim_min_lr", 0 <= c.optim_min_lr <= c.optim_lr, "must be in [0, optim_lr]"),
            ("data_text_embeddings", c.model_text_tower != "adapter" or bool(c.data_text_embeddings),
             "needed for model_text_tower=adapter"),
            ("optim_betas", all(0 <= b < 1 for b in c.optim_betas), "each beta must be in [0, 1)"),
            ("clipa_image_resize", c.clipa_image_strategy != "resize"
             or (0 < c.clipa_image_resize <= c.data_image_size and c.clipa_image_resize % patch == 0),
             f"must be a multiple of the patch size ({patch}) in (0, data_image_size]"),
            ("clipa_text_length", c.clipa_text_strategy == "none"
             or 3 <= c.clipa_text_length <= c.data_context_length, "must be in [3, data_context_length]"),
        ]
        # fmt: on
        if c.loss_mode == "siglip":
            for k in FASTCLIP_FIELDS:
                default = TrainConfig.__dataclass_fields__[k].default
                msg = f"is a FastCLIP field; loss_mode=siglip needs its default {default!r}"
                checks.append((k, getattr(c, k) == default, msg))
        bad += [f"{k}={getattr(c, k)!r}: {msg}" for k, ok, msg in checks if not ok]
        if bad:
            raise ConfigError("invalid config:\n  " + "\n  ".join(bad))
        return self


# -- presets -------------------------------------------------------------------------------------
# Short CPU runs (a few hundred steps): the paper's tau LR (2e-4) moves tau from 0.070 to 0.067 in a whole
# demo run, so flickr8k trains it 10x faster (demo keeps 2e-4: `--loss.mode siglip` needs the FastCLIP
# defaults); warmups are ~5-10 % of the steps.
SHORT_RUN_LR_TAU = 2e-3


def demo() -> TrainConfig:
    """CPU, procedurally generated data, tiny model: a few minutes."""
    return TrainConfig(run_name="demo", run_device="cpu", data_num_samples=4096, data_vocab_size=512,
                       data_context_length=16, optim_warmup_steps=25, train_epochs=8.0, train_batch_size=128,
                       eval_every_steps=100, ckpt_every_steps=0)  # fmt: skip


def flickr8k() -> TrainConfig:
    """Flickr8k (6k train images, 5 captions) on CPU, small model, CLIPA resize 112 -> 64 then 112."""
    return TrainConfig(run_name="flickr8k", run_device="auto", data_kind="flickr8k", data_path="flickr8k",
                       data_num_samples=None, data_image_size=112, data_caption_sampling="laclip",
                       data_vocab_size=4096, model_size="small", loss_rho=6.5, loss_gamma_min=0.2,
                       loss_gamma_decay_epochs=10, loss_lr_tau=SHORT_RUN_LR_TAU, optim_lr=2e-4,
                       optim_warmup_steps=50, train_batch_size=128, train_epochs=20.0,
                       clipa_image_strategy="resize", clipa_image_resize=64, clipa_text_strategy="truncate",
                       clipa_text_length=16, clipa_stage2_epochs=2.0, clipa_stage2_lr=1e-4,
                       eval_every_steps=0, eval_zeroshot_path="cifar10_test")  # fmt: skip


def cc3m_b16() -> TrainConfig:
    """FastCLIP-v3 "Medium" (CC3M, 1024 global batch) hyper-parameters with a B/16 and CLIPA two-stage."""
    return TrainConfig(run_name="cc3m-b16", data_kind="shards", data_path="cc3m/{00000..00331}.tar",
                       data_num_samples=2_723_840, data_image_size=224, data_num_workers=8, model_size="B/16",
                       loss_rho=6.5, loss_gamma_min=0.2, loss_gamma_decay_epochs=18, loss_lr_tau=2e-4,
                       optim_lr=1e-3, optim_warmup_steps=10_000, optim_weight_decay=0.1, train_batch_size=1024,
                       train_epochs=37.0, clipa_image_strategy="resize", clipa_image_resize=112,
                       clipa_text_strategy="truncate", clipa_text_length=16, clipa_stage2_epochs=2.0,
                       clipa_stage2_lr=2.5e-5, eval_every_steps=2000, ckpt_every_steps=2000,
                       eval_retrieval_split="none")  # fmt: skip


def laion_b16() -> TrainConfig:
    """FastCLIP-v3 "xLarge" (LAION-400M, 5120 global batch) with a B/16 and CLIPA two-stage."""
    return TrainConfig(run_name="laion-b16", data_kind="shards", data_path="laion400m/{00000..41407}.tar",
                       data_num_samples=315_658_316, data_image_size=224, data_num_workers=8, model_size="B/16",
                       loss_rho=16.0, loss_gamma_min=0.8, loss_gamma_decay_epochs=10, loss_lr_tau=5e-5,
                       loss_eps=1e-6, optim_lr=2e-4, optim_min_lr=4e-5, optim_warmup_steps=13_200,
                       optim_weight_decay=0.2, train_batch_size=5120, train_epochs=30.0,
                       clipa_image_strategy="resize", clipa_image_resize=112, clipa_text_strategy="truncate",
                       clipa_text_length=16, clipa_stage2_epochs=0.4, clipa_stage2_lr=2.5e-5,
                       eval_every_steps=5000, ckpt_every_steps=5000, eval_retrieval_split="none")  # fmt: skip


PRESETS = {"demo": demo, "flickr8k": flickr8k, "cc3m-b16": cc3m_b16, "laion-b16": laion_b16}


def get_preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()


# -- command line --------------------------------------------------------------------------------
def _coerce(name: str, tp, value):
    """Convert a CLI string (or a JSON value) to the field's type; errors name the field."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        tp = next(a for a in args if a is not type(None))
        args = typing.get_args(tp)
    try:
        if typing.get_origin(tp) is tuple:
            items = value.split(",") if isinstance(value, str) else list(value)
            if len(items) != len(args):
                raise ValueError(f"expected {len(args)} comma-separated values")
            return tuple(_coerce(name, a, v) for a, v in zip(args, items, strict=True))
        if tp is bool:
            if isinstance(value, bool):
                return value
            table = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
            return table[str(value).lower()]
        if tp is int and isinstance(value, float | bool) or tp is float and isinstance(value, bool):
            raise ValueError("wrong type")
        return tp(value.strip() if isinstance(value, str) else value)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"bad value for {name}: {value!r} is not a valid {getattr(tp, '__name__', tp)} ({e})"
        ) from None


def format_help() -> str:
    hints = typing.get_type_hints(TrainConfig)
    lines = ["usage: fastclip-train [--preset NAME] [--section.field VALUE ...]", "",
             f"presets: {', '.join(PRESETS)} (default demo)", ""]  # fmt: skip
    section = None
    for f in dataclasses.fields(TrainConfig):
        head, rest = f.name.split("_", 1)
        if head != section:
            section = head
            lines.append(f"{section}:")
        kind = "|".join(CHOICES[f.name]) if f.name in CHOICES else str(hints[f.name])
        kind += f" in {BOUNDS[f.name]}" if f.name in BOUNDS else ""
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{head}.{rest} {{{kind}}}  (default: {default!r})")
        lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """``[--preset NAME] --field value ...`` -> validated TrainConfig; ConfigError on a bad field."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help())
        raise SystemExit(0)
    hints, names = typing.get_type_hints(TrainConfig), {f.name for f in dataclasses.fields(TrainConfig)}
    preset, updates, i = "demo", {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --field, got {arg!r}")
        key, eq, value = arg[2:].partition("=")
        key = key.replace(".", "_").replace("-", "_")
        if key != "preset" and key not in names:
            raise ConfigError(f"unknown config field --{arg[2:].partition('=')[0]} (see --help)")
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if key != "preset" and hints[key] is bool and (nxt is None or nxt.startswith("--")):
                value = "true"  # a bare bool flag
            elif nxt is None:
                raise ConfigError(f"--{key} needs a value")
            else:
                value, i = nxt, i + 1
        if key == "preset":
            preset = value
        else:
            updates[key] = _coerce(key, hints[key], value)
        i += 1
    return dataclasses.replace(get_preset(preset), **updates).validate()
