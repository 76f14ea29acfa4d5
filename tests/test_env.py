"""``python -m fastclip_kernels`` and fastclip_kernels.env.env_report."""

import os
import subprocess
import sys
from pathlib import Path

from fastclip_kernels.env import env_report, format_report

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ["triton (GPU)", "triton interpreter", "native library", "native CUDA kernels usable"]
PEERS = ["flash-attn", "xformers", "apex", "inf_cl"]


def run_module(tmp_path, extra_path=()):
    """Runs ``python -m fastclip_kernels`` from tmp_path with the checkout (and extra_path) importable."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *map(str, extra_path)]))
    proc = subprocess.run(
        [sys.executable, "-m", "fastclip_kernels"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_main_prints_every_backend_and_peer(tmp_path):
    out = run_module(tmp_path)
    for key in ("fastclip_kernels:", "torch:", "triton:", "python:", "device:"):
        assert key in out
    for name in BACKENDS + PEERS:
        lines = [line for line in out.splitlines() if line.strip().startswith(name + " ")]
        assert len(lines) == 1, f"{name!r} missing or repeated in:\n{out}"
        assert lines[0].split()[len(name.split())] in ("yes", "no"), lines[0]


def test_unrelated_apex_is_not_nvidia_apex(tmp_path):
    """PyPI's `apex` is another project: without apex.optimizers the peer is reported missing."""
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("")
    out = run_module(tmp_path, extra_path=[tmp_path])
    (line,) = [line for line in out.splitlines() if line.strip().startswith("apex ")]
    assert " no " in line and "not NVIDIA apex" in line


def test_report_is_consistent():
    report = env_report()
    assert list(report["backends"]) == BACKENDS and list(report["peers"]) == PEERS
    native = report["backends"]["native library"]
    usable = report["backends"]["native CUDA kernels usable"]
    assert not (usable["ok"] and not native["ok"])
    if report["device"].startswith("cpu"):
        assert not usable["ok"] and not report["backends"]["triton (GPU)"]["ok"]
    text = format_report(report)
    assert all(name in text for name in BACKENDS + PEERS)
