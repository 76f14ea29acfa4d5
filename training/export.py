"""Export a run's model to Hugging Face ``transformers`` or open_clip format.

    python -m training.export RUN_DIR --format hf --out DIR         # CLIPModel + tokenizer + processor
    python -m training.export RUN_DIR --format open_clip --out DIR  # open_clip "local-dir:" folder

RUN_DIR holds ``config.json``, ``tokenizer.json`` (or the config's ``data.tokenizer``) and a checkpoint
(``latest.pt``, or ``--checkpoint PATH``). Both formats write our tokenizer as a fast tokenizer folder
(``AutoTokenizer.from_pretrained(DIR)``) with one change: the EOT token gets the highest id (swapped with
the token that had it, rows of the token embedding swapped alike). HF CLIP pools the *first* EOT
position unless ``eos_token_id == 2`` (then the highest id); open_clip pools the highest id; ours pools
the last token of each caption, which is the EOT. With EOT at the top id all three pool the same token.

In an open_clip environment (open_clip_torch >= 3.0, for the ``local-dir:`` schema)::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")
    tokenizer = open_clip.get_tokenizer("local-dir:DIR")
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .config import TrainConfig
from .data.datasets import CLIP_MEAN, CLIP_STD
from .hf_convert import to_hf_state, tower_activation
from .model import CLIP, build_model
from .tokenizer import CaptionTokenizer

__all__ = ["eot_last_permutation", "export_hf", "export_open_clip", "load_run", "main"]


# -- the run -------------------------------------------------------------------------------------
def load_run(run_dir: str, checkpoint: str | None = None) -> tuple[CLIP, CaptionTokenizer, TrainConfig]:
    """(model in eval mode on CPU, tokenizer, config) of a training run directory."""
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{run_dir!r} has no config.json: not a run directory of training.train")
    cfg = TrainConfig.load(cfg_path)
    if cfg.model_text_tower != "transformer":
        raise ValueError(
            f"model.text_tower={cfg.model_text_tower!r}: only the transformer text tower exports"
        )
    tok_path = cfg.data_tokenizer or os.path.join(run_dir, "tokenizer.json")
    ckpt = checkpoint or os.path.join(run_dir, "latest.pt")
    for what, path in (("tokenizer", tok_path), ("checkpoint", ckpt)):
        if not os.path.isfile(path):
            raise ValueError(f"{what} not found: {path!r}")
    tok = CaptionTokenizer.load(tok_path)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    model = build_model(cfg, tok.vocab_size)
    rows = state["visual.positional_embedding"].shape[0]  # a stage-1 checkpoint may be at a smaller grid
    if rows != model.visual.positional_embedding.shape[0]:
        side = round((rows - 1) ** 0.5) * model.visual.patch_size
        model.visual.resize_pos_embed(side)
    model.load_state_dict(state)
    return model.eval(), tok, cfg


# -- tokenizer -----------------------------------------------------------------------------------
def eot_last_permutation(vocab_size: int, eot_id: int) -> torch.Tensor:
    """perm [V] int64: new id of each old id; swaps ``eot_id`` with ``vocab_size - 1``."""
    perm = torch.arange(vocab_size)
    perm[eot_id], perm[vocab_size - 1] = vocab_size - 1, eot_id
    return perm


def _export_tokenizer(tok: CaptionTokenizer, out: str, context_length: int, perm: torch.Tensor) -> dict:
    """Write a fast tokenizer folder with ids renumbered by ``perm``; returns the special-token names."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    data = json.loads(tok._tok.to_str())
    data["model"]["vocab"] = {t: int(perm[i]) for t, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens", []):
        added["id"] = int(perm[added["id"]])
    data["padding"] = data["truncation"] = None
    fast = tokenizers.Tokenizer.from_str(json.dumps(data))
    names = {
        "bos_token": fast.id_to_token(int(perm[tok.sot_id])),
        "eos_token": fast.id_to_token(int(perm[tok.eot_id])),
        "pad_token": fast.id_to_token(int(perm[tok.pad_id])),
    }
    if tok.unk_id is not None:
        names["unk_token"] = fast.id_to_token(int(perm[tok.unk_id]))
    sot, eot = names["bos_token"], names["eos_token"]
    fast.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{sot} $A {eot}", special_tokens=[(sot, int(perm[tok.sot_id])), (eot, int(perm[tok.eot_id]))]
    )
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=fast, model_max_length=context_length, **names)
    hf_tok.save_pretrained(out)
    # The class name transformers 4 and 5 both load (5 writes its own "TokenizersBackend", unknown to 4).
    config_file = os.path.join(out, "tokenizer_config.json")
    with open(config_file) as fh:
        tok_config = json.load(fh)
    tok_config.pop("backend", None)
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(config_file, "w") as fh:
        json.dump(tok_config, fh, indent=2)
    return names


