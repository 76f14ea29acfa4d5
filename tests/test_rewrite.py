"""Caption tools (LaCLIP rewrites, VeCLIP fusion): the prompt builder and output parsing on their own,
the resumable store, and the jobs and ``fastclip-rewrite`` end to end with a tiny randomly initialised
causal LM built here (no weights needed)."""

import json
import random

import pytest

transformers = pytest.importorskip("transformers")

from training.rewrite import (  # noqa: E402
    STYLES,
    LocalLM,
    ResultStore,
    caption_images,
    export_aligned,
    fuse_captions,
    fusion_prompt,
    parse_completion,
    rewrite_captions,
    rewrite_prompt,
)
from training.rewrite.cli import main as rewrite_main  # noqa: E402
from training.rewrite.prompts import REWRITE_EXAMPLES  # noqa: E402


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_lm")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["a dog runs on grass => a brown dog\n"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(path)
    config = GPT2Config(vocab_size=len(fast), n_positions=512, n_embd=32, n_layer=1, n_head=2, eos_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(path)
    return LocalLM(str(path))


class CountingLM:
    """Wraps an LM: counts prompts, and fails on call ``fail_at`` (an interruption)."""

    def __init__(self, lm, fail_at=None):
        self.lm, self.fail_at, self.calls, self.prompts = lm, fail_at, 0, []

    def complete(self, prompts, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        self.prompts += prompts
        return self.lm.complete(prompts, **kw)


def test_rewrite_prompt_format():
    p = rewrite_prompt("a  dog\nruns", "concise", random.Random(0))
    lines = p.split("\n")
    assert len(lines) == 5 and lines[-1] == "a dog runs =>"
    pairs = [tuple(line.split(" => ")) for line in lines[1:4]]
    assert len(set(pairs)) == 3 and all(pair in REWRITE_EXAMPLES["concise"] for pair in pairs)
    assert rewrite_prompt("x y", "casual", random.Random(5)) == rewrite_prompt(
        "x y", "casual", random.Random(5)
    )
    assert fusion_prompt("JY-AYA", "a plane", random.Random(0)).endswith("JY-AYA | a plane =>")
    with pytest.raises(ValueError, match="caption must be a non-empty string"):
        rewrite_prompt("  ", "concise", random.Random(0))
    with pytest.raises(ValueError, match="style must be one of"):
        rewrite_prompt("a dog", "poetic", random.Random(0))
    with pytest.raises(ValueError, match="visual_caption"):
        fusion_prompt("alt", "", random.Random(0))


@pytest.mark.parametrize(
    "generated,want",
    [(" a dog on a lawn\nnext => line", "a dog on a lawn"), ("\n\n  \"two cats\"  ", "two cats"),
     (" a cat => a dog", "a cat"), ("", ""), ("\n => x", "")],
)  # fmt: skip
def test_parse_completion(generated, want):
    assert parse_completion(generated) == want


def test_store_resumes_and_never_stores_twice(tmp_path):
    path = tmp_path / "r.jsonl"
    store = ResultStore(path)
    store.add([(0, 0, "a"), (0, 1, "b")])
    with open(path, "a") as f:
        f.write('{"row": 1, "k": 0, "te')  # a torn line from a kill mid-write
    again = ResultStore(path)
    assert again.done() == {(0, 0), (0, 1)} and again.get(0, 1) == "b"
    with pytest.raises(ValueError, match="already stored"):
        again.add([(0, 0, "c")])
    again.add([(1, 0, "d")])
    assert [json.loads(line)["text"] for line in open(path)] == ["a", "b", "d"]


def test_rewrite_job_is_resumable_and_exports_aligned_files(tiny_lm, tmp_path):
    captions = ["a dog runs on grass", "two kids play", "a red bus", "a cat sleeps", "boats at sea"]
    path = tmp_path / "rw.jsonl"
    interrupted = CountingLM(tiny_lm, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        rewrite_captions(captions, interrupted, path, num_rewrites=2, batch_size=3, max_new_tokens=8)
    assert len(ResultStore(path)) == 6  # two batches landed
    resumed = CountingLM(tiny_lm)
    store = rewrite_captions(captions, resumed, path, num_rewrites=2, batch_size=3, max_new_tokens=8)
    assert len(resumed.prompts) == 4 and len(store) == 10
    rows = [(json.loads(line)["row"], json.loads(line)["k"]) for line in open(path)]
    assert sorted(rows) == [(r, k) for r in range(5) for k in range(2)], "each item exactly once"
    assert [p.rsplit("\n", 1)[1] for p in resumed.prompts] == ["a cat sleeps =>"] * 2 + [
        "boats at sea =>"
    ] * 2
    for prompt, style in zip(resumed.prompts, [STYLES[0], STYLES[1]] * 2, strict=True):  # rewrite k: style k
        assert all(tuple(line.split(" => ")) in REWRITE_EXAMPLES[style] for line in prompt.split("\n")[1:-1])
    paths = export_aligned(store, captions, tmp_path / "out", num_outputs=2)
    lines = [open(p).read().splitlines() for p in paths]
    assert lines[0] == captions and all(len(col) == 5 and all(col) for col in lines)
    with pytest.raises(ValueError, match="non-empty strings; empty at rows \\[1\\]"):
        rewrite_captions(["ok", ""], tiny_lm, tmp_path / "bad.jsonl")


def test_fusion_and_captioning_jobs(tiny_lm, tmp_path):
    alt, visual = ["JY-AYA airbus", "IMG_1.jpg", "sale"], ["a plane on a runway", "a sandwich", " "]
    store = fuse_captions(alt, visual, CountingLM(tiny_lm), tmp_path / "f.jsonl", max_new_tokens=6)
    assert len(store) == 3 and store.get(2, 0) == "sale", "no visual caption: the alt-text stays"
    with pytest.raises(ValueError, match="differ in length"):
        fuse_captions(alt, visual[:2], tiny_lm, tmp_path / "g.jsonl")
    seen = []

    def captioner(images):
        seen.extend(images)
        return [f"image {img}" for img in images]

    store = caption_images(range(5), captioner, tmp_path / "v.jsonl", batch_size=2, decode=lambda x: x * 10)
    assert [store.get(i, 0) for i in range(5)] == [f"image {10 * i}" for i in range(5)]
    caption_images(range(5), captioner, tmp_path / "v.jsonl", batch_size=2)
    assert len(seen) == 5, "done rows are neither decoded nor captioned again"


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor in the Hugging Face cache"):
        LocalLM(str(tmp_path / "no-such-model"))


def test_cli_rewrites_shards_for_laclip_sampling(tiny_lm, tmp_path):
    import torch

    from training.data.datasets import write_shards

    class Items:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.full((3, 8, 8), 40 * i, dtype=torch.uint8), [f"a red square {i}"], i

    write_shards(Items(), tmp_path / "src", shard_size=2)
    model_dir = tiny_lm.model_path
    out = tmp_path / "laclip"
    argv = ["rewrite", "--shards", str(tmp_path / "src" / "shard-{000000..000001}.tar"), "--model", model_dir,
            "--out", str(out), "--num-rewrites", "3", "--max-new-tokens", "6", "--batch-size", "5"]  # fmt: skip
    assert rewrite_main(argv) == 0
    assert rewrite_main(argv) == 0  # a rerun finds everything done
    assert sum(1 for _ in open(out / "rewrites.jsonl")) == 12
    from training.data.stream import ShardStream

    stream = ShardStream(str(out / "shards" / "shard-{000000..000001}.tar"))
    samples = {idx: caps for _, (_, caps, idx) in zip(range(4), stream, strict=False)}
    assert sorted(samples) == [0, 1, 2, 3]
    assert all(len(caps) == 4 and caps[0] == f"a red square {i}" for i, caps in samples.items())


def test_transformers_captioner_with_a_tiny_random_model(tmp_path):
    """VeCLIP's pluggable captioner over a local image-to-text model (ViT encoder + GPT-2 decoder)."""
    import transformers as hf
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers

    from training.rewrite import PipelineCaptioner

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", "a", "dog", "cat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                               eos_token="</s>").save_pretrained(tmp_path)  # fmt: skip
    encoder = hf.ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64)  # fmt: skip
    decoder = hf.GPT2Config(vocab_size=7, n_embd=32, n_layer=1, n_head=2, add_cross_attention=True, is_decoder=True,
                            bos_token_id=2, eos_token_id=3, pad_token_id=0)  # fmt: skip
    config = hf.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 2, 0, 3
    model = hf.VisionEncoderDecoderModel(config)
    model.generation_config.decoder_start_token_id, model.generation_config.pad_token_id = 2, 0
    model.save_pretrained(tmp_path)
    hf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    captioner = PipelineCaptioner(str(tmp_path), max_new_tokens=4)
    images = [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("L", (20, 20))]
    texts = captioner(images)
    assert len(texts) == 2 and all(
        isinstance(t, str) and set(t.split()) <= {"a", "dog", "cat"} for t in texts
    )
    store = caption_images(images, captioner, tmp_path / "v.jsonl")
    assert len(store) == 2
    with pytest.raises(FileNotFoundError, match="captioner model"):
        PipelineCaptioner(str(tmp_path / "missing"))
