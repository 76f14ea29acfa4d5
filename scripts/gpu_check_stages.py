"""The stages of scripts/gpu_check.py: running processes under a budget, and what each stage keeps.

Every process runs in its own session with its output in a log under OUT_DIR; at its deadline it gets
SIGINT (pytest then still writes its JUnit XML and benchmark files), SIGKILL 20 s later.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[1]


def pythonpath(*first: str) -> str:
    return os.pathsep.join([*first, *filter(None, [os.environ.get("PYTHONPATH", "")])])


@dataclass
class Window:
    """Where results go and how much of the run's time is left; ``record`` rewrites results.json."""

    out: pathlib.Path
    total_s: float
    start: float = field(default_factory=time.monotonic)
    done: list = field(default_factory=list)
    env: dict = field(default_factory=lambda: {**os.environ, "PYTHONPATH": pythonpath(str(ROOT))})

    def left(self) -> float:
        return self.total_s - (time.monotonic() - self.start)

    def record(self, stage, status: str, seconds: float, **summary) -> None:
        row = dict(name=stage.name, status=status, seconds=round(seconds, 1), budget_s=stage.budget_s)
        self.done.append({**row, **summary})
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(dict(total_s=self.total_s, stages=self.done), indent=1, default=str))
        tmp.replace(self.out / "results.json")  # a whole file at every moment
        print(f"[gpu_check] {stage.name}: {status} in {seconds:.0f} s", flush=True)


# -- processes -------------------------------------------------------------------------------------
def start(cmd, log: pathlib.Path, env: dict) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def finish(procs, deadline: float) -> list[int | None]:
    """Exit codes of ``procs``, None for those still running at ``deadline`` (then stopped)."""
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            codes.append(None)
    for proc, code in zip(procs, codes, strict=True):
        if code is None:
            _stop(proc)
    return codes


