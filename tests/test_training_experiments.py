"""The experiment runner: the paired bootstrap interval against a hand computation, and a tiny grid
(2 arms x 2 seeds, 2 steps each) end to end: runs, reports, and a rerun that skips finished runs."""

import json
import os

import pytest
import torch
from training_helpers import tiny_argv

from training import experiments as ex


def _parts(scores):
    """Per-image parts where image i's six recalls all equal... 1 or 0, giving score s_i; 1 caption each."""
    i2t, t2i = [], []
    for s in scores:  # s in {0, 0.5, 1}: i2t hits = (s >= 0.5), t2i hits = (s == 1)
        i2t.append([float(s >= 0.5)] * 3)
        t2i.append([float(s == 1)] * 3)
    return (
        torch.tensor(i2t, dtype=torch.float64),
        torch.tensor(t2i, dtype=torch.float64),
        torch.ones(len(scores), dtype=torch.float64),
    )


def test_contrast_interval_by_hand():
    parts = {("arm", 0): _parts([1, 0]), ("arm", 1): _parts([1, 0.5]),
             ("base", 0): _parts([0.5, 0]), ("base", 1): _parts([0, 0])}  # fmt: skip
    weights = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64)
    got = ex.contrast_interval(ex.difference("arm", "base"), parts, (0, 1), weights)
    # full set: arm 0.5, 0.75; base 0.25, 0 -> paired diffs 0.25, 0.75 -> 0.5
    # resamples: [2, 0] -> (1-0.5, 1-0) -> 0.75; [0, 2] -> (0-0, 0.5-0) -> 0.25; [1, 1] -> 0.5
    # percentiles (linear) of [0.25, 0.5, 0.75]: 2.5 % -> 0.25 + 0.05 * 0.25, 97.5 % -> 0.5 + 0.95 * 0.25
    assert got["mean"] == pytest.approx(0.5) and got["per_seed"] == pytest.approx({"0": 0.25, "1": 0.75})
    assert got["lo"] == pytest.approx(0.2625) and got["hi"] == pytest.approx(0.7375)
    assert got["seed_sd"] == pytest.approx(0.5**0.5 / 2) and got["verdict"] == "reproduces"
    flipped = ex.contrast_interval(ex.difference("base", "arm"), parts, (0, 1), weights)
    assert flipped["verdict"] == "opposite" and flipped["hi"] == pytest.approx(-0.2625)


def test_verdict_needs_every_seed_and_the_interval():
    assert ex.verdict([0.1, 0.2, 0.3], 0.01, 0.4) == "reproduces"
    assert ex.verdict([0.1, -0.01, 0.3], 0.01, 0.4) == "not shown"  # one seed disagrees
    assert ex.verdict([0.1, 0.2, 0.3], -0.01, 0.4) == "not shown"  # the interval includes 0
    assert ex.verdict([-0.1, -0.2, -0.3], -0.4, -0.01) == "opposite"


def test_contrast_formulas():
    s = {k: torch.tensor([v], dtype=torch.float64) for k, v in dict(a=0.4, b=0.3, c=0.2, d=0.25).items()}
    assert float(ex.difference("a", "b").value(s)) == pytest.approx(0.1)
    # (c - d) - (a - b) = -0.05 - 0.1
    assert float(ex.gap_growth("a", "b", "c", "d", "").value(s)) == pytest.approx(-0.15)
    # a / b - c / d = 4/3 - 0.8
    assert float(ex.share_gap("a", "b", "c", "d", "").value(s)) == pytest.approx(4 / 3 - 0.8)


