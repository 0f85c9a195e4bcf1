"""`make bench`: run every benchmark under tools/bench/ and write BENCHMARKS.md.

Each benchmark prints its own report and, last, one `RESULT [...]` line (tools/bench/result.py);
this collects those rows into one table with the machine and the date, followed by every
benchmark's own output.
"""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]
BENCHES = ["history_logger.py", "bridge.py", "automation.py", "scheduler.py"]
PREFIX = "RESULT "


def run(script: str) -> tuple[list[dict], str, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "tools/bench" / script)], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    elapsed = time.monotonic() - started
    rows = [r for line in proc.stdout.splitlines() if line.startswith(PREFIX) for r in orjson.loads(line[len(PREFIX):])]
    output = "\n".join(line for line in proc.stdout.splitlines() if not line.startswith(PREFIX))
    if proc.returncode != 0 or not rows:
        rows = [{"figure": script, "value": "failed", "baseline": "", "ratio": None,
                 "target": "", "met": False}]
        output += f"\n(exit code {proc.returncode})\n{proc.stderr[-2000:]}"
    return rows, output, elapsed


def main() -> int:
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
               f"{platform.system()} {platform.release()}")
    table, sections = [], []
    for script in BENCHES:
        print(f"running tools/bench/{script} ...", flush=True)
        rows, output, elapsed = run(script)
        table += rows
        sections.append(f"### tools/bench/{script} ({elapsed:.0f} s)\n\n```\n{output.strip()}\n```\n")
    lines = [
        "# Benchmarks", "",
        f"Produced by `make bench` on {date}; machine: {machine}.",
        "Every figure is compared with a baseline measured in the same run.", "",
        "| figure | value | same-run baseline | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in table:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['figure']} | {r['value']} | {r['baseline']} | {ratio} | {r['target']} | "
                     f"{'yes' if r['met'] else 'no'} |")
    lines += ["", "## Output of each benchmark", "", *sections]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))
    print("\n".join(lines[:len(table) + 7]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
