"""The reference training loop: ``python -m training.train [--preset demo] [--section.field value ...]``.

One process (CPU or one GPU). Per step: tokenize (Rust), CLIPA token reduction in stage 1 (image
patches kept with fastclip_kernels.tokens, text truncated/masked), packed towers, the library's loss
(clip, siglip, or FastCLIP's gcl / rgcl / rgcl_g with its per-sample state) and fused optimizer.
Stage 2 (``clipa.stage2_epochs``) trains at full tokens; with the resize strategy the position table is
interpolated to the full grid first. Logs a line and a CSV row every ``log.every_steps``, evaluates
zero-shot accuracy and retrieval R@1/5/10, checkpoints atomically, resumes exactly, and stops cleanly
on a non-finite loss.
"""

import csv
import json
import math
import os
import sys
import time

import torch

from fastclip_kernels import FastCLIPLoss, tokens

from . import build, checkpoint
from .config import parse_args
from .data.sampler import GlobalIndexSampler
from .evaluate import retrieval_recall, zero_shot_accuracy
from .model import build_model


class NonFiniteLoss(RuntimeError):
    pass


def _stage1_image_size(cfg):
    return cfg.clipa_image_resize if cfg.clipa_image_strategy == "resize" else cfg.data_image_size


def _reduce_tokens(cfg, images, ids, lengths, step, patch_size):
    """CLIPA stage 1: kept patch indices (or resized images) and reduced text; seeded per step."""
    gen = torch.Generator().manual_seed(cfg.run_seed * 1_000_003 + step)
    keep_idx, strategy = None, cfg.clipa_image_strategy
    grid = (images.shape[-2] // patch_size, images.shape[-1] // patch_size)
    keep = max(1, round(cfg.clipa_image_keep * grid[0] * grid[1]))
    if strategy == "random":
        keep_idx = tokens.random_keep(images.shape[0], grid, keep, generator=gen)
    elif strategy == "block":
        keep_idx = tokens.block_keep(images.shape[0], grid, keep, generator=gen)
    elif strategy == "grid":
        keep_idx = tokens.grid_keep(images.shape[0], grid, generator=gen)
    elif strategy == "resize":
        images = tokens.resize_images(images, cfg.clipa_image_resize)
    text = cfg.clipa_text_strategy
    if text != "none" and ids.shape[1] > cfg.clipa_text_length:
        fn = {"truncate": tokens.truncate, "random": tokens.random_mask, "block": tokens.block_mask}[text]
        extra = {} if text == "truncate" else {"generator": gen}
        ids, lengths = fn(ids, lengths, cfg.clipa_text_length, **extra)
    return images, ids, lengths, keep_idx


def _loss(cfg, loss_fn, model, img, txt, indices):
    scale = model.temperature()
    if cfg.loss_mode == "clip":
        return loss_fn(img, txt, scale)
    if cfg.loss_mode == "siglip":
        return loss_fn(img, txt, scale, model.logit_bias)
    return loss_fn(img, txt, None if cfg.loss_mode == "rgcl" else scale, indices)


def evaluate(cfg, model, tok, sets, device):
    """Zero-shot and retrieval metrics at the model's current resolution (CLIPA stage 1 evaluates at
    the reduced size when the resize strategy is on). ``sets``: a cache {image size: eval sets}."""
    size = model.visual.image_size[0]
    if size not in sets:
        sets[size] = build.eval_sets(cfg, size)
    sets, metrics = sets[size], {}
    if sets["zero_shot"] is not None:
        ds, classes, templates = sets["zero_shot"]
        dl = build.loader(ds, cfg.eval_batch_size)
        acc = zero_shot_accuracy(model, tok, dl, classes, templates, cfg.data_context_length, device)
        metrics.update({f"zeroshot_{k}": v for k, v in acc.items()})
    if sets["retrieval"] is not None:
        dl = build.loader(sets["retrieval"], cfg.eval_batch_size)
        metrics.update(retrieval_recall(model, tok, dl, cfg.data_context_length, device))
    return metrics


class CSVLog:
    def __init__(self, path):
        self.path, self.fields = path, None

    def write(self, row: dict) -> None:
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)


