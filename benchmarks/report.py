"""Regenerate the README benchmark table from benchmarks/results/*.csv (never typed by hand).

python benchmarks/report.py          # rewrites the block between the BENCHMARKS markers
"""

import csv
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
START, END = "<!-- BENCHMARKS:START -->", "<!-- BENCHMARKS:END -->"


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


def main() -> None:
    rows = []
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.csv")):
        rows += list(csv.DictReader(path.open()))
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    tables = (
        f"{table(rows)}\n\nCommunication (bytes do not depend on the machine):\n\n{communication_table(rows)}"
        f"\n\nOptimizer step:\n\n{optimizer_table(rows)}"
    )
    readme.write_text(f"{head}{START}\n{tables}\n{END}{tail}")


if __name__ == "__main__":
    main()