def _stop(proc) -> None:
    for sig, grace in ((signal.SIGINT, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def run(cmd, log: pathlib.Path, env: dict, timeout: float) -> int | None:
    return finish([start(cmd, log, env)], time.monotonic() + max(1.0, timeout))[0]


def status_of(codes) -> str:
    """ok, failed (an exit code other than 0 or pytest's 5 "nothing selected") or cut (time ran out)."""
    if any(c is None for c in codes):
        return "cut"
    return "ok" if all(c in (0, 5) for c in codes) else "failed"


# -- pytest ----------------------------------------------------------------------------------------
def pytest_cmd(sel, *extra: str, paths=None) -> list[str]:
    """pytest over the selection's folder (or ``paths`` in it) with its -m / -k expressions."""
    return [sys.executable, "-m", "pytest", *sel.args(paths), "-p", "no:cacheprovider", *extra]


def collect(sel, env: dict) -> tuple[list[str], str]:
    """(selected test ids, pytest's output when collection failed) by ``pytest --collect-only -q``."""
    out = subprocess.run(
        pytest_cmd(sel, "--collect-only", "-q"), cwd=ROOT, env=env, capture_output=True, text=True
    )
    ids = [line for line in out.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    failed = out.returncode not in (0, 5)
    return ids, (out.stdout[-4000:] + out.stderr[-2000:]) if failed else ""


def shard_files(ids: list[str], shards: int) -> list[list[str]]:
    """The files of the selected ids in at most ``shards`` groups of about equal test counts."""
    counts: dict[str, int] = {}
    for test_id in ids:
        path = test_id.split("::")[0]
        counts[path] = counts.get(path, 0) + 1
    groups: list[tuple[int, list[str]]] = [(0, []) for _ in range(min(shards, len(counts)))]
    for path, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        k = min(range(len(groups)), key=lambda g: groups[g][0])
        groups[k] = (groups[k][0] + n, [*groups[k][1], path])
    return [files for _, files in groups]


def junit_summary(paths) -> dict:
    """Counts over JUnit XML files and the failed test ids with the first line of their message."""
    total = dict(tests=0, failures=0, errors=0, skipped=0)
    failed = []
    for path in paths:
        if not pathlib.Path(path).exists():
            continue
        for suite in ET.parse(path).getroot().iter("testsuite"):
            for key in total:
                total[key] += int(suite.get(key, 0))
            for case in suite.iter("testcase"):
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                if bad is not None:
                    msg = (bad.get("message") or "").strip().splitlines()
                    failed.append(
                        f"{case.get('classname')}::{case.get('name')}: {msg[0][:300] if msg else ''}"
                    )
    return {
        **total,
        "passed": total["tests"] - total["failures"] - total["errors"] - total["skipped"],
        "failed": failed,
    }


def pytest_stage(win: Window, stage, timeout: float) -> tuple[str, dict]:
    """Every selection of ``stage`` split by file over ``stage.shards`` pytest processes at once."""
    deadline, summary = time.monotonic() + timeout, {}
    for sel in stage.selections:
        ids, error = collect(sel, win.env)
        if error:
            return "failed", {"collect_error": error}
        shards = shard_files(ids, stage.shards)
        xmls = [win.out / f"{stage.name}-{sel.name}-{i}.xml" for i in range(len(shards))]
        procs = [
            start(
                pytest_cmd(sel, "-q", "-rfE", f"--junitxml={xml}", paths=files),
                xml.with_suffix(".log"),
                win.env,
            )
            for files, xml in zip(shards, xmls, strict=True)
        ]
        codes = finish(procs, deadline)
        summary[sel.name] = dict(selected=len(ids), status=status_of(codes), **junit_summary(xmls))
    return status_of(
        [None if s["status"] == "cut" else (0 if s["status"] == "ok" else 1) for s in summary.values()]
    ), summary


# -- benchmarks ------------------------------------------------------------------------------------
PEER = {"contrastive_loss": "materialized", "varlen_attention": "torch_varlen", "optimizer_step": "torch-fused",
        "training_step": "dense-full"}  # fmt: skip


def bench_stage(win: Window, stage, timeout: float) -> tuple[str, dict]:
    """Each group in turn (one at a time: timings), within its share of the stage's time."""
    deadline, codes, csv_dir = time.monotonic() + timeout, [], win.out / "bench"
    csv_dir.mkdir(exist_ok=True)
    env = {**win.env, "FASTCLIP_BENCH_SAVE": "1", "FASTCLIP_BENCH_RESULTS_DIR": str(csv_dir)}
    share = sum(sel.budget_s for sel in stage.selections)
    for sel in stage.selections:
        left = deadline - time.monotonic()
        budget = min(left, sel.budget_s * timeout / share) if sel is not stage.selections[-1] else left
        cmd = pytest_cmd(
            sel, "--benchmark-only", f"--benchmark-json={win.out / f'bench-{sel.name}.json'}", "-q", "-rs"
        )
        codes.append(run(cmd, win.out / f"bench-{sel.name}.log", env, budget))
    rows = [row for path in sorted(csv_dir.glob("*.csv")) for row in csv.DictReader(path.open())]
    return status_of(codes), {"rows": with_peer_ratios(rows), "exit_codes": codes}


def with_peer_ratios(rows: list[dict]) -> list[dict]:
    """Each row plus ``time_vs_peer`` / ``memory_vs_peer``: its median time and peak over those of
    the peer row (PEER) of the same bench, shape and mode (> 1: slower / more memory than the peer)."""
    peers = {(r["bench"], r["shape"], r["mode"]): r for r in rows if PEER.get(r["bench"]) == r["provider"]}
    out = []
    for r in rows:
        peer, extra = peers.get((r["bench"], r["shape"], r["mode"])), {}
        for key, name in (("median_ms", "time_vs_peer"), ("peak_gib", "memory_vs_peer")):
            try:
                extra[name] = round(float(r[key]) / float(peer[key]), 3)
            except (TypeError, KeyError, ValueError, ZeroDivisionError):
                pass
        out.append({**{k: v for k, v in r.items() if v not in ("", None)}, **extra})
    return out


# -- install, environment, training ------------------------------------------------------------------
def install_stage(win: Window, stage, timeout: float) -> tuple[str, dict]:
    env = {**win.env, "FASTCLIP_CUDA_ARCHS": os.environ.get("FASTCLIP_CUDA_ARCHS", "90a")}
    pip = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
    deadline = time.monotonic() + timeout
    code = run(pip, win.out / "install.log", env, timeout)
    if code not in (0, None):  # pip refused (e.g. too old for PEP 660): build in place (on PYTHONPATH)
        inplace = [sys.executable, "setup.py", "build_ext", "--inplace"]
        code = run(inplace, win.out / "install-inplace.log", env, deadline - time.monotonic())
    probe = "from fastclip_kernels._native import build_info; print(build_info())"
    info = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=win.env, capture_output=True, text=True
    )
    return status_of([code]), {"native": (info.stdout or info.stderr).strip()[-500:]}


SMI = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.limit,temperature.gpu,memory.total"


def env_stage(win: Window, stage, timeout: float) -> tuple[str, dict]:
    deadline = time.monotonic() + timeout
    code = run([sys.executable, "-m", "fastclip_kernels"], win.out / "env.txt", win.env, 0.6 * timeout)
    report = {"fastclip_kernels": (win.out / "env.txt").read_text()[-3000:]}
    for name, cmd in (
        ("nvidia_smi", ["nvidia-smi", f"--query-gpu={SMI}", "--format=csv"]),
        ("nvcc", ["nvcc", "--version"]),
    ):
        try:
            report[name] = subprocess.run(cmd, capture_output=True, text=True, timeout=15).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            report[name] = f"unavailable: {err}"
    peak = subprocess.run(
        [sys.executable, __file__, "peak"], cwd=ROOT, env=win.env, capture_output=True, text=True,
        timeout=max(1.0, deadline - time.monotonic()),
    )  # fmt: skip
    try:
        report.update(json.loads(peak.stdout.strip().splitlines()[-1]))
        win.env["FASTCLIP_PEAK_FLOPS"] = str(report["bf16_peak_flops"])  # MFU from here on: measured peak
    except (IndexError, ValueError, KeyError):
        report["peak_error"] = peak.stderr[-1500:]
    (win.out / "env.json").write_text(json.dumps(report, indent=1))
    return status_of([code]), report


def measure_bf16_peak() -> dict:
    """Dense bf16 matmul throughput: best of 5 x 20 multiplies of 8192^3, timed with CUDA events."""
    import torch

    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(20):
            a @ b
        t1.record()
        torch.cuda.synchronize()
        best = min(best, t0.elapsed_time(t1) / 1e3 / 20)
    return {
        "bf16_peak_flops": 2 * n**3 / best,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
    }


def train_stage(win: Window, stage, timeout: float, args: list[str]) -> tuple[str, dict]:
    out = win.out / "train"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "training.train", *args, "--run.output_dir", str(out)]
    code = run(cmd, win.out / "train.log", win.env, timeout)
    logs = list(out.glob("*/log.csv"))
    losses = [float(r["loss"]) for r in csv.DictReader(logs[0].open())] if logs else []
    metrics = list(out.glob("*/metrics.json"))
    summary = dict(
        loss_went_down=loss_went_down(losses),
        losses=losses[:3] + ["..."] + losses[-3:],
        steps_logged=len(losses),
    )
    if metrics:
        summary["metrics"] = json.loads(metrics[0].read_text())
    status = status_of([code])
    return ("failed" if status == "ok" and not summary["loss_went_down"] else status), summary


def loss_went_down(losses: list[float], k: int = 3) -> bool:
    """The mean of the last ``k`` logged losses is below that of the first ``k`` (needs 2k rows)."""
    if len(losses) < 2 * k:
        return False
    return sum(losses[-k:]) / k < sum(losses[:k]) / k


if __name__ == "__main__" and sys.argv[1:] == ["peak"]:
    print(json.dumps(measure_bf16_peak()))