def train(cfg, stop_at: int | None = None) -> dict:
    """Run the configured training; returns the final evaluation metrics. ``stop_at`` (tests) stops
    after that step as an interruption would, with a checkpoint and no final evaluation."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise NotImplementedError("multi-process runs are not wired into training/ yet: run one process")
    torch.manual_seed(cfg.run_seed)
    device, run_dir = build.device_of(cfg), cfg.output_path
    os.makedirs(run_dir, exist_ok=True)
    cfg.save(os.path.join(run_dir, "config.json"))
    stage1_size = _stage1_image_size(cfg)
    dataset, captions = build.train_dataset(cfg, cfg.data_image_size)
    tok = build.tokenizer(cfg, captions, run_dir)
    model = build_model(cfg, tok.vocab_size).to(device)
    if stage1_size != cfg.data_image_size:
        model.visual.resize_pos_embed(stage1_size)
    loss_fn = build.loss_fn(cfg, len(dataset), device)
    opt = build.optimizer(cfg, model)
    sampler = GlobalIndexSampler(len(dataset), seed=cfg.run_seed)
    steps_per_epoch = len(dataset) // cfg.train_batch_size
    stage1_steps = max(1, math.ceil(cfg.train_epochs * steps_per_epoch))
    total = stage1_steps + math.ceil(cfg.clipa_stage2_epochs * steps_per_epoch)
    total = min(total, cfg.train_max_steps or total)
    step, epoch, position, stage = 0, 0, 0, 1
    if cfg.ckpt_resume:
        path = os.path.join(run_dir, "latest.pt") if cfg.ckpt_resume == "latest" else cfg.ckpt_resume
        state = checkpoint.load(path)
        step, epoch, position, stage = state["step"], state["epoch"], state["position"], state["stage"]
        if stage == 2 and cfg.clipa_image_strategy == "resize":
            model.visual.resize_pos_embed(cfg.data_image_size)
            opt = build.optimizer(cfg, model)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        loss_fn.load_state_dict(state["loss"])
    log, eval_log = CSVLog(os.path.join(run_dir, "log.csv")), CSVLog(os.path.join(run_dir, "eval.csv"))
    sets = {}
    patch = cfg.model_dims()["patch_size"]
    tic, seen = time.perf_counter(), 0
    while step < total:
        sampler.set_epoch(epoch)
        sampler.load_state_dict({"epoch": epoch, "position": position * cfg.train_batch_size,
                                 "seed": cfg.run_seed, "world_size": 1})  # fmt: skip
        for chooser in (getattr(dataset, "choose", None),):
            if chooser is not None:
                chooser.set_epoch(epoch)
        if isinstance(loss_fn, FastCLIPLoss):
            loss_fn.set_epoch(epoch)
        for batch in build.loader(dataset, cfg.train_batch_size, sampler, cfg.data_num_workers):
            if step >= total:
                break
            if stage == 1 and step >= stage1_steps:  # CLIPA stage 2: full tokens
                stage = 2
                if cfg.clipa_image_strategy == "resize":
                    model.visual.resize_pos_embed(cfg.data_image_size)
                    opt = build.optimizer(cfg, model)
            texts = [t if isinstance(t, str) else t[0] for t in batch.targets]
            ids, lengths = tok.encode_batch(texts, cfg.data_context_length)
            images, keep_idx = batch.images, None
            if stage == 1:
                images, ids, lengths, keep_idx = _reduce_tokens(cfg, images, ids, lengths, step, patch)
            lr = build.lr_at(cfg, step, total)
            build.set_lr(opt, lr, model.temperature, cfg.loss_lr_tau_schedule)
            img, txt = model(images.to(device), ids.to(device), lengths.tolist(), keep_idx)
            loss = _loss(cfg, loss_fn, model, img, txt, batch.indices.to(device))
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss {loss.item()} at step {step + 1}; last checkpoint kept")
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.temperature.clamp_()
            step, position, seen = step + 1, position + 1, seen + len(texts)
            if step % cfg.log_every_steps == 0 or step == total:
                rate = seen / (time.perf_counter() - tic)
                row = dict(step=step, epoch=epoch, stage=stage, loss=f"{loss.item():.9g}", lr=f"{lr:.3e}",
                           tau=f"{1 / model.temperature().item():.4f}", samples_per_s=f"{rate:.1f}",
                           gamma=getattr(loss_fn, "gamma", ""), skipped=batch.skipped)  # fmt: skip
                log.write(row)
                print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            if cfg.eval_every_steps and step % cfg.eval_every_steps == 0 and step < total:
                eval_log.write({"step": step, **evaluate(cfg, model, tok, sets, device)})
            if step == stop_at:
                checkpoint.save(os.path.join(run_dir, "latest.pt"), model=model, optimizer=opt, loss_fn=loss_fn,
                                step=step, epoch=epoch, position=position, stage=stage, config=cfg.to_dict())  # fmt: skip
                return {"step": step, "interrupted": True}
            if cfg.ckpt_every_steps and step % cfg.ckpt_every_steps == 0:
                checkpoint.save(os.path.join(run_dir, "latest.pt"), model=model, optimizer=opt, loss_fn=loss_fn,
                                step=step, epoch=epoch, position=position, stage=stage, config=cfg.to_dict())  # fmt: skip
        else:
            epoch, position = epoch + 1, 0
    final = {"step": step, **evaluate(cfg, model, tok, sets, device)}
    eval_log.write(final)
    checkpoint.save(os.path.join(run_dir, "latest.pt"), model=model, optimizer=opt, loss_fn=loss_fn,
                    step=step, epoch=epoch, position=position, stage=stage, config=cfg.to_dict())  # fmt: skip
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(final, f, indent=2)
    print("final:", json.dumps(final), flush=True)
    return final


def main(argv=None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        train(cfg)
    except NonFiniteLoss as err:
        print(f"stopped: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