def _check_exportable(model: CLIP) -> None:
    vis, text = model.visual, model.text
    if not hasattr(text, "token_embedding"):
        raise ValueError(f"the text tower is {type(text).__name__}; only the transformer text tower exports")
    if vis.conv1.bias is not None:
        raise ValueError("a patch embedding with a bias (patch_bias=True) has no CLIP/open_clip equivalent")
    if vis.image_size[0] != vis.image_size[1]:
        raise ValueError(f"CLIP configs take square images; the vision tower is at {vis.image_size}")
    for name, tower in (("vision", vis), ("text", text)):
        eps = {m.eps for m in tower.modules() if isinstance(m, torch.nn.LayerNorm)}
        if len(eps) != 1:
            raise ValueError(f"the {name} tower mixes LayerNorm eps values {sorted(eps)}")


def _tower_dims(tower) -> dict:
    block = tower.transformer.resblocks[0]
    return dict(hidden_size=block.ln_1.normalized_shape[0], intermediate_size=block.mlp.c_fc.out_features,
                num_hidden_layers=len(tower.transformer.resblocks), num_attention_heads=block.attn.heads,
                hidden_act=tower_activation(tower), layer_norm_eps=block.ln_1.eps)  # fmt: skip


def _permuted_state(model: CLIP, perm: torch.Tensor) -> dict:
    state = dict(model.state_dict())
    emb = state["text.token_embedding.weight"]
    new = torch.empty_like(emb)
    new[perm] = emb
    state["text.token_embedding.weight"] = new
    return state


# -- Hugging Face --------------------------------------------------------------------------------
def hf_config(model: CLIP, perm: torch.Tensor, tok: CaptionTokenizer):
    """The ``transformers.CLIPConfig`` of ``model`` (token ids after ``perm``)."""
    from transformers import CLIPConfig

    vis, text, dim = model.visual, model.text, model.visual.output_dim
    vision_cfg = dict(_tower_dims(vis), image_size=vis.image_size[0], patch_size=vis.patch_size,
                      num_channels=3, projection_dim=dim)  # fmt: skip
    text_cfg = dict(_tower_dims(text), vocab_size=text.vocab_size, max_position_embeddings=text.context_length,
                    projection_dim=dim, pad_token_id=int(perm[tok.pad_id]), bos_token_id=int(perm[tok.sot_id]),
                    eos_token_id=int(perm[tok.eot_id]))  # fmt: skip
    theta = float(model.temperature.theta.detach())
    return CLIPConfig(
        text_config=text_cfg, vision_config=vision_cfg, projection_dim=dim, logit_scale_init_value=theta
    )


def export_hf(model: CLIP, tok: CaptionTokenizer, out: str) -> None:
    """Write ``model`` (and ``tok``) as a Hugging Face CLIP folder: config.json, model.safetensors,
    tokenizer files and preprocessor_config.json (CLIPImageProcessor with our mean/std). SigLIP's
    logit bias has no place in CLIPModel and is left out (the embeddings do not use it)."""
    from transformers import CLIPImageProcessor, CLIPModel

    _check_exportable(model)
    perm = eot_last_permutation(model.text.vocab_size, tok.eot_id)
    config = hf_config(model, perm, tok)
    blocks = (len(model.visual.transformer.resblocks), len(model.text.transformer.resblocks))
    state = to_hf_state(_permuted_state(model, perm), vision_layers=blocks[0], text_layers=blocks[1])
    hf_model = CLIPModel(config)
    hf_model.load_state_dict(state, strict=True)  # every tensor named and shaped as CLIPModel's
    os.makedirs(out, exist_ok=True)
    hf_model.save_pretrained(out)
    _export_tokenizer(tok, out, model.text.context_length, perm)
    side = model.visual.image_size[0]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                       image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(out)  # fmt: skip


