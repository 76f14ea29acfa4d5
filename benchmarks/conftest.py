"""Benchmark session: collects result rows and, with FASTCLIP_BENCH_SAVE=1, writes them to
benchmarks/results/<machine>.csv (then `python benchmarks/report.py` regenerates the README table);
FASTCLIP_BENCH_RESULTS_DIR writes that CSV to another folder (scripts/gpu_check.py: its OUT_DIR)."""

import csv
import os
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).parent))

from harness import machine  # noqa: E402

ROWS: list[dict] = []


@pytest.fixture
def record():
    def add(**row):
        ROWS.append({**row, **machine()})

    return add


def pytest_sessionfinish(session, exitstatus):
    if not ROWS or os.environ.get("FASTCLIP_BENCH_SAVE") != "1":
        return
    tag = ROWS[0]["gpu"] if ROWS[0]["gpu"] != "none" else "cpu"
    folder = pathlib.Path(
        os.environ.get("FASTCLIP_BENCH_RESULTS_DIR") or pathlib.Path(__file__).parent / "results"
    )
    path = folder / f"{tag.replace(' ', '_')}.csv"
    existing = list(csv.DictReader(path.open())) if path.exists() else []
    keep = [r for r in existing if (r["bench"], r["shape"]) not in {(x["bench"], x["shape"]) for x in ROWS}]
    fields = list(dict.fromkeys(key for row in keep + ROWS for key in row))  # union, first-seen order
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(keep + ROWS)
