"""Name and weight mapping between our packed CLIP towers and Hugging Face ``transformers.CLIPModel``.

The towers are the same network (checked against ``modeling_clip``): pre-LN blocks with LayerNorm
eps 1e-5, a class token and learned position table, ``pre_layrnorm`` = our ``ln_pre``, the class token
pooled and ``post_layernorm``-ed, a bias-free projection; the text tower is causal and pools its EOT
token (HF applies ``final_layer_norm`` to every token, we to the pooled one: the same, LN is per token).
Differences of layout only: HF splits our packed ``in_proj_weight`` [3D, D] into q/k/v [D, D] each and
stores the projections as ``nn.Linear`` weights (our ``proj`` [D, E] is its ``visual_projection.weight``
transposed). Our MLP activation is exact GELU (HF ``hidden_act="gelu"``); a tower imported from a
``quick_gelu`` checkpoint (OpenAI CLIP) gets :class:`QuickGELU` modules in place of ``nn.GELU``.

>>> hf_state = to_hf_state(model.state_dict(), vision_layers=2, text_layers=2)
>>> ours = from_hf_state(hf_state, "vision", layers=2)        # {"visual.conv1.weight": ..., ...}
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HF_PREFIX", "QuickGELU", "block_names", "from_hf_state", "to_hf_state", "tower_activation"]

HF_PREFIX = {"vision": "vision_model", "text": "text_model"}
OUR_PREFIX = {"vision": "visual", "text": "text"}


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI CLIP's activation (HF ``quick_gelu``, open_clip ``QuickGELU``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def tower_activation(tower: nn.Module) -> str:
    """HF ``hidden_act`` of a tower's MLPs ("gelu" or "quick_gelu"); ValueError if mixed or other."""
    kinds = set()
    for block in tower.transformer.resblocks:
        act = block.mlp.gelu
        if isinstance(act, QuickGELU):
            kinds.add("quick_gelu")
        elif isinstance(act, nn.GELU) and act.approximate == "none":
            kinds.add("gelu")
        else:
            raise ValueError(f"activation {act!r} has no Hugging Face CLIP equivalent")
    if len(kinds) != 1:
        raise ValueError(f"a tower must use one activation throughout, got {sorted(kinds)}")
    return kinds.pop()


def set_activation(tower: nn.Module, hidden_act: str) -> None:
    """Make every MLP of ``tower`` use HF's ``hidden_act`` ("gelu": exact GELU, or "quick_gelu")."""
    makers = {"gelu": nn.GELU, "quick_gelu": QuickGELU}
    if hidden_act not in makers:
        raise ValueError(f"hidden_act={hidden_act!r} is not supported; the towers run 'gelu' or 'quick_gelu'")
    for block in tower.transformer.resblocks:
        block.mlp.gelu = makers[hidden_act]()


