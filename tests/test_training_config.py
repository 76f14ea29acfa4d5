"""Training config (presets, CLI, JSON) and the caption tokenizer. CPU only, a few seconds."""

import dataclasses
import typing

import pytest
import torch

pytest.importorskip("tokenizers")

from training.config import (  # noqa: E402
    CHOICES,
    PRESETS,
    ConfigError,
    TrainConfig,
    format_help,
    get_preset,
    parse_args,
)
from training.tokenizer import CaptionTokenizer  # noqa: E402

CAPTIONS = [
    "a dog runs on the green grass",
    "two cats sleep on a red sofa",
    "a man rides a bike down the street",
    "a little girl plays with a ball in the park",
    "the brown dog jumps over a fence",
    "people walk along the beach at sunset",
] * 10


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer.train(CAPTIONS, vocab_size=300, min_frequency=1)


# -- tokenizer --------------------------------------------------------------------------------------
def test_special_ids_and_vocab(tok):
    assert (tok.pad_id, tok.sot_id, tok.eot_id, tok.unk_id) == (0, 1, 2, 3)
    vocab = tok.vocab()
    assert len(vocab) == tok.vocab_size
    assert vocab[:4] == ["<pad>", "<sot>", "<eot>", "<unk>"]
    assert all(vocab), "every id has a token string"


def test_encode_layout_and_round_trip(tok):
    texts = ["a dog runs on the grass", "two cats", "A Man Rides A Bike"]
    ids, lengths = tok.encode_batch(texts, context_length=16)
    assert ids.shape == (3, 16) and ids.dtype == torch.int64 and lengths.dtype == torch.int64
    for row, n, text in zip(ids, lengths.tolist(), texts, strict=True):
        assert row[0] == tok.sot_id and row[n - 1] == tok.eot_id
        assert (row[n:] == 0).all() and (row[1 : n - 1] > 3).all()
        assert tok.decode(row) == text.lower()


def test_truncation_keeps_eot(tok):
    long = " ".join(CAPTIONS[:4])
    for L in (2, 3, 5, 8):
        ids, lengths = tok.encode_batch([long, "a dog"], context_length=L)
        assert ids.shape == (2, L) and lengths[0] == L
        assert ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
        assert (ids[0, 1:-1] != tok.eot_id).all()
    full, _ = tok.encode_batch([long], context_length=64)
    assert torch.equal(ids[0, 1:-1], full[0, 1 : L - 1]), "truncation keeps the first tokens"
    with pytest.raises(ValueError, match="context_length"):
        tok.encode_batch(["a"], context_length=1)


def test_unknown_characters_and_empty(tok):
    ids, lengths = tok.encode_batch(["a zebra!", ""], context_length=8)
    assert (ids[0] == tok.unk_id).any()
    assert lengths[1] == 2 and ids[1, :2].tolist() == [tok.sot_id, tok.eot_id]


def test_save_load_equal(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    other = CaptionTokenizer.load(path)
    assert other.vocab() == tok.vocab()
    a, la = tok.encode_batch(CAPTIONS[:6], 12)
    b, lb = other.encode_batch(CAPTIONS[:6], 12)
    assert torch.equal(a, b) and torch.equal(la, lb)
    with pytest.raises(ValueError, match="sot"):
        CaptionTokenizer.from_file(path, sot="<|startoftext|>")
    with pytest.raises(FileNotFoundError):
        CaptionTokenizer.from_file(tmp_path / "missing.json")


# -- config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_validate(name):
    cfg = get_preset(name).validate()
    assert cfg.run_name == name


def test_paper_recipes():
    cc3m, laion = get_preset("cc3m-b16"), get_preset("laion-b16")
    assert (cc3m.loss_rho, cc3m.loss_gamma_min, cc3m.loss_gamma_decay_epochs, cc3m.optim_lr) == (
        6.5,
        0.2,
        18,
        1e-3,
    )
    assert (laion.loss_rho, laion.loss_gamma_min, laion.optim_min_lr, laion.train_batch_size) == (
        16.0,
        0.8,
        4e-5,
        5120,
    )
    for cfg in (cc3m, laion):
        assert cfg.model_size == "B/16" and cfg.clipa_stage2_epochs > 0 and cfg.clipa_image_strategy != "none"


def test_cli_overrides_every_type():
    cfg = parse_args(
        ["--preset", "flickr8k", "--optim.lr", "5e-4", "--train_compile", "true", "--optim-betas", "0.9,0.95",
         "--model.output_dim", "none", "--clipa.stage2_lr=1e-5", "--train.batch_size", "64",
         "--loss.mode", "clip", "--log.tensorboard", "--data.root", "/data", "--train.max_steps", "7"]
    )  # fmt: skip
    assert cfg.optim_lr == 5e-4 and cfg.train_compile is True and cfg.log_tensorboard is True
    assert cfg.optim_betas == (0.9, 0.95) and cfg.model_output_dim is None and cfg.clipa_stage2_lr == 1e-5
    assert cfg.train_batch_size == 64 and cfg.loss_mode == "clip" and cfg.train_max_steps == 7
    assert cfg.resolve("flickr8k") == "/data/flickr8k" and cfg.data_kind == "flickr8k"
    assert parse_args(["--train.compile", "false"]).train_compile is False
    assert parse_args([]) == get_preset("demo")


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--optim.learning_rate", "1"], "optim.learning_rate"),
        (["--optim.lr", "fast"], "optim_lr"),
        (["--train.batch_size", "1.5"], "train_batch_size"),
        (["--train.compile", "maybe"], "train_compile"),
        (["--optim.betas", "0.9"], "optim_betas"),
        (["--loss.mode", "triplet"], "loss_mode"),
        (["--train.batch_size", "1"], "train_batch_size"),
        (["--clipa.image_keep", "0"], "clipa_image_keep"),
        (["--clipa.image_keep", "1.5"], "clipa_image_keep"),
        (["--loss.mode", "siglip", "--loss.rho", "3"], "loss_rho"),
        (["--clipa.text_strategy", "syntax", "--clipa.text_length", "40"], "clipa_text_length"),
        (["--data.kind", "csv"], "data_path"),
        (["--preset", "nope"], "nope"),
        (["--optim.lr"], "optim_lr"),
    ],
)
def test_cli_errors_name_the_field(argv, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"[._]")):
        parse_args(argv)


def test_json_round_trip(tmp_path):
    cfg = parse_args(["--preset", "laion-b16", "--optim.betas", "0.9,0.95", "--model.output_dim", "640"])
    path = tmp_path / "config.json"
    cfg.save(path)
    assert TrainConfig.load(path) == cfg
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="bogus"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="train_batch_size"):
        TrainConfig.from_dict({"train_batch_size": "many"})


def test_help_documents_every_field(capsys):
    text = format_help()
    for f in dataclasses.fields(TrainConfig):
        head, rest = f.name.split("_", 1)
        assert f"--{head}.{rest}" in text and f.metadata["help"] in text
    for name, values in CHOICES.items():
        assert name in typing.get_type_hints(TrainConfig) and "|".join(values) in text
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0 and "--loss.rho" in capsys.readouterr().out


def test_model_dims():
    dims = get_preset("laion-b16").model_dims()
    assert (dims["vision_width"], dims["patch_size"], dims["output_dim"]) == (768, 16, 512)
    assert parse_args(["--model.output_dim", "64"]).model_dims()["output_dim"] == 64
