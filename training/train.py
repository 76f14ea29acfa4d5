"""The reference training loop: ``fastclip-train [--preset demo] [--section.field value ...]`` (or
``python -m training.train``); several GPUs / CPU processes with ``torchrun --nproc_per_node K``.

Per step: tokenize (Rust), CLIPA token reduction in stage 1 (image patches kept with
fastclip_kernels.tokens or images resized; text truncated / masked), packed towers (bf16 autocast
on GPU; optional torch.compile and activation checkpointing; DDP with K ranks), the library's loss
(clip, siglip, or FastCLIP's gcl / rgcl / rgcl_g with its sharded per-sample state) and fused
optimizer. Stage 2 (``clipa.stage2_epochs``) trains at full tokens; with the resize strategy the
position table is interpolated to the full grid first. Rank 0 logs a line and a CSV row every
``log.every_steps`` (loss, lr, tau, gamma, samples/s, MFU, peak memory), evaluates zero-shot accuracy
and retrieval R@1/5/10, checkpoints atomically (with every rank's loss state and RNG) and plots the
run at the end. Resume is exact; a non-finite loss stops every rank cleanly at that step.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import os
import sys
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from . import build, checkpoint, dist
from .config import ConfigError, parse_args
from .data.sampler import GlobalIndexSampler
from .data.stream import count_samples
from .evaluate import retrieval_recall, zero_shot_accuracy
from .model import build_model
from .monitor import Monitor, peak_flops, peak_memory_gib, step_flops
from .step import autocast, loss_of, pos_table, reduce_tokens

__all__ = ["NonFiniteLoss", "main", "train"]


class NonFiniteLoss(RuntimeError):
    pass


def train(cfg, stop_at: int | None = None) -> dict:
    """Run the configured training; returns the final metrics (rank 0; other ranks get the step).
    ``stop_at`` (tests) stops after that step as an interruption would: checkpoint, no final eval."""
    ranks, run = dist.setup(build.device_of(cfg).type), None
    try:
        run = Run(cfg, ranks)
        return run.fit(stop_at)
    finally:
        if run is not None:
            run.net = run.opt = None  # DDP's reducer goes while the process group is still open
            gc.collect()
        dist.teardown(ranks)


class Run:
    """The objects of one run and its position (step, epoch, batches into the epoch, CLIPA stage)."""

    def __init__(self, cfg, ranks: dist.Ranks):
        K = ranks.world_size
        if cfg.train_batch_size % K:
            raise ConfigError(f"train_batch_size={cfg.train_batch_size} must be divisible by the {K} ranks")
        self.cfg, self.ranks, self.device = cfg, ranks, ranks.device
        self.local_batch, self.run_dir = cfg.train_batch_size // K, cfg.output_path
        torch.manual_seed(cfg.run_seed)
        os.makedirs(self.run_dir, exist_ok=True)
        if ranks.is_main:
            cfg.save(os.path.join(self.run_dir, "config.json"))
        self.stage1_size = (
            cfg.clipa_image_resize if cfg.clipa_image_strategy == "resize" else cfg.data_image_size
        )
        self.transform = build.train_transform(cfg, cfg.data_image_size)
        self.dataset, captions = build.train_dataset(cfg, self.transform)
        self.tok = self._on_main_first(lambda: build.tokenizer(cfg, captions, self.run_dir))
        self.pos_rank = self._on_main_first(lambda: pos_table(cfg, self.tok, self.run_dir, ranks.is_main))
        self.num_samples = len(self.dataset) if self.dataset is not None else cfg.data_num_samples
        self.num_samples = self.num_samples or count_samples(cfg.resolve(cfg.data_path))
        if self.dataset is None:
            self.dataset = build.shard_stream(cfg, ranks.rank, K, self.local_batch, self.transform)
            self.sampler = None
        else:
            self.sampler = GlobalIndexSampler(len(self.dataset), K, ranks.rank, seed=cfg.run_seed)
        table = self.tok.cache.table if hasattr(self.tok, "cache") else None
        self.model = build_model(cfg, self.tok.vocab_size, table).to(self.device)
        if cfg.train_activation_checkpointing:
            for tower in (self.model.visual, self.model.text):
                tower.set_grad_checkpointing(True)
        if self.stage1_size != cfg.data_image_size:
            self.model.visual.resize_pos_embed(self.stage1_size)
        self.loss_fn = build.loss_fn(cfg, self.num_samples, self.device, ranks.rank, K)
        self._new_optimizer()
        self.steps_per_epoch = max(1, self.num_samples // cfg.train_batch_size)
        self.stage1_steps = max(1, math.ceil(cfg.train_epochs * self.steps_per_epoch))
        total = self.stage1_steps + math.ceil(cfg.clipa_stage2_epochs * self.steps_per_epoch)
        self.total = min(total, cfg.train_max_steps or total)
        self.step = self.epoch = self.position = 0
        self.stage = 1
        self.eval_sets, self.peak = {}, peak_flops(self.device)

    def _on_main_first(self, make):
        """Rank 0 makes (and saves) it first; the others then load what it saved."""
        out = make() if self.ranks.is_main else None
        dist.barrier(self.ranks)
        return out if self.ranks.is_main else make()

    def _new_optimizer(self) -> None:
        """Optimizer (and DDP / compile wrappers) for the current parameters (again after a resize)."""
        self.opt = build.optimizer(self.cfg, self.model)
        net = self.model
        if self.ranks.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            net = DistributedDataParallel(net, device_ids=ids)
        self.net = torch.compile(net) if self.cfg.train_compile else net

    # -- schedule --------------------------------------------------------------------------------
    def lr(self) -> float:
        cfg, stage2_steps = self.cfg, self.total - self.stage1_steps
        if cfg.clipa_stage2_lr is None or stage2_steps <= 0:
            return build.lr_at(cfg, self.step, self.total)
        if self.stage == 1:
            return build.lr_at(cfg, self.step, self.stage1_steps)
        warmup = min(cfg.optim_warmup_steps, math.ceil(0.1 * stage2_steps))
        return build.lr_at(cfg, self.step - self.stage1_steps, stage2_steps, cfg.clipa_stage2_lr, warmup)

    def _enter_stage2(self) -> None:
        """CLIPA stage 2: full tokens; with the resize strategy, the position table at the full grid."""
        self.stage = 2
        if self.cfg.clipa_image_strategy != "resize":
            return
        self.model.visual.resize_pos_embed(self.cfg.data_image_size)
        pos = getattr(self.model.visual, "positional_embedding", None)
        if not self.cfg.clipa_stage2_interp_pos_embed and isinstance(pos, torch.nn.Parameter):
            with torch.no_grad():
                pos.normal_(std=pos.shape[-1] ** -0.5)
        self._new_optimizer()

    # -- data ------------------------------------------------------------------------------------
    def _epoch_batches(self):
        """This epoch's batches from ``position`` on (at most ``steps_per_epoch - position``)."""
        cfg, b = self.cfg, self.local_batch
        if self.transform is not None:
            self.transform.set_epoch(self.epoch)
        if self.sampler is None:  # shard stream
            self.dataset.set_epoch(self.epoch, skip_batches=self.position)
            workers = min(cfg.data_num_workers, len(self.dataset.urls) // self.ranks.world_size)
            loader = build.loader(self.dataset, b, workers=workers)
        else:
            self.sampler.set_epoch(self.epoch)
            self.sampler.load_state_dict({"epoch": self.epoch, "position": self.position * b, "seed": cfg.run_seed,
                                          "world_size": self.ranks.world_size})  # fmt: skip
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            loader = build.loader(self.dataset, b, self.sampler, cfg.data_num_workers)
        if hasattr(self.loss_fn, "set_epoch"):
            self.loss_fn.set_epoch(self.epoch)
        return itertools.islice(loader, max(0, self.steps_per_epoch - self.position))

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self, batch) -> tuple[torch.Tensor, float]:
        """Forward, backward and update on one batch; (mean loss over ranks, model FLOPs of this rank)."""
        cfg, patch = self.cfg, self.cfg.model_dims()["patch_size"]
        texts = [t if isinstance(t, str) else t[0] for t in batch.targets]
        ids, lengths = self.tok.encode_batch(texts, cfg.data_context_length)
        images, keep_idx = batch.images, None
        if self.stage == 1:
            images, ids, lengths, keep_idx = reduce_tokens(
                cfg,
                images,
                ids,
                lengths,
                self.step,
                (self.ranks.rank, self.ranks.world_size),
                patch,
                self.pos_rank,
            )
        self.last_lr = self.lr()
        build.set_lr(self.opt, self.last_lr, self.model.temperature, cfg.loss_lr_tau_schedule)
        lengths = lengths.tolist()
        with autocast(cfg, self.device):
            img, txt = self.net(
                images.to(self.device, non_blocking=True), ids.to(self.device), lengths, keep_idx
            )
        loss = loss_of(cfg, self.loss_fn, self.model, img.float(), txt.float(), batch.indices.to(self.device))
        mean_loss = dist.mean_over_ranks(loss, self.ranks)
        if not torch.isfinite(mean_loss):
            raise NonFiniteLoss(
                f"non-finite loss {mean_loss.item()} at step {self.step + 1}; last checkpoint kept"
            )
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.model.temperature.clamp_()
        grid = (images.shape[-2] // patch, images.shape[-1] // patch)
        n_img = keep_idx.shape[1] if keep_idx is not None else grid[0] * grid[1]
        return mean_loss, step_flops(cfg.model_dims(), [n_img] * len(texts), lengths)

    def tau(self) -> float:
        state = getattr(self.loss_fn, "state", None)
        if self.cfg.loss_mode == "rgcl" and getattr(state, "tau", None) is not None:
            return float(state.tau.mean())  # per-sample temperatures: mean over rank 0's shard
        return float(1 / self.model.temperature().detach())

    # -- evaluation and checkpoints ----------------------------------------------------------------
    def evaluate(self) -> dict:
        """Zero-shot and retrieval metrics (rank 0) at the model's current resolution."""
        metrics = {"step": self.step}
        if self.ranks.is_main:
            size = self.model.visual.image_size[0]
            if size not in self.eval_sets:
                self.eval_sets[size] = build.eval_sets(self.cfg, size)
            sets, cfg = self.eval_sets[size], self.cfg
            with autocast(cfg, self.device):
                if sets["zero_shot"] is not None:
                    ds, classes, templates = sets["zero_shot"]
                    dl = build.loader(ds, cfg.eval_batch_size)
                    acc = zero_shot_accuracy(
                        self.model, self.tok, dl, classes, templates, cfg.data_context_length, self.device
                    )
                    metrics.update({f"zeroshot_{k}": v for k, v in acc.items()})
                if sets["retrieval"] is not None:
                    dl = build.loader(sets["retrieval"], cfg.eval_batch_size)
                    metrics.update(
                        retrieval_recall(self.model, self.tok, dl, cfg.data_context_length, self.device)
                    )
        dist.barrier(self.ranks)
        return metrics

    def save(self) -> None:
        shards = dist.gather_to_main(
            {"loss": self.loss_fn.state_dict(), "rng": checkpoint.rng_state()}, self.ranks
        )
        if self.ranks.is_main:
            checkpoint.save(os.path.join(self.run_dir, "latest.pt"), model=self.model, optimizer=self.opt,
                            ranks=shards, step=self.step, epoch=self.epoch, position=self.position,
                            stage=self.stage, config=self.cfg.to_dict())  # fmt: skip
        dist.barrier(self.ranks)

    def resume(self, path: str) -> None:
        state = checkpoint.load(path, self.ranks.rank, self.ranks.world_size)
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        if state["stage"] == 2:
            self._enter_stage2()
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.loss_fn.load_state_dict(state["loss"])

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict:
        cfg = self.cfg
        if cfg.ckpt_resume:
            self.resume(
                os.path.join(self.run_dir, "latest.pt") if cfg.ckpt_resume == "latest" else cfg.ckpt_resume
            )
        monitor = Monitor(cfg, self.run_dir, self.total, self.step, enabled=self.ranks.is_main)
        tic, seen, flops = time.perf_counter(), 0, 0.0
        while self.step < self.total:
            for batch in self._epoch_batches():
                if self.step >= self.total:
                    break
                if self.stage == 1 and self.step >= self.stage1_steps:
                    self._enter_stage2()
                loss, step_flop = self.train_step(batch)
                self.step, self.position = self.step + 1, self.position + 1
                seen, flops = seen + len(batch.indices), flops + step_flop
                monitor.advance(loss.item() if monitor.bar is not None else None)
                if self.step % cfg.log_every_steps == 0 or self.step == self.total:
                    elapsed = time.perf_counter() - tic
                    monitor.log(self._row(loss, seen / elapsed, flops / elapsed, batch.skipped))
                    tic, seen, flops = time.perf_counter(), 0, 0.0
                if cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0 and self.step < self.total:
                    monitor.eval(self.evaluate())
                    tic, seen, flops = time.perf_counter(), 0, 0.0
                if self.step == stop_at or (cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0):
                    self.save()
                if self.step == stop_at:
                    monitor.close(plot=False)
                    return {"step": self.step, "interrupted": True}
            else:  # the epoch ran to its end (a break means the run did)
                self.epoch, self.position = self.epoch + 1, 0
        final = self.evaluate()
        monitor.eval(final)
        self.save()
        if self.ranks.is_main:
            with open(os.path.join(self.run_dir, "metrics.json"), "w") as f:
                json.dump(final, f, indent=2)
        monitor.close()
        return final

    def _row(self, loss, local_rate: float, local_flops: float, skipped: int) -> dict:
        mfu = f"{local_flops / self.peak:.4f}" if self.peak else ""
        return dict(step=self.step, epoch=self.epoch, stage=self.stage, loss=f"{loss.item():.9g}",
                    lr=f"{self.last_lr:.3e}", tau=f"{self.tau():.4f}", gamma=getattr(self.loss_fn, "gamma", ""),
                    samples_per_s=f"{local_rate * self.ranks.world_size:.1f}", mfu=mfu,
                    peak_mem_gib=f"{peak_memory_gib(self.device):.2f}", skipped=skipped)  # fmt: skip


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