def block_names(i: int) -> list[tuple[str, str]]:
    """(ours, HF) names inside block ``i`` (after the tower prefixes), q/k/v excluded."""
    ours, hf = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
    pairs = [("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]  # fmt: skip
    return [(f"{ours}{a}.{p}", f"{hf}{b}.{p}") for a, b in pairs for p in ("weight", "bias")]


def _tower_names(tower: str) -> list[tuple[str, str, bool]]:
    """(ours, HF, transposed) names outside the blocks; HF names are under the tower prefix except the
    projections (top level of CLIPModel)."""
    if tower == "vision":
        return [
            ("conv1.weight", "embeddings.patch_embedding.weight", False),
            ("class_embedding", "embeddings.class_embedding", False),
            ("positional_embedding", "embeddings.position_embedding.weight", False),
            ("ln_pre.weight", "pre_layrnorm.weight", False),
            ("ln_pre.bias", "pre_layrnorm.bias", False),
            ("ln_post.weight", "post_layernorm.weight", False),
            ("ln_post.bias", "post_layernorm.bias", False),
            ("proj", "/visual_projection.weight", True),
        ]
    return [
        ("token_embedding.weight", "embeddings.token_embedding.weight", False),
        ("positional_embedding", "embeddings.position_embedding.weight", False),
        ("ln_final.weight", "final_layer_norm.weight", False),
        ("ln_final.bias", "final_layer_norm.bias", False),
        ("text_projection", "/text_projection.weight", True),
    ]


def _hf_full(tower: str, name: str) -> str:
    return name[1:] if name.startswith("/") else f"{HF_PREFIX[tower]}.{name}"


def _tower_pairs(tower: str, layers: int) -> list[tuple[str, str, bool]]:
    pairs = _tower_names(tower)
    for i in range(layers):
        pairs += [(a, b, False) for a, b in block_names(i)]
    return [(f"{OUR_PREFIX[tower]}.{a}", _hf_full(tower, b), t) for a, b, t in pairs]


def _qkv_names(tower: str, i: int, part: str) -> tuple[str, list[str]]:
    ours = f"{OUR_PREFIX[tower]}.transformer.resblocks.{i}.attn.in_proj_{part}"
    hf = [f"{HF_PREFIX[tower]}.encoder.layers.{i}.self_attn.{x}_proj.{part}" for x in "qkv"]
    return ours, hf


def to_hf_state(state: dict, *, vision_layers: int, text_layers: int) -> dict[str, torch.Tensor]:
    """Our CLIP ``state_dict`` -> ``CLIPModel``'s (contiguous copies; ``logit_scale`` = theta)."""
    out = {}
    for tower, layers in (("vision", vision_layers), ("text", text_layers)):
        for ours, hf, transposed in _tower_pairs(tower, layers):
            out[hf] = state[ours].t() if transposed else state[ours]
        for i in range(layers):
            for part in ("weight", "bias"):
                ours, hf = _qkv_names(tower, i, part)
                out.update(zip(hf, state[ours].chunk(3, dim=0), strict=True))
    out["logit_scale"] = state["temperature.theta"].reshape(())
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_hf_state(hf_state: dict, tower: str, layers: int) -> dict[str, torch.Tensor]:
    """One tower ("vision" or "text") of a ``CLIPModel`` state dict -> our names (``visual.*`` /
    ``text.*``). KeyError-free: a missing HF tensor raises ValueError naming it."""

    def get(name):
        if name not in hf_state:
            raise ValueError(f"the Hugging Face checkpoint has no tensor {name!r}")
        return hf_state[name]

    out = {}
    for ours, hf, transposed in _tower_pairs(tower, layers):
        out[ours] = get(hf).t() if transposed else get(hf)
    for i in range(layers):
        for part in ("weight", "bias"):
            ours, hf = _qkv_names(tower, i, part)
            out[ours] = torch.cat([get(n) for n in hf], dim=0)
    return out


# -- import: --model.init hf:DIR -----------------------------------------------------------------
INIT_KINDS = {"hf": ("vision", "text"), "hf-vision": ("vision",), "hf-text": ("text",)}


def parse_init(spec: str) -> tuple[tuple[str, ...], str]:
    """``"hf:DIR"`` (both towers), ``"hf-vision:DIR"`` or ``"hf-text:DIR"`` -> (towers, DIR)."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in INIT_KINDS or not path:
        raise ValueError(f"model.init must be hf:DIR, hf-vision:DIR or hf-text:DIR, got {spec!r}")
    return INIT_KINDS[kind], path


def read_hf_folder(path: str) -> tuple[dict, dict]:
    """({tower: its HF config}, state dict) of a local Hugging Face folder holding a ``CLIPModel``
    (both towers), a ``CLIPVisionModelWithProjection`` or a ``CLIPTextModelWithProjection``;
    ValueError saying what is wrong."""
    import json
    import os

    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    if not os.path.isdir(path):
        raise ValueError(f"Hugging Face CLIP folder not found: {path!r}")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"{path!r} has no config.json: not a Hugging Face model folder")
    with open(config_file) as fh:
        model_type = json.load(fh).get("model_type")
    kinds = {"clip": CLIPConfig, "clip_vision_model": CLIPVisionConfig, "clip_text_model": CLIPTextConfig}
    if model_type not in kinds:
        raise ValueError(
            f"{path!r} holds a {model_type!r} model, not a CLIP (model_type one of {list(kinds)})"
        )
    config = kinds[model_type].from_pretrained(path, local_files_only=True)
    configs = (
        {"vision": config.vision_config, "text": config.text_config}
        if model_type == "clip"
        else {"vision" if model_type == "clip_vision_model" else "text": config}
    )
    weights = os.path.join(path, "model.safetensors")
    if os.path.isfile(weights):
        from safetensors.torch import load_file

        return configs, load_file(weights)
    weights = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(weights):
        return configs, torch.load(weights, map_location="cpu", weights_only=True)
    raise ValueError(
        f"{path!r} has no model.safetensors or pytorch_model.bin (sharded weights: not supported)"
    )


def _check_arch(tower_name: str, tower: nn.Module, cfg) -> None:
    """Heads, depth and LN eps of the HF tower config ``cfg`` must be ours (widths: checked by shape)."""
    blocks = tower.transformer.resblocks
    ours = {"num_hidden_layers": len(blocks), "num_attention_heads": blocks[0].attn.heads,
            "layer_norm_eps": blocks[0].ln_1.eps}  # fmt: skip
    if tower_name == "vision":
        ours["patch_size"] = tower.patch_size
    for key, value in ours.items():
        if getattr(cfg, key) != value:
            raise ValueError(
                f"{tower_name}_config.{key}={getattr(cfg, key)!r} of the Hugging Face model does not match "
                f"ours ({value!r}); pick a model.size with the same architecture"
            )


def _fit_positions(name: str, table: torch.Tensor, target: torch.Tensor, tower: nn.Module) -> torch.Tensor:
    """Vision: bicubic interpolation to our grid. Text: the first context_length rows."""
    from fastclip_kernels.ops.patch_embed import interpolate_pos_embed

    if table.shape[1:] != target.shape[1:] or table.shape[0] == target.shape[0]:
        return table  # same size, or a width mismatch that the shape check reports
    if name.startswith("visual."):
        return interpolate_pos_embed(table.float(), tower.grid_size).to(table.dtype)
    if table.shape[0] > target.shape[0]:
        return table[: target.shape[0]]  # positions past our context length are never used
    return table


def init_from_hf(model: nn.Module, spec: str) -> None:
    """Load the towers named by ``spec`` (see :func:`parse_init`) from a local HF CLIP folder into
    ``model`` (our CLIP) in place: activations set to the checkpoint's, vision positions interpolated
    to our grid, text positions cut to our context length. The temperature is left as configured.
    A shape or architecture mismatch raises ValueError naming the parameter."""
    towers, path = parse_init(spec)
    configs, hf_state = read_hf_folder(path)
    missing = [t for t in towers if t not in configs]
    if missing:
        raise ValueError(
            f"{path!r} holds only a {'/'.join(configs)} tower; model.init={spec!r} needs {missing}"
        )
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    updates, activations = {}, {}
    for tower_name in towers:  # check everything first: a failed init leaves the model as it was
        tower = model.visual if tower_name == "vision" else model.text
        if not hasattr(tower, "transformer"):
            raise ValueError(
                f"model.init={spec!r} loads a {tower_name} transformer, but ours is {type(tower).__name__}"
            )
        if tower_name == "vision" and not isinstance(tower.positional_embedding, nn.Parameter):
            raise ValueError("model.init with a vision tower needs model.pos_embed=learned (ours is sincos)")
        tcfg = configs[tower_name]
        _check_arch(tower_name, tower, tcfg)
        if tcfg.hidden_act not in ("gelu", "quick_gelu"):
            raise ValueError(
                f"{tower_name}_config.hidden_act={tcfg.hidden_act!r}: only gelu and quick_gelu run here"
            )
        activations[tower_name] = (tower, tcfg.hidden_act)
        for name, value in from_hf_state(hf_state, tower_name, len(tower.transformer.resblocks)).items():
            target = params[name]
            if name.endswith("positional_embedding"):
                value = _fit_positions(name, value, target, tower)
            if value.shape != target.shape:
                raise ValueError(
                    f"{name}: the Hugging Face checkpoint's tensor has shape {tuple(value.shape)}, "
                    f"ours {tuple(target.shape)}"
                )
            updates[name] = value
    with torch.no_grad():
        for name, value in updates.items():
            params[name].copy_(value)
    for tower, hidden_act in activations.values():
        set_activation(tower, hidden_act)
