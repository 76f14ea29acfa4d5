"""Compare finished runs: ``python -m training.compare runs/mini-*`` prints a Markdown table of their
final metrics (metrics.json), training time and throughput (log.csv)."""

from __future__ import annotations

import csv
import json
import os
import sys

KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "zeroshot_top1")


def summary(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        metrics = json.load(f)
    with open(os.path.join(run_dir, "log.csv")) as f:
        rates = sorted(float(r["samples_per_s"]) for r in csv.DictReader(f))
    return {"run": os.path.basename(run_dir.rstrip("/")), "steps": metrics["step"],
            "samples/s": rates[len(rates) // 2] if rates else float("nan"), **{k: metrics.get(k) for k in KEYS}}  # fmt: skip


def table(rows: list[dict]) -> str:
    cols = ["run", "steps", "samples/s", *KEYS]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            f"{100 * v:.1f}%" if k in KEYS and v is not None else ("" if v is None else str(v))
            for k, v in ((c, r.get(c)) for c in cols)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    found = [s for s in map(summary, sys.argv[1:]) if s is not None]
    print(table(found) if found else "no finished runs (metrics.json) given")