# -- open_clip -----------------------------------------------------------------------------------
def open_clip_config(model: CLIP, pad_id: int = 0) -> dict:
    """open_clip's ``open_clip_config.json`` content: {"model_cfg": ..., "preprocess_cfg": ...}."""
    vis, text = model.visual, model.text
    acts = {tower_activation(vis), tower_activation(text)}
    if len(acts) != 1:
        raise ValueError(f"open_clip has one activation for both towers; ours are {sorted(acts)}")
    v, t = _tower_dims(vis), _tower_dims(text)
    if {v["layer_norm_eps"], t["layer_norm_eps"]} != {1e-5}:
        raise ValueError("open_clip's LayerNorm uses eps 1e-5; ours differs")
    model_cfg = {
        "embed_dim": vis.output_dim,
        "quick_gelu": acts == {"quick_gelu"},
        "vision_cfg": {"image_size": vis.image_size[0], "layers": v["num_hidden_layers"], "width": v["hidden_size"],
                       "head_width": v["hidden_size"] // v["num_attention_heads"], "patch_size": vis.patch_size,
                       "mlp_ratio": v["intermediate_size"] / v["hidden_size"]},
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": t["hidden_size"],
                     "heads": t["num_attention_heads"], "layers": t["num_hidden_layers"],
                     "mlp_ratio": t["intermediate_size"] / t["hidden_size"], "hf_tokenizer_name": "local-dir",
                     "pad_id": pad_id},
    }  # fmt: skip
    if model.logit_bias is not None:
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
    preprocess_cfg = {"size": vis.image_size[0], "mode": "RGB", "mean": list(CLIP_MEAN), "std": list(CLIP_STD),
                      "interpolation": "bicubic", "resize_mode": "shortest"}  # fmt: skip
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def open_clip_state(model: CLIP, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Our state dict under open_clip ``CLIP``'s names: ``visual.*`` as is, the text tower at the top
    level (``token_embedding``, ``positional_embedding``, ``transformer.*``, ``ln_final``,
    ``text_projection``), ``logit_scale`` (= theta) and, for SigLIP, ``logit_bias``."""
    out = {}
    for name, value in _permuted_state(model, perm).items():
        if name.startswith("visual."):
            out[name] = value
        elif name.startswith("text."):
            out[name[len("text.") :]] = value
        elif name == "temperature.theta":
            out["logit_scale"] = value.reshape(())
        elif name == "logit_bias":
            out[name] = value.reshape(())
        else:
            raise ValueError(f"no open_clip name for our tensor {name!r}")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def export_open_clip(model: CLIP, tok: CaptionTokenizer, out: str) -> None:
    """Write an open_clip ``local-dir:`` folder: open_clip_config.json, open_clip_model.safetensors and
    the tokenizer (open_clip's HFTokenizer loads it from the same folder)."""
    from safetensors.torch import save_file

    _check_exportable(model)
    perm = eot_last_permutation(model.text.vocab_size, tok.eot_id)
    config = open_clip_config(model, pad_id=int(perm[tok.pad_id]))
    os.makedirs(out, exist_ok=True)
    save_file(open_clip_state(model, perm), os.path.join(out, "open_clip_model.safetensors"))
    with open(os.path.join(out, "open_clip_config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    _export_tokenizer(tok, out, model.text.context_length, perm)


# -- command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="training run directory (config.json, tokenizer.json, latest.pt)")
    parser.add_argument("--format", choices=("hf", "open_clip"), required=True)
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (default RUN_DIR/latest.pt)")
    args = parser.parse_args(argv)
    try:
        model, tok, _ = load_run(args.run_dir, args.checkpoint)
        (export_hf if args.format == "hf" else export_open_clip)(model, tok, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} model to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
