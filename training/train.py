"""The reference training loop: ``fastclip-train [--preset demo] [--section.field value ...]`` (or
``python -m training.train``); several GPUs / CPU processes with ``torchrun --nproc_per_node K``.

Per step: tokenize (Rust), CLIPA token reduction in stage 1 (image patches kept with
fastclip_kernels.tokens or images resized; text truncated / masked), packed towers (bf16 autocast
on GPU; optional torch.compile and activation checkpointing; DDP with K ranks), the library's loss
(clip, siglip, or FastCLIP's gcl / gcl_g / rgcl / rgcl_g with its sharded per-sample state) and fused
optimizer. Stage 2 (``clipa.stage2_epochs``) trains at full tokens; with the resize strategy the
position table is interpolated to the full grid first. Rank 0 logs a line and a CSV row every
``log.every_steps`` (loss, lr, tau, gamma, samples/s, MFU, peak memory), evaluates zero-shot accuracy
and retrieval R@1/5/10, checkpoints atomically (with every rank's loss state and RNG) and plots the
run at the end. Resume is exact. The step never reads the loss back: a non-finite loss is recorded on the
device and stops every rank at the next log, evaluation or checkpoint step (naming the first bad step),
before anything is saved.
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

from . import build, checkpoint, dist
from .config import ConfigError, parse_args
from .data import sources
from .data.sampler import GlobalIndexSampler
from .data.stream import count_samples
from .evaluate import retrieval_recall, zero_shot_accuracy
from .model import build_model
from .monitor import Monitor, peak_flops, peak_memory_gib, release_free_heap
from .objective import Objective
from .seeds import stream_seed
from .step import FiniteWatch, NonFiniteLoss, TrainStep, autocast, pos_table

__all__ = ["NonFiniteLoss", "main", "train"]


def train(cfg, stop_at: int | None = None) -> dict:
    """Run the configured training; returns the final metrics (rank 0; other ranks get the step).
    ``stop_at`` (tests) stops after that step as an interruption would: checkpoint, no final eval."""
    ranks, run = dist.setup(build.device_of(cfg).type, timeout_minutes=cfg.dist_timeout_minutes), None
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
        build.kernels(cfg, self.device)  # train.kernels=triton on a CPU needs the Triton interpreter
        self.local_batch, self.run_dir = cfg.train_batch_size // K, cfg.output_path
        torch.manual_seed(stream_seed(cfg.run_seed, "model_init"))
        os.makedirs(self.run_dir, exist_ok=True)
        if ranks.is_main:
            cfg.save(os.path.join(self.run_dir, "config.json"))
        self.stage1_size = (
            cfg.clipa_image_resize if cfg.clipa_image_strategy == "resize" else cfg.data_image_size
        )
        self.transform = sources.train_transform(cfg, cfg.data_image_size)
        self.dataset, captions = sources.train_dataset(cfg, self.transform)
        self.tok = self._on_main_first(lambda: build.tokenizer(cfg, captions, self.run_dir))
        self.pos_rank = self._on_main_first(lambda: pos_table(cfg, self.tok, self.run_dir, ranks.is_main))
        self.num_samples = len(self.dataset) if self.dataset is not None else cfg.data_num_samples
        self.num_samples = self.num_samples or count_samples(cfg.resolve(cfg.data_path))
        if self.dataset is None:
            self.dataset = sources.shard_stream(cfg, ranks.rank, K, self.local_batch, self.transform)
            self.batches = self.loader = None
        else:
            sampler = GlobalIndexSampler(len(self.dataset), K, ranks.rank, seed=cfg.run_seed)
            self.batches, self.loader = sources.train_batches(cfg, self.dataset, sampler, self.local_batch,
                                                              self.transform, self.device.type == "cuda")  # fmt: skip
        table = self.tok.cache.table if hasattr(self.tok, "cache") else None
        self.model = build_model(cfg, self.tok.vocab_size, table).to(self.device)
        if cfg.train_activation_checkpointing:
            for tower in (self.model.visual, self.model.text):
                tower.set_grad_checkpointing(True)
        if self.stage1_size != cfg.data_image_size:
            self.model.visual.resize_pos_embed(self.stage1_size)
        self.objective = Objective(cfg, self.num_samples, self.device, ranks.rank, K)
        self.watch = FiniteWatch()  # non-finite losses, on the device; read where the loop syncs anyway
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
        self.opt = build.optimizer(self.cfg, self.model, self.objective)
        net = self.model
        if self.ranks.world_size > 1:
            net = dist.ddp(net, self.device)
        self.net = torch.compile(net) if self.cfg.train_compile else net
        self.train_step = TrainStep(self.cfg, self.tok, self.net, self.model, self.objective, self.opt,
                                    self.ranks, self.device, self.pos_rank, self.watch)  # fmt: skip

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
        self.objective.set_epoch(self.epoch)
        if self.batches is not None:  # map-style data: one loader for the run, keyed by (epoch, step)
            self.batches.start(self.epoch, self.position)
            loader = self.loader
        else:  # shard stream
            if self.transform is not None:
                self.transform.set_epoch(self.epoch)
            self.dataset.set_epoch(self.epoch, skip_batches=self.position)
            workers = min(self.cfg.data_num_workers, len(self.dataset.urls) // self.ranks.world_size)
            loader = build.loader(self.dataset, self.local_batch, workers, self.device.type == "cuda")
        return itertools.islice(loader, max(0, self.steps_per_epoch - self.position))

    # -- evaluation and checkpoints ----------------------------------------------------------------
    def eval_text_length(self) -> int:
        """``eval.text_length``, else the length the model was last trained at (CLIPA stage 1: truncated)."""
        if self.cfg.eval_text_length:
            return self.cfg.eval_text_length
        stage1_text = self.stage == 1 and self.cfg.clipa_text_strategy != "none"
        return (
            min(self.cfg.clipa_text_length, self.cfg.data_context_length)
            if stage1_text
            else self.cfg.data_context_length
        )

    def _eval_batches(self, size: int) -> dict:
        """The evaluation sets at ``size`` px, decoded once and kept as uint8 batches."""
        if size not in self.eval_sets:
            cfg, sets = self.cfg, sources.eval_sets(self.cfg, size)
            keep = lambda ds: list(build.loader(ds, cfg.eval_batch_size, cfg.data_num_workers))  # noqa: E731
            zs = sets["zero_shot"]
            self.eval_sets[size] = {
                "zero_shot": None if zs is None else (keep(zs[0]), zs[1], zs[2]),
                "retrieval": None if sets["retrieval"] is None else keep(sets["retrieval"]),
            }
        return self.eval_sets[size]

    def evaluate(self) -> dict:
        """Zero-shot and retrieval metrics (rank 0) at the model's current resolution and the text length
        it was last trained at; the retrieval embeddings go to ``<run>/embeddings/step_<N>.pt``.
        The other ranks wait in a barrier meanwhile: ``dist.timeout_minutes`` must cover it (and a save)."""
        metrics = {"step": self.step}
        if self.ranks.is_main:
            cfg, length = self.cfg, self.eval_text_length()
            sets = self._eval_batches(self.model.visual.image_size[0])
            with autocast(cfg, self.device):
                if sets["zero_shot"] is not None:
                    batches, classes, templates = sets["zero_shot"]
                    acc = zero_shot_accuracy(
                        self.model, self.tok, batches, classes, templates, length, self.device
                    )
                    metrics.update({f"zeroshot_{k}": v for k, v in acc.items()})
                if sets["retrieval"] is not None:
                    emb = {}
                    metrics.update(retrieval_recall(self.model, self.tok, sets["retrieval"], length, self.device,
                                                    embeddings=emb))  # fmt: skip
                    os.makedirs(os.path.join(self.run_dir, "embeddings"), exist_ok=True)
                    torch.save({**emb, "step": self.step, "text_length": length,
                                "image_size": self.model.visual.image_size[0]},
                               os.path.join(self.run_dir, "embeddings", f"step_{self.step}.pt"))  # fmt: skip
        dist.barrier(self.ranks)
        return metrics

    def save(self) -> None:
        shards = dist.gather_to_main(
            {"loss": self.objective.state_dict(), "rng": checkpoint.rng_state()}, self.ranks
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
        self.objective.load_state_dict(state["loss"])

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self, stop_at: int | None = None) -> dict:
        cfg = self.cfg
        if cfg.ckpt_resume:
            self.resume(
                os.path.join(self.run_dir, "latest.pt") if cfg.ckpt_resume == "latest" else cfg.ckpt_resume
            )
        monitor = Monitor(cfg, self.run_dir, self.total, self.step, enabled=self.ranks.is_main)
        tic, seen, flops, skipped = time.perf_counter(), 0, 0.0, 0
        while self.step < self.total:
            for batch in self._epoch_batches():
                if self.step >= self.total:
                    break
                if self.stage == 1 and self.step >= self.stage1_steps:
                    self._enter_stage2()
                self.last_lr = self.lr()
                try:
                    loss, step_flop = self.train_step(batch, self.step, self.stage, self.last_lr, self.total)
                except Exception:  # e.g. an argument check of a nan temperature after a non-finite loss
                    self.watch.check()  # reports the first non-finite loss, if any, as the cause
                    raise
                self.step, self.position = self.step + 1, self.position + 1
                seen, flops, skipped = seen + len(batch.indices), flops + step_flop, skipped + batch.skipped
                log_now = self.step % cfg.log_every_steps == 0 or self.step == self.total
                eval_now = cfg.eval_every_steps and self.step % cfg.eval_every_steps == 0
                save_now = self.step == stop_at or (
                    cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0
                )
                if log_now or eval_now or save_now:  # the loss's one read back: stop before logging or saving
                    self.watch.check()
                monitor.advance()  # no host read: the bar shows the loss logged at log steps
                if log_now:
                    if self.device.type == "cpu":
                        release_free_heap()
                    elapsed = time.perf_counter() - tic
                    skipped = dist.sum_over_ranks(skipped, self.ranks)  # all ranks, since the last row
                    monitor.log(self._row(loss, seen / elapsed, flops / elapsed, skipped))
                    skipped = 0
                    tic, seen, flops = time.perf_counter(), 0, 0.0
                if eval_now and self.step < self.total:
                    monitor.eval(self.evaluate())
                    tic, seen, flops = time.perf_counter(), 0, 0.0
                if save_now:
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
                    lr=f"{self.last_lr:.3e}", tau=f"{self.objective.tau(self.model):.4f}", gamma=_fmt(self.objective.gamma),
                    samples_per_s=f"{local_rate * self.ranks.world_size:.1f}", mfu=mfu,
                    peak_mem_gib=f"{peak_memory_gib(self.device):.2f}", skipped=skipped)  # fmt: skip


def _fmt(value, digits: int = 4) -> str:
    return "" if value is None else f"{float(value):.{digits}f}"


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
