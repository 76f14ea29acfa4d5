"""Regenerate README tables from benchmarks/results (never typed by hand).

python benchmarks/report.py          # rewrites the blocks between the BENCHMARKS and REPRODUCTIONS markers

Benchmarks: benchmarks/results/*.csv. Reproductions: benchmarks/results/experiments/<name>/report.json,
written by ``python -m training.experiments NAME``.
"""

import csv
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
START, END = "<!-- BENCHMARKS:START -->", "<!-- BENCHMARKS:END -->"
REPRO_START, REPRO_END = "<!-- REPRODUCTIONS:START -->", "<!-- REPRODUCTIONS:END -->"
EXPERIMENTS = ROOT / "benchmarks" / "results" / "experiments"


def _ratio(num: str, den: str) -> str:
    try:
        return f"{float(num) / float(den):.2f}x"
    except (ValueError, ZeroDivisionError):
        return "n/a"


def table(rows: list[dict]) -> str:
    lines = [
        "| bench | shape | mode | provider | median ms | peak GiB | TFLOP/s | time vs materialized "
        "| memory vs materialized | machine |",
        "|" + "---|" * 10,
    ]
    base = {(r["bench"], r["shape"], r["mode"]): r for r in rows if r["provider"].startswith("materialized")}
    for r in rows:
        if not r.get("median_ms") or r["bench"] == "optimizer_step":
            continue
        ref = base.get((r["bench"], r["shape"], r["mode"]), {})
        machine = (
            f"{r['gpu'] if r['gpu'] != 'none' else r['cpu'] + ' x' + r['threads'] + ' threads'}, "
            f"torch {r['torch']}, triton {r['triton']}, {r['commit']}"
        )
        lines.append(
            f"| {r['bench']} | {r['shape']} | {r['mode']} | {r['provider']} | {r['median_ms']} | "
            f"{r['peak_gib']} | {r['tflops']} | {_ratio(r['median_ms'], ref.get('median_ms', ''))} | "
            f"{_ratio(r['peak_gib'], ref.get('peak_gib', ''))} | {machine} |"
        )
    return "\n".join(lines)


def communication_table(rows: list[dict]) -> str:
    """Loss-related bytes per rank per step (CommCounter, ring model) next to the DDP all-reduce."""
    lines = [
        "| ranks, shape | scheme | fwd collectives | bwd collectives | loss MB / rank / step | DDP grads MB "
        "| loss / DDP |",
        "|" + "---|" * 7,
    ]
    for r in rows:
        if r["bench"] != "loss_communication":
            continue
        loss, ddp = int(r["loss_bytes"]), int(r["ddp_bytes"])
        lines.append(
            f"| {r['shape']} | {r['provider']} | {r['fwd_calls']} | {r['bwd_calls']} | {loss / 1e6:.3f} | "
            f"{ddp / 1e6:.1f} | {100 * loss / ddp:.2f}% |"
        )
    return "\n".join(lines)


def optimizer_table(rows: list[dict]) -> str:
    """Optimizer step time and achieved GB/s (traffic model: AdamW 28 B, LAMB 44 B per parameter)."""
    lines = ["| params | provider | algorithm | median ms | GB/s | time vs torch fused AdamW | machine |"]
    lines.append("|" + "---|" * 7)
    base = {
        (r["shape"], r["gpu"]): r
        for r in rows
        if r["bench"] == "optimizer_step" and r["provider"] == "torch-fused"
    }
    for r in rows:
        if r["bench"] != "optimizer_step":
            continue
        ref = base.get((r["shape"], r["gpu"]), {})
        machine = r["gpu"] if r["gpu"] != "none" else f"{r['cpu']} x{r['threads']} threads"
        lines.append(
            f"| {r['shape']} | {r['provider']} | {r['mode']} | {r['median_ms']} | {r['gbps']} | "
            f"{_ratio(r['median_ms'], ref.get('median_ms', ''))} | {machine}, torch {r['torch']} |"
        )
    return "\n".join(lines)


def _pp(v: float) -> str:
    return f"{100 * v:+.2f}"


def reproductions(reports: list[dict]) -> str:
    """One row per claim: the paper's finding, ours (mean over seeds, 95 % interval, per seed), verdict."""
    lines = [
        "| experiment | claim (paper) | contrast | ours: mean [95 % interval] (pp) | per seed (pp) | verdict |",
        "|" + "---|" * 6,
    ]
    for rep in reports:
        if "gain" in rep:  # training.llm2clip.cra: one claim, CRA after - before over tuning seeds
            lines.append(_cra_row(rep))
            continue
        for c in rep["contrasts"]:
            if c["verdict"] == "pending":
                done = sum(len(a["seeds_done"]) for a in rep["arms"])
                total = len(rep["arms"]) * len(rep["seeds"])
                ours, per = f"pending ({done}/{total} runs)", ""
            else:
                unit = "" if c["unit"] == "pp" else f" {c['unit']}"  # a share's points
                ours = f"{_pp(c['mean'])} [{_pp(c['lo'])}, {_pp(c['hi'])}]{unit}"
                per = ", ".join(_pp(v) for v in c["per_seed"].values())
            lines.append(
                f"| [{rep['experiment']}](benchmarks/results/experiments/{rep['experiment']}/report.md) | "
                f"{c['claim']} | {c['contrast']} | {ours} | {per} | **{c['verdict']}** |"
            )
    papers = []
    for r in reports:
        plot = EXPERIMENTS / r["experiment"] / "report.png"
        link = (
            f" [Plot](benchmarks/results/experiments/{r['experiment']}/report.png)." if plot.exists() else ""
        )
        proper = f" A proper test needs: {r['proper_test']}" if r.get("proper_test") else ""
        papers.append(f"- **{r['experiment']}**: {r['paper']} Here: {r['note']}{proper}{link}")
    return "\n".join([*lines, "", *papers])


def _cra_row(rep: dict) -> str:
    link = f"[{rep['experiment']}](benchmarks/results/experiments/{rep['experiment']}/report.md)"
    claim = "caption-contrastive tuning raises caption retrieval accuracy"
    g = rep["gain"]
    if g is None or len(rep["seeds_done"]) < len(rep["seeds"]):
        done = f"pending ({len(rep['seeds_done'])}/{len(rep['seeds'])} seeds)"
        return f"| {link} | {claim} | CRA after - before | {done} |  | **pending** |"
    before = sum(r["cra_before"] for r in rep["per_seed"]) / len(rep["per_seed"])
    ours = f"{_pp(g['mean'])} [{_pp(g['lo'])}, {_pp(g['hi'])}] (from {100 * before:.1f} %)"
    per = ", ".join(_pp(v) for v in g["per_seed"])
    return f"| {link} | {claim} | CRA after - before | {ours} | {per} | **{g['verdict']}** |"


def _replace(text: str, start: str, end: str, body: str) -> str:
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def main() -> None:
    rows = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.csv")):
        rows += list(csv.DictReader(path.open()))
    readme = ROOT / "README.md"
    text = readme.read_text()
    tables = (
        f"{table(rows)}\n\nCommunication (bytes do not depend on the machine):\n\n{communication_table(rows)}"
        f"\n\nOptimizer step:\n\n{optimizer_table(rows)}"
    )
    text = _replace(text, START, END, tables)
    if REPRO_START in text:
        reports = [json.loads(p.read_text()) for p in sorted(EXPERIMENTS.glob("*/report.json"))]
        text = _replace(text, REPRO_START, REPRO_END, reproductions(reports))
    readme.write_text(text)


if __name__ == "__main__":
    main()