def test_a_share_contrast_is_reported_in_points_of_share(tmp_path):
    """A difference of ratios is not in points of recall: its unit reaches the report, the table and the
    plot gets a panel of its own."""
    assert ex.difference("a", "b").unit == "pp" and ex.share_gap("a", "b", "c", "d", "").unit == "pp of share"
    gen = torch.Generator().manual_seed(0)

    def parts():
        return ((torch.rand(20, 3, generator=gen) < 0.3).double(), torch.randint(0, 3, (20, 3), generator=gen)
                .double(), torch.full((20,), 5.0, dtype=torch.float64))  # fmt: skip

    runs = {(a, s): parts() for a in "abcd" for s in (0, 1)}
    rows = [ex.contrast_interval(c, runs, (0, 1), ex.bootstrap_weights(20, samples=50))
            for c in (ex.difference("a", "b"), ex.share_gap("a", "b", "c", "d", "keeps"))]  # fmt: skip
    assert [r["unit"] for r in rows] == ["pp", "pp of share"]
    arms = [{"arm": a, "args": [], "seeds_done": [0, 1], "per_seed": {"0": 0.1, "1": 0.2}, "mean_recall": 0.15,
             "minutes_per_run": 1.0} for a in "abcd"]  # fmt: skip
    table = ex.markdown({"seeds": [0, 1], "arms": arms, "contrasts": rows}).splitlines()
    share_row = next(line for line in table if "a/b - c/d" in line)
    diff_row = next(line for line in table if "| a - b |" in line)
    assert "pp of share" in share_row and "pp of share" not in diff_row
    ex._plot({"experiment": "t", "arms": arms, "contrasts": rows}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_declared_experiments_parse():
    """Every arm of every declared experiment is a valid configuration; contrasts name real arms."""
    from training.config import parse_args

    for name, exp in ex.EXPERIMENTS.items():
        for extra in exp.arms.values():
            parse_args([*exp.base, *extra, "--run.seed", "0"])
        for c in exp.contrasts:
            assert set(c.arms) <= set(exp.arms), (name, c.name)


def test_per_image_score_matches_the_recalls():
    from training.evaluate import recall_at

    gen = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(12, 8, generator=gen), dim=1)
    owner = torch.arange(12).repeat_interleave(2)
    txt = torch.nn.functional.normalize(img[owner] + 0.9 * torch.randn(24, 8, generator=gen), dim=1)
    full = torch.ones(1, 12, dtype=torch.float64)
    got = float(ex.weighted_score(ex.per_image_score({"image": img, "text": txt, "owner": owner}), full))
    r = recall_at(img, txt, owner)
    want = sum(r[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6
    assert got == pytest.approx(want, abs=1e-7)  # recall_at averages in fp32
    w = ex.bootstrap_weights(12, samples=5)
    assert w.shape == (5, 12) and torch.all(w.sum(1) == 12)


def test_tiny_grid_runs_reports_and_resumes(tmp_path, monkeypatch):
    base = (*tiny_argv(64), "--train.max_steps", "2", "--log.progress_bar", "false")
    exp = ex.Experiment(base=base, arms={"a": ("--optim.lr", "1e-3"), "b": ("--optim.lr", "3e-3")},
                        seeds=(0, 1), contrasts=(ex.difference("b", "a"),))  # fmt: skip
    monkeypatch.setitem(ex.EXPERIMENTS, "tiny", exp)
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    first = ex.run("tiny", runs, results, arms=["a"], seeds=[0])  # one run of the grid
    assert first["contrasts"][0]["verdict"] == "pending" and first["arms"][0]["seeds_done"] == [0]
    rep = ex.run("tiny", runs, results)
    folder = tmp_path / "results" / "tiny"
    assert sorted(os.listdir(folder)) == ["a-s0.json", "a-s1.json", "b-s0.json", "b-s1.json", "report.json",
                                          "report.md", "report.png"]  # fmt: skip
    for row in rep["arms"]:
        for seed, score in row["per_seed"].items():
            with open(tmp_path / "runs" / "tiny" / f"{row['arm']}-s{seed}" / "metrics.json") as f:
                m = json.load(f)
            assert score == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) / 6)
    c = rep["contrasts"][0]
    assert c["lo"] <= c["mean"] <= c["hi"] and c["verdict"] in ("reproduces", "opposite", "not shown")
    assert "b - a" in (folder / "report.md").read_text()

    def no_training(cfg):
        raise AssertionError(f"finished run {cfg.run_name} trained again")

    again = ex.run("tiny", runs, results, train_fn=no_training)
    assert json.dumps(again) == json.dumps(rep)
    # the records alone reproduce the report (the run folders are not committed)
    import shutil

    shutil.rmtree(tmp_path / "runs")
    assert json.dumps(ex.run("tiny", runs, results, report_only=True)) == json.dumps(rep)
    with pytest.raises(ValueError, match="arms"):
        ex.run("tiny", runs, results, arms=["c"])

    # another experiment declaring a run of exactly this configuration reuses its record, seed by seed;
    # a new configuration trains
    trained = []

    def train_and_note(cfg):
        trained.append(cfg.run_name)
        from training.train import train

        return train(cfg)

    monkeypatch.setitem(ex.EXPERIMENTS, "tiny2", ex.Experiment(
        base=base, arms={"same": ("--optim.lr", "1e-3"), "new": ("--optim.lr", "2e-3")}, seeds=(0, 1),
        contrasts=(ex.difference("new", "same"),)))  # fmt: skip
    ex.run("tiny2", runs, results, train_fn=train_and_note)
    assert trained == ["new-s0", "new-s1"]
    for seed in (0, 1):
        with open(folder / f"a-s{seed}.json") as f:
            original = json.load(f)
        with open(tmp_path / "results" / "tiny2" / f"same-s{seed}.json") as f:
            reused = json.load(f)
        assert reused["reused_from"] == f"tiny/a-s{seed}" and reused["seed"] == seed
        assert reused["per_image"] == original["per_image"] and reused["arm"] == "same"


