"""`make bench`: run every benchmark under tools/bench/ and write BENCHMARKS.md.

    .venv/bin/python tools/bench/run_all.py [--quick] [--only bridge.py ...] [--timeout 1800]

Each benchmark prints its own report and, last, one `RESULT [...]` line (tools/bench/result.py);
this collects those rows into one table with the machine and the date, followed by every
benchmark's own output. Each benchmark runs in a process group of its own and is stopped (with
the servers it started) after --timeout seconds.

--quick runs every benchmark at small sizes to check that it works and prints its rows; its
figures mean little, so BENCHMARKS.md is then left as it is.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncpg
import orjson

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
BENCHES = ["history_logger.py", "bridge.py", "automation.py", "scheduler.py"]
QUICK_ARGS = {
    "history_logger.py": ["--n", "5000", "--rate", "200", "--seconds", "3"],
    "bridge.py": ["--seconds", "2"],
    "automation.py": ["--zones", "200,1000", "--repeat", "2"],
    "scheduler.py": ["--zones", "300,1000", "--ticks", "3", "--startup-limit", "30"],
}
PREFIX = "RESULT "
GRACE_SEC = 60.0


async def drop_databases(pid: int) -> None:
    """The throwaway databases of a benchmark process killed before it could drop them."""
    from tools.bench.schema import admin_kwargs
    admin = await asyncpg.connect(**admin_kwargs())
    try:
        for row in await admin.fetch("SELECT datname FROM pg_database WHERE datname ~ $1",
                                     rf"^hydro_bench_([a-z]+_)?{pid}(_[0-9]+)?$"):
            await admin.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}" WITH (FORCE)')
    finally:
        await admin.close()


def run(script: str, extra: list[str], timeout: float) -> tuple[list[dict], str, float]:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools/bench" / script), *extra], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The benchmark's own group (it and the servers it started): Ctrl-C first, so that it drops
        # its databases and stops its brokers; then SIGKILL whatever is left, and its databases.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            stdout, stderr = proc.communicate(timeout=GRACE_SEC)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            asyncio.run(drop_databases(proc.pid))
        stderr += f"\nstopped after {timeout:g} s"
    elapsed = time.monotonic() - started
    rows = [r for line in stdout.splitlines() if line.startswith(PREFIX) for r in orjson.loads(line[len(PREFIX):])]
    output = "\n".join(line for line in stdout.splitlines() if not line.startswith(PREFIX))
    if proc.returncode != 0 or not rows:
        rows = [{"figure": script, "value": "failed", "baseline": "", "ratio": None,
                 "target": "", "met": False}]
        output += f"\n(exit code {proc.returncode})\n{stderr[-2000:]}"
    return rows, output, elapsed


def machine_speed() -> str:
    """Two calibration figures: absolute results of two machines compare only as these do (the
    ratios against same-run baselines hold across machines, the absolute targets do not)."""
    started = time.perf_counter()
    total = 0
    for i in range(10_000_000):
        total += i
    loop = time.perf_counter() - started
    a, b = socket.socketpair()

    def echo() -> None:
        while data := b.recv(64):
            b.sendall(data)
    threading.Thread(target=echo, daemon=True).start()
    started = time.perf_counter()
    for _ in range(20_000):
        a.sendall(b"x")
        a.recv(64)
    round_trip = (time.perf_counter() - started) / 20_000
    a.close()
    return f"{loop:.2f} s for 10 million Python additions, {round_trip * 1e6:.0f} µs per socket round trip"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, BENCHMARKS.md left as it is")
    parser.add_argument("--only", nargs="+", choices=BENCHES, help="run only these benchmarks")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a benchmark is stopped")
    args = parser.parse_args()

    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (f"{os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
               f"{platform.system()} {platform.release()}; {machine_speed()}")
    table, sections = [], []
    for script in args.only or BENCHES:
        print(f"running tools/bench/{script} ...", flush=True)
        rows, output, elapsed = run(script, QUICK_ARGS[script] if args.quick else [], args.timeout)
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
    if args.quick or args.only:
        print("\n".join(lines))  # a partial or smoke run never replaces the full report
    else:
        (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))
        print("\n".join(lines[:len(table) + 7]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
