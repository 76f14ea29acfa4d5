"""scripts/gpu_check.py without a GPU: the plan fits the window, the dry run catches a renamed test and
an eager import of a package the GPU machine lacks, and the stage summaries read what pytest and the
training loop write. CI runs the full dry run (every selection collected) in .ci/run."""

import csv
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_check  # noqa: E402
import gpu_check_stages as st  # noqa: E402


def test_plan_fits_the_window():
    names = [s.name for s in gpu_check.STAGES]
    assert names == ["install", "env", "gpu_tests", "kernel_tests", "benchmarks", "train"]
    assert sum(s.budget_s for s in gpu_check.STAGES) <= gpu_check.TOTAL_S <= 8 * 60
    bench = next(s for s in gpu_check.STAGES if s.name == "benchmarks")
    assert sum(sel.budget_s for sel in bench.selections) <= bench.budget_s


@pytest.fixture
def bench_folder(tmp_path):
    (tmp_path / "test_thing.py").write_text(
        textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("provider", ["ours", "peer"])
        def test_thing_gpu(provider):
            pass
        """)
    )
    return tmp_path


def test_dry_run_check_passes_a_selection_that_exists(bench_folder):
    sel = gpu_check.Selection("thing", str(bench_folder), keyword="thing_gpu", covers=("ours", "peer"))
    assert gpu_check.check_selection(sel, st.Window(bench_folder, 0).env) == []


@pytest.mark.parametrize(
    "keyword,covers,problem",
    [("renamed_gpu", (), "selects nothing"), ("thing_gpu", ("ours", "flash"), "contains 'flash'")],
    ids=["renamed", "lost-provider"],
)
def test_dry_run_check_catches_a_rename(bench_folder, keyword, covers, problem):
    sel = gpu_check.Selection("thing", str(bench_folder), keyword=keyword, covers=covers)
    problems = gpu_check.check_selection(sel, st.Window(bench_folder, 0).env)
    assert len(problems) == 1 and problem in problems[0]


def test_dry_run_blocks_what_the_gpu_machine_lacks(tmp_path):
    """A module importing webdataset at import time fails there; the blocked environment shows it."""
    env = gpu_check.blocked_env(tmp_path / "blocked")
    (tmp_path / "eager.py").write_text("import webdataset\n")
    env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
    out = subprocess.run([sys.executable, "-c", "import eager"], env=env, capture_output=True, text=True)
    assert out.returncode == 1 and "ModuleNotFoundError: No module named 'webdataset'" in out.stderr


def test_dry_run_absent_modules_look_uninstalled(tmp_path):
    """Libraries probe optional packages with find_spec (transformers does for flash_attn) and must see
    None, as on the GPU machine; a shadow package that raised on import looked installed and broke them."""
    env = gpu_check.blocked_env(tmp_path / "blocked")
    probe = (
        "import importlib.util as u; print([u.find_spec(n) for n in ('webdataset', 'flash_attn', 'json')])"
    )
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("[None, None, ModuleSpec(name='json'"), out.stdout


def test_dry_run_of_the_training_stage():
    """The real plan: printed, budgets checked, the loop imports and its arguments parse without the
    blocked packages (the selections are collected by the full dry run in .ci/run)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--dry-run", "--only", "train"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dry run: ok" in out.stdout and "gpu_tests" in out.stdout


def test_shards_balance_files():
    ids = [f"a.py::t{i}" for i in range(6)] + [f"b.py::t{i}" for i in range(4)] + ["c.py::t", "d.py::t"]
    shards = st.shard_files(ids, 2)
    assert sorted(sum(shards, [])) == ["a.py", "b.py", "c.py", "d.py"]
    assert shards == [["a.py"], ["b.py", "c.py", "d.py"]]


def test_junit_summary_counts_and_names_failures(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_a"/>'
        '<testcase classname="tests.test_x" name="test_b"><failure message="assert 1 == 2&#10;more"/></testcase>'
        '<testcase classname="tests.test_x" name="test_c"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    got = st.junit_summary([xml, tmp_path / "missing.xml"])  # a process cut before writing: no file
    assert (got["tests"], got["passed"], got["failures"], got["skipped"]) == (3, 1, 1, 1)
    assert got["failed"] == ["tests.test_x::test_b: assert 1 == 2"]


def test_peer_ratios():
    rows = [
        dict(
            bench="contrastive_loss",
            shape="s",
            mode="fwd+bwd",
            provider="materialized",
            median_ms="10",
            peak_gib="4",
        ),
        dict(
            bench="contrastive_loss",
            shape="s",
            mode="fwd+bwd",
            provider="fastclip",
            median_ms="5",
            peak_gib="1",
        ),
        dict(
            bench="contrastive_loss",
            shape="t",
            mode="fwd+bwd",
            provider="fastclip",
            median_ms="5",
            peak_gib="1",
        ),
    ]
    got = st.with_peer_ratios(rows)
    assert got[1]["time_vs_peer"] == 0.5 and got[1]["memory_vs_peer"] == 0.25
    assert got[0]["time_vs_peer"] == 1.0 and "time_vs_peer" not in got[2]  # no peer row at shape t


@pytest.mark.parametrize(
    "losses,down", [([5, 5, 5, 4, 3, 2], True), ([5, 5, 5, 5, 5, 6], False), ([5, 1], False)], ids=str
)
def test_loss_went_down(losses, down):
    assert st.loss_went_down(losses) is down


def test_train_stage_reads_the_run_log(tmp_path, monkeypatch):
    """The stage's verdict comes from the run's log.csv (here a fake run that only writes it)."""
    win = st.Window(tmp_path, 60)
    stage = gpu_check.STAGES[-1]

    def fake_run(cmd, log, env, timeout):
        out = tmp_path / "train" / "demo"
        out.mkdir(parents=True)
        with (out / "log.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", "loss"])
            writer.writeheader()
            writer.writerows({"step": i, "loss": 6.0 - i} for i in range(8))
        return 0

    monkeypatch.setattr(st, "run", fake_run)
    status, summary = st.train_stage(win, stage, 10, [])
    assert status == "ok" and summary["loss_went_down"] and summary["steps_logged"] == 8