def test_a_failed_run_does_not_stop_the_others(tmp_path, monkeypatch):
    """Runs train in their own process; one that exits non-zero (here: a checkpoint to start from that
    does not exist) is named in a RuntimeError after the others are recorded, and a rerun retries only it."""
    base = (*tiny_argv(32), "--train.max_steps", "1", "--log.progress_bar", "false")
    exp = ex.Experiment(base=base, arms={"bad": ("--model.init", f"hf:{tmp_path / 'missing'}"), "ok": ()},
                        seeds=(0,), contrasts=(ex.difference("ok", "bad"),))  # fmt: skip
    monkeypatch.setitem(ex.EXPERIMENTS, "fails", exp)
    runs, results = str(tmp_path / "runs"), str(tmp_path / "results")
    with pytest.raises(RuntimeError, match=r"runs failed: bad-s0 \(python -m training.train exited with 1\)"):
        ex.run("fails", runs, results)
    assert sorted(os.listdir(tmp_path / "results" / "fails")) == ["ok-s0.json", "report.json", "report.md"]
    tried = []
    with pytest.raises(RuntimeError, match="bad-s0"):
        ex.run("fails", runs, results, train_fn=lambda cfg: tried.append(cfg.run_name) or 1 / 0)
    assert tried == ["bad-s0"]


def test_readme_reproductions_render_both_report_kinds(tmp_path):
    """benchmarks/report.py turns a runner report (contrasts) and the CRA study's report (one gain) into
    README rows; a pending CRA study says how many seeds are done."""
    import importlib.util

    from training.llm2clip import cra

    spec = importlib.util.spec_from_file_location(
        "bench_report", ex.RESULTS.rsplit("/results", 1)[0] + "/report.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runner = {"experiment": "fastclip", "paper": "P.", "note": "N.", "seeds": [0], "arms": [],
              "contrasts": [{"contrast": "a - b", "claim": "a wins", "mean": 0.01, "lo": 0.002, "hi": 0.02,
                             "per_seed": {"0": 0.01}, "verdict": "reproduces", "unit": "pp"},
                            {"contrast": "c/d - e/f", "claim": "c keeps more", "mean": 0.1, "lo": -0.1, "hi": 0.3,
                             "per_seed": {"0": 0.1}, "verdict": "not shown", "unit": "pp of share"}]}  # fmt: skip
    rec = {"seed": 0, "cra_before": 0.5, "cra_after": 0.53, "per_image_before": [10, 12, 8],
           "per_image_after": [11, 13, 10], "queries_per_image": 20, "mcnemar": {"improved": 4, "worsened": 0, "p_value": 0.125}, "tune_seconds": 1.0,
           "first_loss": 1.0, "last_loss": 0.5, "cra_first_two_before": 0.5, "cra_first_two_after": 0.5}  # fmt: skip
    for s in (0, 1):
        (tmp_path / f"seed-{s}.json").write_text(json.dumps({**rec, "seed": s}))
    done = cra.report(str(tmp_path), [0, 1])
    pending = cra.report(str(tmp_path), [0, 1, 2])
    text = mod.reproductions([runner, done])
    assert "| a wins | a - b | +1.00 [+0.20, +2.00] | +1.00 | **reproduces** |" in text
    assert "| c/d - e/f | +10.00 [-10.00, +30.00] pp of share | +10.00 | **not shown** |" in text
    assert "CRA after - before | +6.67 [" in text and "(from 50.0 %) | +6.67, +6.67 |" in text
    assert "pending (2/3 seeds)" in mod.reproductions([pending])
    assert "- **llm2clip-cra**: LLM2CLIP" in text
