"""On a GPU: a few training steps of every loss mode never synchronize with the host, and the loop's
own step runs on CUDA with CLIPA token reduction. Skipped without CUDA (``scripts/gpu_check.sh`` runs
them in a GPU window with ``-m gpu``).

The sync check writes the loop's step (``training/step.py``, ``TrainStep``) out from its parts
(model, the objective's loss, LR rule and clamp, fused optimizer) with the batch already on the
device, as a pinned-memory loader with ``non_blocking`` copies delivers it, and without the loop's
deliberate finiteness check. CUDA's sync debug mode turns any synchronizing call into
an error whose traceback names the line.
"""

import pytest
import torch
from training_helpers import logged_losses, tiny_argv

from training import build, train
from training.config import parse_args
from training.model import build_model
from training.objective import Objective
from training.step import autocast, reduce_tokens

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
MODES = ["clip", "siglip", "gcl", "gcl_g", "rgcl", "rgcl_g"]
BATCH, SAMPLES, VOCAB = 32, 256, 128
CLIPA = ["--clipa.image_strategy", "random", "--clipa.image_keep", "0.5"]
CLIPA += ["--clipa.text_strategy", "truncate", "--clipa.text_length", "8"]


class SyncsAreErrors:
    """``with SyncsAreErrors():`` any synchronizing CUDA call inside raises RuntimeError."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode("default")
        return False


def _parts(mode: str):
    cfg = parse_args(["--preset", "demo", "--run.device", "cuda", "--loss.mode", mode, *CLIPA])
    device = torch.device("cuda")
    model = build_model(cfg, VOCAB).to(device)
    objective = Objective(cfg, SAMPLES, device)
    objective.set_epoch(1)  # gamma < 1: the u moving average runs too
    return cfg, device, model, objective, build.optimizer(cfg, model, objective)


def _batch(cfg, device, step: int):
    """A batch as the loop has it after CLIPA stage 1, moved to the device before the step."""
    gen = torch.Generator().manual_seed(step)
    images = torch.randn(BATCH, 3, cfg.data_image_size, cfg.data_image_size, generator=gen)
    ids = torch.randint(4, VOCAB, (BATCH, cfg.data_context_length), generator=gen)
    lengths = torch.randint(4, cfg.data_context_length + 1, (BATCH,), generator=gen)
    indices = torch.randperm(SAMPLES, generator=gen)[:BATCH]
    patch = cfg.model_dims()["patch_size"]
    images, ids, lengths, keep_idx = reduce_tokens(cfg, images, ids, lengths, step, (0, 1), patch)
    on = lambda t: t.pin_memory().to(device, non_blocking=True)  # noqa: E731
    return on(images), on(ids), lengths.tolist(), on(keep_idx), on(indices)


def _step(cfg, device, model, objective, opt, batch, step=10) -> torch.Tensor:
    images, ids, lengths, keep_idx, indices = batch
    objective.set_lr(opt, cfg.optim_lr, model, step, 100)
    with autocast(cfg, device):
        img, txt = model(images, ids, lengths, keep_idx)
    loss = objective.loss(model, img.float(), txt.float(), indices)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    objective.after_update(model)
    return loss.detach()


@pytest.mark.parametrize("mode", MODES)
def test_training_steps_never_sync(mode):
    cfg, device, model, objective, opt = _parts(mode)
    batches = [_batch(cfg, device, step) for step in range(5)]
    for batch in batches[:2]:  # warm-up: Triton compiles, optimizer state is allocated
        _step(cfg, device, model, objective, opt, batch)
    with SyncsAreErrors():
        losses = [_step(cfg, device, model, objective, opt, batch) for batch in batches[2:]]
    assert torch.isfinite(torch.stack(losses)).all()


def test_sync_check_can_fail():
    """The check must be able to fail: reading a device value back raises inside it."""
    x = torch.ones(3, device="cuda")
    with pytest.raises(RuntimeError, match="synchroniz"), SyncsAreErrors():
        x.sum().item()


def test_loop_runs_on_cuda_with_clipa(tmp_path):
    """The loop's own step on the GPU (stage 1 with kept patches on the host, stage 2 at full tokens)."""
    argv = tiny_argv(64, "--run.device", "cuda", "--run.output_dir", str(tmp_path), *CLIPA)
    cfg = parse_args([*argv, "--train.epochs", "0.5", "--clipa.stage2_epochs", "0.5"])
    final = train.train(cfg)
    assert final["step"] == 4 and len(logged_losses(cfg.output_path)) == 4
