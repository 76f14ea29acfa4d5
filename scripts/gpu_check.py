"""One short GPU window, one command: install, environment, correctness, benchmarks, demo training.

    bash scripts/gpu_check.sh OUT_DIR        # on the GPU machine: about 8 minutes in all
    python scripts/gpu_check.py --dry-run    # anywhere (CI): print the plan and check that it holds

``STAGES`` is the plan and the only list of what runs. Tests and benchmarks are chosen with pytest's
own ``-m`` / ``-k`` expressions; the dry run collects every selection (``--collect-only``) with the
packages the GPU machine lacks blocked, so a renamed test, a benchmark id that no longer matches or a
module that imports webdataset at import time fails CI instead of a GPU window.

Each stage runs under a time budget (what a stage leaves unused goes to the later ones, within the
total) and writes its results to OUT_DIR the moment it ends: ``results.json`` (every stage so far:
status, seconds, counts, failures, benchmark rows with the ratio to the peer), a log per process,
JUnit XML per pytest process, pytest-benchmark JSON, the CSV rows ``benchmarks/report.py`` reads
(``OUT_DIR/bench/*.csv``) and the demo run (``OUT_DIR/train/``). A run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import gpu_check_stages as st  # noqa: E402

ROOT = st.ROOT
TOTAL_S = 480  # 8 minutes: a 15-minute window has room for the machine's start and a second run
# Not on the GPU machine (webdataset and its braceexpand, the peers, extras): the dry run blocks them.
MISSING_ON_GPU = (
    "webdataset",
    "braceexpand",
    "tensorboard",
    "nltk",
    "flash_attn",
    "xformers",
    "inf_cl",
    "apex",
)


@dataclass(frozen=True)
class Selection:
    """Tests (or benchmarks) of one folder chosen by pytest's -m / -k. ``covers``: words that must each
    occur in some selected test id (the dry run checks), so a selection cannot quietly lose an op."""

    name: str
    folder: str
    marker: str = ""
    keyword: str = ""
    covers: tuple[str, ...] = ()
    budget_s: int = 0  # benchmark groups: this group's share of the stage

    def args(self, paths=None) -> list[str]:
        exprs = [
            *(["-m", self.marker] if self.marker else []),
            *(["-k", self.keyword] if self.keyword else []),
        ]
        return [*(paths or [self.folder]), *exprs]


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int
    about: str
    selections: tuple[Selection, ...] = ()
    shards: int = 1  # pytest processes side by side (Triton compiles on the CPU; the machine has 16 cores)


NOT_KERNELS = "not training and not distributed and not rewrite and not llm2clip and not hopper_compile and not cuda_compile and not gpu_check"
STAGES = (
    Stage("install", 90, "pip install --no-build-isolation --no-deps -e . (CUDA part by nvcc for sm_90a)"),
    Stage("env", 30, "python -m fastclip_kernels, nvidia-smi clocks, versions, measured bf16 matmul peak"),
    Stage("gpu_tests", 100, "the GPU-only tests (-m gpu): bf16 kernels vs fp64, CUDA kernels, no host sync",
          (Selection("gpu", "tests", marker="gpu",
                     covers=("contrastive", "sigmoid", "anchor", "attention", "fastclip", "optim_native",
                             "training_steps_never_sync", "loop_runs_on_cuda")),), shards=4),
    Stage("kernel_tests", 60, "the other kernel tests, now on the GPU: fp32 / fp16 at the production tiles",
          (Selection("kernels", "tests", marker="not gpu", keyword=NOT_KERNELS,
                     covers=("contrastive", "sigmoid", "anchor", "attention", "patch_embed", "optim", "fastclip",
                             "packed")),), shards=6),
    Stage("benchmarks", 110, "headline shapes, peers side by side: loss, varlen attention, optimizer, B/16 step", (
        Selection("loss", "benchmarks", keyword="contrastive_loss_gpu and fwd+bwd and not inf_cl", budget_s=45,
                  covers=("b4096-N32768", "b8192-N65536", "b32768-N32768", "materialized", "compiled", "fastclip")),
        Selection("attention", "benchmarks", budget_s=25,
                  keyword="varlen_attention_gpu and fwd+bwd and (ours or torch_varlen or sdpa_padded or torch_nested)",
                  covers=("ours", "torch_varlen", "sdpa_padded", "torch_nested")),
        Selection("optimizer", "benchmarks", budget_s=15,
                  keyword="optimizer_step_gpu and (torch-fused or torch-foreach or ours-triton or ours-native)",
                  covers=("torch-fused", "ours-triton", "ours-native")),
        Selection("training_step", "benchmarks", keyword="test_training_step", budget_s=25,
                  covers=("dense-full", "packed-full", "packed-keep50", "packed-keep25")),
    )),
    Stage("train", 90, "the demo preset on the GPU: the loss goes down, no error"),
)  # fmt: skip
TRAIN_ARGS = [
    "--preset",
    "demo",
    "--run.device",
    "cuda",
    "--log.progress_bar",
    "false",
    "--data.num_workers",
    "8",
]


def run_stage(win: st.Window, stage: Stage, timeout: float) -> tuple[str, dict]:
    if stage.name == "install":
        return st.install_stage(win, stage, timeout)
    if stage.name == "env":
        return st.env_stage(win, stage, timeout)
    if stage.name == "benchmarks":
        return st.bench_stage(win, stage, timeout)
    if stage.name == "train":
        return st.train_stage(win, stage, timeout, TRAIN_ARGS)
    return st.pytest_stage(win, stage, timeout)


def run_all(out: pathlib.Path, total_s: float, only: set[str] | None = None) -> int:
    """The stages in order; stage i may use its budget plus what earlier stages left, within the total."""
    out.mkdir(parents=True, exist_ok=True)
    win, spent_budget = st.Window(out, total_s), 0.0
    for stage in STAGES:
        spent_budget += stage.budget_s
        if only and stage.name not in only:
            continue
        timeout = min(spent_budget - (total_s - win.left()), win.left())
        if timeout < 5:
            win.record(stage, "no time left", 0.0)
            continue
        tic = time.monotonic()
        try:
            status, summary = run_stage(win, stage, timeout)
        except Exception as err:  # a broken stage must not cost the later ones
            status, summary = "error", {"error": f"{type(err).__name__}: {err}"}
        win.record(stage, status, time.monotonic() - tic, **summary)
    print(f"[gpu_check] results in {out / 'results.json'}")
    return 0 if all(s["status"] == "ok" for s in win.done) else 1


# -- dry run -----------------------------------------------------------------------------------------
def blocked_env(folder: pathlib.Path) -> dict:
    """The environment with every MISSING_ON_GPU module absent, as it is on the GPU machine.

    A ``sitecustomize`` on PYTHONPATH wraps the path finder so that these names are not found: imports
    raise ModuleNotFoundError and ``importlib.util.find_spec`` returns None, exactly as for a package that
    is not installed (libraries such as transformers probe with ``find_spec`` before importing; a
    shadow package that raises on import would look installed to them and break them)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(ABSENT_MODULES.format(names=sorted(MISSING_ON_GPU)))
    return {**st.Window(folder, 0).env, "PYTHONPATH": st.pythonpath(str(folder), str(ROOT))}


