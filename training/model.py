"""The CLIP model of the reference training loop: a packed ViT, a packed text tower and a temperature.

>>> model = build_model(get_preset("demo"), vocab_size=512)
>>> img, txt = model(images, ids, lengths)          # [B, E] each, L2-normalized (fp32)
>>> groups = param_groups(model, weight_decay=0.1, lr_tau=2e-4)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastclip_kernels.fastclip.temperature import GlobalTemperature
from fastclip_kernels.models.packed import PackedTextTransformer, PackedViT

from .objective import temperature_init

__all__ = ["CLIP", "build_model", "param_groups"]


class CLIP(nn.Module):
    """Two towers with L2-normalized outputs, a learnable global temperature and (SigLIP) a logit bias.

    Attributes: ``visual``, ``text``, ``temperature`` (GlobalTemperature: ``temperature()`` or
    ``model.logit_scale()`` give exp(theta) = 1/tau), ``logit_bias`` (nn.Parameter scalar or None).
    """

    def __init__(
        self,
        visual: PackedViT,
        text: PackedTextTransformer,
        tau_init: float = 0.07,
        logit_bias_init: float | None = None,
    ):
        super().__init__()
        self.visual, self.text = visual, text
        self.temperature = GlobalTemperature(tau_init)
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(logit_bias_init))) if logit_bias_init is not None else None
        )

    def logit_scale(self) -> torch.Tensor:
        """exp(theta) = 1 / tau (a 0-d tensor on the model's device, no host sync)."""
        return self.temperature()

    def encode_image(self, images: torch.Tensor, keep_idx=None, **kw) -> torch.Tensor:
        """images [B, 3, H, W] float -> [B, E] unit-norm fp32. ``keep_idx``/``kw`` go to PackedViT."""
        return F.normalize(self.visual(images, keep_idx, **kw).float(), dim=-1)

    def encode_text(self, ids: torch.Tensor, lengths) -> torch.Tensor:
        """ids [B, L] int64 with host lengths [B] (EOT position + 1) -> [B, E] unit-norm fp32."""
        return F.normalize(self.text(ids, lengths=lengths).float(), dim=-1)

    def forward(self, images, ids, lengths, keep_idx=None):
        return self.encode_image(images, keep_idx), self.encode_text(ids, lengths)


def build_model(cfg, vocab_size: int, text_table: torch.Tensor | None = None) -> CLIP:
    """The CLIP of ``cfg`` (a TrainConfig): sizes from ``cfg.model_dims()``, attention and patch-embedding
    backend ``train.kernels`` ("auto", or "triton": the GPU kernels on any device).
    With ``model.text_tower=adapter`` the text tower is LLM2CLIP's adapter over ``text_table``.
    ``model.init`` (e.g. ``hf-vision:DIR``) then loads pretrained towers (:func:`.hf_convert.init_from_hf`)."""
    d, backend = cfg.model_dims(), getattr(cfg, "train_kernels", "auto")
    visual = PackedViT(
        getattr(cfg, "data_image_size", 64),
        d["patch_size"],
        d["vision_width"],
        d["vision_layers"],
        d["vision_heads"],
        d["output_dim"],
        attn_backend=backend,
        patch_backend=backend,
        pos_embed=getattr(cfg, "model_pos_embed", "learned"),
    )
    if getattr(cfg, "model_text_tower", "transformer") == "adapter":
        if text_table is None:
            raise ValueError("model_text_tower=adapter needs text_table (the caption embedding cache)")
        from .llm2clip.adapter import AdapterTextTower

        text = AdapterTextTower(text_table, d["output_dim"])
    else:
        text = PackedTextTransformer(
            vocab_size,
            getattr(cfg, "data_context_length", 32),
            d["text_width"],
            d["text_layers"],
            d["text_heads"],
            d["output_dim"],
            attn_backend=backend,
        )
    tau_init, bias_init = temperature_init(cfg)
    model = CLIP(visual, text, tau_init=tau_init, logit_bias_init=bias_init)
    if getattr(cfg, "model_init", ""):  # pretrained towers from a local Hugging Face CLIP folder
        from .hf_convert import init_from_hf

        init_from_hf(model, cfg.model_init)
    return model


def _no_decay(name: str, p: torch.Tensor) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (
        p.ndim < 2
        or leaf.endswith("bias")
        or "embedding" in name  # token, class and position embeddings
        or "ln_" in name
        or "norm" in name
    )


def param_groups(model: nn.Module, weight_decay: float, lr_tau: float | None = None) -> list[dict]:
    """Optimizer param groups: [decay (weight_decay), no decay (0.0)] and, when ``lr_tau`` is given,
    the temperature's own group from ``model.temperature.param_group(lr_tau)`` (else theta is in the
    no-decay group). No decay on 1-D params, biases, norms, embeddings and the SigLIP logit bias.
    Frozen params (requires_grad False) are left out. Empty groups are dropped."""
    temp = getattr(model, "temperature", None)
    theta = temp.theta if isinstance(temp, GlobalTemperature) else None
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or (p is theta and lr_tau is not None):
            continue
        (no_decay if p is theta or _no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if theta is not None and lr_tau is not None and theta.requires_grad:
        groups.append(temp.param_group(lr_tau))
    return groups
