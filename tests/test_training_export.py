"""Export to Hugging Face / open_clip and import from Hugging Face (training.export, training.hf_convert).

Every HF model here is a tiny randomly initialised ``transformers.CLIPModel`` built in the test: no
download, no network. open_clip is not installed (it needs torchvision): its format is checked against
the parameter names and shapes that open_clip's ``CLIP`` (v3.x, standard ViT + text transformer) has
for the written model config, listed here from its architecture rules.
"""

import json
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoTokenizer, CLIPConfig, CLIPModel  # noqa: E402

from fastclip_kernels.models.packed import PackedTextTransformer, PackedViT  # noqa: E402
from fastclip_kernels.ops.patch_embed import interpolate_pos_embed  # noqa: E402
from training.config import parse_args  # noqa: E402
from training.export import eot_last_permutation, export_hf, export_open_clip, load_run, main  # noqa: E402
from training.hf_convert import QuickGELU, init_from_hf, tower_activation  # noqa: E402
from training.model import CLIP, build_model  # noqa: E402
from training.tokenizer import CaptionTokenizer  # noqa: E402

CAPTIONS = ["a red dog runs on the grass", "two blue cats sleep on a bed", "a man rides a green bike"] * 4
TEXTS = ["a red cat sleeps", "two dogs ride a blue bike on the green grass by a man", "a bed"]
W, LAYERS, HEADS, DIM, CTX = 32, 2, 2, 24, 12


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer.train(CAPTIONS, vocab_size=60, min_frequency=1)


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values everywhere (LN gains and biases too), so a swapped or missing tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _ours(vocab: int, image_size: int = 32, pos_embed: str = "learned", seed: int = 0, **kw) -> CLIP:
    torch.manual_seed(seed)
    visual = PackedViT(image_size, 8, W, LAYERS, HEADS, DIM, pos_embed=pos_embed)
    text = PackedTextTransformer(vocab, CTX, W, LAYERS, HEADS, DIM)
    return _perturb(CLIP(visual, text, **kw), seed)


def _hf_config(vocab: int, image_size: int = 32, act: str = "gelu", ctx: int = CTX, **text_kw) -> CLIPConfig:
    common = dict(hidden_size=W, intermediate_size=4 * W, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  hidden_act=act, projection_dim=DIM)  # fmt: skip
    text = dict(common, vocab_size=vocab, max_position_embeddings=ctx, eos_token_id=vocab - 1, bos_token_id=1,
                pad_token_id=0, **text_kw)  # fmt: skip
    return CLIPConfig(text_config=text, vision_config=dict(common, image_size=image_size, patch_size=8),
                      projection_dim=DIM)  # fmt: skip


def _hf_folder(path, config: CLIPConfig, seed: int = 1) -> CLIPModel:
    torch.manual_seed(seed)
    model = _perturb(CLIPModel(config), seed)
    model.save_pretrained(path)
    return model