ABSENT_MODULES = """\
import importlib.machinery
import sys

_ABSENT = frozenset({names!r})


class _PathFinderWithout(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in _ABSENT:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)


sys.meta_path[:] = [_PathFinderWithout if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def check_selection(sel: Selection, env: dict) -> list[str]:
    """Problems with a selection: collection errors, nothing selected, a ``covers`` word missing."""
    ids, error = st.collect(sel, env)
    if error:
        return [f"{sel.name}: collection failed:\n{error}"]
    problems = [] if ids else [f"{sel.name}: `{' '.join(sel.args())}` selects nothing"]
    problems += [
        f"{sel.name}: no selected test id contains {w!r}" for w in sel.covers if not any(w in i for i in ids)
    ]
    print(f"  {sel.name}: {len(ids)} selected in {len({i.split('::')[0] for i in ids})} files", flush=True)
    return problems


def check_imports(env: dict) -> list[str]:
    """The training stage's modules import, and its arguments parse, without MISSING_ON_GPU."""
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, *TRAIN_ARGS], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return (
        [f"the training stage cannot start without {MISSING_ON_GPU}:\n{out.stderr[-2000:]}"]
        if out.returncode
        else []
    )


IMPORT_CHECK = (
    "import sys; import fastclip_kernels, fastclip_kernels.env, training.train; "
    "from training.config import parse_args; parse_args(sys.argv[1:])"
)


def dry_run(total_s: float = TOTAL_S, only: set[str] | None = None) -> int:
    print(f"gpu_check plan ({total_s:.0f} s in all; unused time moves on to later stages):")
    for stage in STAGES:
        print(f"  {stage.name:13s} {stage.budget_s:4d} s  {stage.about}")
        for sel in stage.selections:
            print(f"      {sel.name}: pytest {' '.join(sel.args())}")
    problems = (
        [] if sum(s.budget_s for s in STAGES) <= total_s else [f"the budgets add up to more than {total_s} s"]
    )
    selections = [sel for stage in STAGES if not only or stage.name in only for sel in stage.selections]
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=4) as pool:
        env = blocked_env(pathlib.Path(tmp))  # collections run side by side: mostly imports
        checks = [
            pool.submit(check_imports, env),
            *(pool.submit(check_selection, sel, env) for sel in selections),
        ]
        problems += [p for check in checks for p in check.result()]
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print("dry run:", "FAILED" if problems else "ok")
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "out", nargs="?", default="gpu_check_out", help="results folder (default gpu_check_out)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check it on this machine")
    parser.add_argument(
        "--total", type=float, default=TOTAL_S, help=f"seconds for all stages (default {TOTAL_S})"
    )
    parser.add_argument("--only", default="", help="comma-separated stage names to run (default all)")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(","))) or None
    if args.dry_run:
        return dry_run(args.total, only)
    return run_all(pathlib.Path(args.out).resolve(), args.total, only)


if __name__ == "__main__":
    sys.exit(main())
