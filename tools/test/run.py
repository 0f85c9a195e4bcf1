"""`make test`: one pytest per service folder, plus one for common/ and one for tests/, each in its own
interpreter (the services share module names such as `main`), TEST_JOBS at a time (default: the cores).

Each run writes its output to .test-logs/<suite>.log; a failed run's log is printed whole. Extra pytest
arguments (PYTEST_ARGS) go to every run. Exit status: 0 when every run passed.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Longest first, so the last to start are the short ones.
SUITES = ["tests", "history-logger", "mqtt-bridge", "automation-engine", "scheduler", "common", "device-registry"]
LOGS = ROOT / ".test-logs"


def run(suite: str, slot: int, slots: int, args: list[str]) -> tuple[str, int, float, str]:
    log = LOGS / f"{suite}.log"
    # Each run takes its servers' ports from its own share of the port range (see common.testing.free_port).
    env = dict(os.environ, TEST_PORT_SLOT=f"{slot}/{slots}")
    started = time.monotonic()
    with log.open("w") as out:
        code = subprocess.call([sys.executable, "-m", "pytest", suite, *args], cwd=ROOT, env=env,
                               stdout=out, stderr=subprocess.STDOUT)
    lines = log.read_text(errors="replace").strip().splitlines()
    return suite, code, time.monotonic() - started, lines[-1] if lines else ""


def main() -> int:
    args = sys.argv[1:]
    jobs = int(os.environ.get("TEST_JOBS") or os.cpu_count() or 2)
    LOGS.mkdir(exist_ok=True)
    started = time.monotonic()
    failed = []
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run, suite, slot, len(SUITES), args) for slot, suite in enumerate(SUITES)]
        for future in futures:
            suite, code, seconds, summary = future.result()
            print(f"{suite:18} {'ok    ' if code == 0 else 'FAILED'} {seconds:7.1f} s  {summary}", flush=True)
            if code != 0:
                failed.append(suite)
    for suite in failed:
        print(f"\n========== {suite} ({LOGS / (suite + '.log')}) ==========")
        print((LOGS / f"{suite}.log").read_text(errors="replace"))
    print(f"\n{len(SUITES) - len(failed)} of {len(SUITES)} test runs passed in {time.monotonic() - started:.0f} s"
          f" ({jobs} at a time)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