def _feat(out) -> torch.Tensor:
    """get_*_features: a tensor (transformers 4) or an output whose pooler_output is projected (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _hf_features(hf: CLIPModel, images, ids) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        img = _feat(hf.get_image_features(pixel_values=images))
        txt = _feat(hf.get_text_features(input_ids=ids, attention_mask=(ids != 0).long()))
    return img, txt


def _our_features(model: CLIP, images, ids, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.visual(images), model.text(ids, lengths=lengths)


# -- export to Hugging Face ------------------------------------------------------------------------
@pytest.mark.parametrize("pos_embed", ["learned", "sincos"])
def test_export_hf_features_equal_ours(tmp_path, tok, pos_embed):
    model = _ours(tok.vocab_size, pos_embed=pos_embed)
    export_hf(model, tok, str(tmp_path))
    hf = CLIPModel.from_pretrained(tmp_path).eval()
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    texts = [*TEXTS, f"a {tok.decode([tok.vocab_size - 1])}"]  # the token whose id EOT takes
    ids, lengths = tok.encode_batch(texts, CTX)
    assert (ids == tok.vocab_size - 1).any()
    enc = hf_tok(texts, padding="max_length", truncation=True, max_length=CTX, return_tensors="pt")
    perm = eot_last_permutation(tok.vocab_size, tok.eot_id)
    assert torch.equal(enc.input_ids, torch.where(ids == 0, 0, perm[ids]))  # our ids, EOT renumbered
    assert hf.config.text_config.eos_token_id == tok.vocab_size - 1 != 2
    images = torch.randn(4, 3, 32, 32)
    ours_img, ours_txt = _our_features(model, images, ids, lengths)
    with torch.no_grad():
        hf_img = _feat(hf.get_image_features(pixel_values=images))
        hf_txt = _feat(hf.get_text_features(**enc))
    assert _rel(hf_img, ours_img) < 1e-5 and _rel(hf_txt, ours_txt) < 1e-5
    model.double(), hf.double()
    ours_img, ours_txt = _our_features(model, images.double(), ids, lengths)
    with torch.no_grad():
        hf_img = _feat(hf.get_image_features(pixel_values=images.double()))
        hf_txt = _feat(hf.get_text_features(**enc))
    assert _rel(hf_img, ours_img) < 1e-12 and _rel(hf_txt, ours_txt) < 1e-12
    assert hf.logit_scale.item() == pytest.approx(model.temperature.theta.item())


def test_export_hf_folder_loads_offline(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export_hf(_ours(tok.vocab_size), tok, str(tmp_path))
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(tmp_path)
    assert proc.crop_size["height"] == 32 and proc.image_mean[0] == pytest.approx(0.48145466)
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"]
        == "PreTrainedTokenizerFast"
    )
    assert hf_tok.model_max_length == CTX and hf_tok.pad_token_id == 0
    assert hf_tok.decode(hf_tok("a red dog").input_ids, skip_special_tokens=True) == "a red dog"


# -- import from Hugging Face ----------------------------------------------------------------------
@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_import_hf_features_equal_theirs(tmp_path, tok, act):
    V = tok.vocab_size
    hf = _hf_folder(tmp_path, _hf_config(V, act=act))
    model = _ours(V, seed=5)
    init_from_hf(model, f"hf:{tmp_path}")
    assert tower_activation(model.visual) == tower_activation(model.text) == act
    ids = torch.randint(3, V - 1, (3, CTX))
    lengths = torch.tensor([CTX, 5, 2])
    for row, n in enumerate(lengths.tolist()):
        ids[row, n - 1], ids[row, n:] = V - 1, 0  # EOT (the config's eos id) at each caption's end
    images = torch.randn(3, 3, 32, 32)
    hf_img, hf_txt = _hf_features(hf, images, ids)
    ours_img, ours_txt = _our_features(model, images, ids, lengths)
    assert _rel(ours_img, hf_img) < 1e-5 and _rel(ours_txt, hf_txt) < 1e-5


def test_import_interpolates_vision_positions_and_cuts_text_positions(tmp_path, tok):
    hf = _hf_folder(tmp_path, _hf_config(tok.vocab_size, image_size=32, ctx=CTX + 4))
    model = _ours(tok.vocab_size, image_size=48)  # grid 6x6 vs the checkpoint's 4x4
    init_from_hf(model, f"hf:{tmp_path}")
    table = hf.vision_model.embeddings.position_embedding.weight.detach()
    assert torch.equal(model.visual.positional_embedding.detach(), interpolate_pos_embed(table, (6, 6)))
    text_table = hf.text_model.embeddings.position_embedding.weight.detach()
    assert torch.equal(model.text.positional_embedding.detach(), text_table[:CTX])


def test_import_one_tower_leaves_the_other(tmp_path, tok):
    hf = _hf_folder(tmp_path, _hf_config(tok.vocab_size, act="quick_gelu"))
    model = _ours(tok.vocab_size)
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    init_from_hf(model, f"hf-vision:{tmp_path}")
    assert all(torch.equal(v, model.text.state_dict()[k]) for k, v in text_before.items())
    assert tower_activation(model.text) == "gelu" and tower_activation(model.visual) == "quick_gelu"
    hf_img, _ = _hf_features(hf, torch.ones(1, 3, 32, 32), torch.tensor([[1, tok.vocab_size - 1]]))
    assert _rel(model.visual(torch.ones(1, 3, 32, 32)).detach(), hf_img) < 1e-5


def test_round_trip_hf_is_exact(tmp_path, tok):
    model = _ours(tok.vocab_size, seed=0)
    for block in model.visual.transformer.resblocks:
        block.mlp.gelu = QuickGELU()
    export_hf(model, tok, str(tmp_path))
    back = _ours(tok.vocab_size, seed=7)
    init_from_hf(back, f"hf:{tmp_path}")
    perm = eot_last_permutation(tok.vocab_size, tok.eot_id)
    for name, value in model.state_dict().items():
        got = back.state_dict()[name]
        if name == "text.token_embedding.weight":
            got = got[perm]  # the exported vocabulary has EOT renumbered
        if name != "temperature.theta":
            assert torch.equal(got, value), name
    assert tower_activation(back.visual) == "quick_gelu" and tower_activation(back.text) == "gelu"


# -- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(vocab=61), "text.token_embedding.weight"),
        (dict(heads=4), "num_attention_heads"),
        (dict(width=48), "visual.conv1.weight"),
    ],
)
def test_import_mismatch_names_the_parameter(tmp_path, tok, change, message):
    cfg = _hf_config(change.get("vocab", tok.vocab_size))
    if "heads" in change:
        cfg.vision_config.num_attention_heads = change["heads"]
    if "width" in change:
        cfg.vision_config.hidden_size = change["width"]
    _hf_folder(tmp_path, cfg)
    model = _ours(tok.vocab_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        init_from_hf(model, f"hf:{tmp_path}")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing half-loaded


def test_import_bad_folders(tmp_path, tok):
    model = _ours(tok.vocab_size)
    with pytest.raises(ValueError, match="hf:DIR, hf-vision:DIR or hf-text:DIR"):
        init_from_hf(model, f"clip:{tmp_path}")
    with pytest.raises(ValueError, match="not found"):
        init_from_hf(model, f"hf:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="no config.json"):
        init_from_hf(model, f"hf:{tmp_path}")
    from transformers import BertConfig

    BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="not a CLIP"):
        init_from_hf(model, f"hf:{tmp_path / 'bert'}")
    _hf_config(tok.vocab_size).save_pretrained(tmp_path / "noweights")
    with pytest.raises(ValueError, match="no model.safetensors"):
        init_from_hf(model, f"hf:{tmp_path / 'noweights'}")


def test_export_refusals(tmp_path, tok):
    model = _ours(tok.vocab_size)
    model.visual.conv1.bias = torch.nn.Parameter(torch.zeros(W))
    with pytest.raises(ValueError, match="patch_bias"):
        export_hf(model, tok, str(tmp_path))
    model = _ours(tok.vocab_size)
    model.text.transformer.resblocks[0].mlp.gelu = QuickGELU()
    with pytest.raises(ValueError, match="one activation"):
        export_open_clip(model, tok, str(tmp_path))


# -- open_clip -------------------------------------------------------------------------------------
def _open_clip_expected_shapes(cfg: dict) -> dict[str, tuple]:
    """open_clip CLIP's state-dict names -> shapes for a model_cfg (standard VisionTransformer with a
    learnable position table, class token, ln_pre/ln_post and proj; TextTransformer with linear
    projection and no bias; nn.MultiheadAttention blocks with c_fc/c_proj MLPs)."""
    v, t, E = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]

    def blocks(prefix, width, layers, ratio):
        hidden, out = int(width * ratio), {}
        for i in range(layers):
            p = f"{prefix}transformer.resblocks.{i}."
            out |= {p + "ln_1.weight": (width,), p + "ln_1.bias": (width,), p + "ln_2.weight": (width,),
                    p + "ln_2.bias": (width,), p + "attn.in_proj_weight": (3 * width, width),
                    p + "attn.in_proj_bias": (3 * width,), p + "attn.out_proj.weight": (width, width),
                    p + "attn.out_proj.bias": (width,), p + "mlp.c_fc.weight": (hidden, width),
                    p + "mlp.c_fc.bias": (hidden,), p + "mlp.c_proj.weight": (width, hidden),
                    p + "mlp.c_proj.bias": (width,)}  # fmt: skip
        return out

    vw, grid = v["width"], v["image_size"] // v["patch_size"]
    shapes = {"visual.conv1.weight": (vw, 3, v["patch_size"], v["patch_size"]), "visual.class_embedding": (vw,),
              "visual.positional_embedding": (grid * grid + 1, vw), "visual.ln_pre.weight": (vw,),
              "visual.ln_pre.bias": (vw,), "visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,),
              "visual.proj": (vw, E), "token_embedding.weight": (t["vocab_size"], t["width"]),
              "positional_embedding": (t["context_length"], t["width"]), "ln_final.weight": (t["width"],),
              "ln_final.bias": (t["width"],), "text_projection": (t["width"], E), "logit_scale": ()}  # fmt: skip
    shapes |= blocks("visual.", vw, v["layers"], v.get("mlp_ratio", 4.0))
    shapes |= blocks("", t["width"], t["layers"], t.get("mlp_ratio", 4.0))
    if "init_logit_bias" in cfg:
        shapes["logit_bias"] = ()
    return shapes


@pytest.mark.parametrize("siglip", [False, True])
def test_export_open_clip_names_shapes_and_config(tmp_path, tok, siglip):
    model = _ours(tok.vocab_size, **({"logit_bias_init": -10.0} if siglip else {}))
    export_open_clip(model, tok, str(tmp_path))
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    cfg = config["model_cfg"]
    assert cfg["vision_cfg"]["width"] // cfg["vision_cfg"]["head_width"] == HEADS == cfg["text_cfg"]["heads"]
    assert cfg["quick_gelu"] is False and cfg["text_cfg"]["hf_tokenizer_name"]
    assert config["preprocess_cfg"]["size"] == 32
    state = load_file(tmp_path / "open_clip_model.safetensors")
    assert {k: tuple(v.shape) for k, v in state.items()} == _open_clip_expected_shapes(cfg)
    assert torch.equal(state["visual.proj"], model.visual.proj.detach())
    assert torch.equal(state["transformer.resblocks.1.attn.in_proj_weight"],
                       model.text.transformer.resblocks[1].attn.in_proj_weight.detach())  # fmt: skip
    # open_clip pools text at argmax(ids): with EOT renumbered to the top id that is our EOT row.
    ids = AutoTokenizer.from_pretrained(tmp_path)(
        TEXTS, padding="max_length", truncation=True, max_length=CTX, return_tensors="pt"
    ).input_ids
    _, lengths = tok.encode_batch(TEXTS, CTX)
    assert torch.equal(ids.argmax(-1), lengths - 1)
    emb = state["token_embedding.weight"]
    assert torch.equal(emb[ids[:, 0]], model.text.token_embedding.weight.detach()[tok.sot_id].expand(3, -1))
    assert torch.equal(emb[-1], model.text.token_embedding.weight.detach()[tok.eot_id])


# -- the command line on a run directory -------------------------------------------------------------
def _fake_run(run_dir, tok, *extra) -> CLIP:
    """A run directory as training.train leaves it (config.json, tokenizer.json, latest.pt['model'])."""
    cfg = parse_args(["--preset", "demo", "--data.context_length", str(CTX), "--data.image_size", "32",
                      "--run.output_dir", str(run_dir.parent), "--run.name", run_dir.name, *extra])  # fmt: skip
    os.makedirs(run_dir, exist_ok=True)
    cfg.save(run_dir / "config.json")
    tok.save(run_dir / "tokenizer.json")
    model = _perturb(build_model(cfg, tok.vocab_size))
    torch.save({"model": model.state_dict(), "step": 1}, run_dir / "latest.pt")
    return model


def test_cli_exports_a_run(tmp_path, tok, capsys):
    model = _fake_run(tmp_path / "run", tok)
    assert main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert main([str(tmp_path / "run"), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    hf = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(_feat(hf.get_image_features(pixel_values=images)), model.visual(images)) < 1e-5
    assert main([str(tmp_path / "nope"), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_load_run_at_a_stage1_grid(tmp_path, tok):
    model = _fake_run(tmp_path / "run", tok)
    model.visual.resize_pos_embed(16)  # CLIPA resize stage 1: the checkpoint is at a 2x2 grid
    torch.save({"model": model.state_dict()}, tmp_path / "run" / "stage1.pt")
    loaded, _, _ = load_run(str(tmp_path / "run"), str(tmp_path / "run" / "stage1.pt"))
    assert loaded.visual.image_size == (16, 16)
    assert torch.equal(loaded.visual.positional_embedding, model.visual.positional_embedding)


def test_model_init_from_the_command_line(tmp_path, tok, monkeypatch):
    import training.config as config_module

    hf = _hf_folder(tmp_path / "hf", _hf_config(tok.vocab_size, act="quick_gelu"))
    monkeypatch.setitem(config_module.MODEL_SIZES, "tiny", (W, LAYERS, HEADS, 8, W, LAYERS, HEADS, DIM))
    argv = ["--data.context_length", str(CTX), "--data.image_size", "32"]
    cfg = parse_args([*argv, "--model.init", f"hf-vision:{tmp_path / 'hf'}"])
    model = build_model(cfg, tok.vocab_size).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = _feat(hf.get_image_features(pixel_values=images))
        assert _rel(model.visual(images), expected) < 1e-5
    assert F.cosine_similarity(model.encode_image(images), F.normalize(expected, dim=-1)).min() > 0.9999
    cfg = parse_args([*argv, "--model.init", f"hf:{tmp_path / 'hf'}", "--model.size", "small"])
    with pytest.raises(ValueError, match="num_attention_heads|num_hidden_layers"):
        build_model(cfg, tok.vocab_size)


def test_exported_folder_starts_a_run_with_its_tokenizer(tmp_path, tok, monkeypatch):
    """hf:DIR + data.tokenizer DIR/tokenizer.json: the new run's towers give the exported model's features."""
    import training.config as config_module

    monkeypatch.setitem(config_module.MODEL_SIZES, "tiny", (W, LAYERS, HEADS, 8, W, LAYERS, HEADS, DIM))
    model = _ours(tok.vocab_size)
    export_hf(model, tok, str(tmp_path / "hf"))
    cfg = parse_args(["--data.context_length", str(CTX), "--data.image_size", "32", "--model.init",
                      f"hf:{tmp_path / 'hf'}", "--data.tokenizer", str(tmp_path / "hf" / "tokenizer.json")])  # fmt: skip
    new_tok = CaptionTokenizer.load(cfg.data_tokenizer)
    assert new_tok.eot_id == tok.vocab_size - 1
    started = build_model(cfg, new_tok.vocab_size).eval()
    ids, lengths = tok.encode_batch(TEXTS, CTX)
    new_ids, new_lengths = new_tok.encode_batch(TEXTS, CTX)
    assert torch.equal(new_lengths, lengths)
    with torch.no_grad():
        assert _rel(started.text(new_ids, lengths=new_lengths), model.text(ids, lengths=lengths)) < 1e-5


def test_import_a_vision_only_folder(tmp_path, tok):
    """CLIPVisionModelWithProjection (e.g. a saved LLM2CLIP vision encoder) feeds hf-vision:, not hf:."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(3)
    hf = _perturb(
        CLIPVisionModelWithProjection(_hf_config(tok.vocab_size, act="quick_gelu").vision_config), 3
    )
    hf.save_pretrained(tmp_path)
    model = _ours(tok.vocab_size)
    with pytest.raises(ValueError, match="holds only a vision tower"):
        init_from_hf(model, f"hf:{tmp_path}")
    init_from_hf(model, f"hf-vision:{tmp_path}")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel(model.visual(images), hf(pixel_values=images).image_embeds) < 1e-5
