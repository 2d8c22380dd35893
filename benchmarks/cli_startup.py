"""Start-up time of the ``dynamo`` command against ``python -c pass``, measured in the same run.

Run by hand: ``python benchmarks/cli_startup.py [--runs 7]``; prints the median wall time of each
command and its ratio to ``python -c pass`` (JSON with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "dynamo --help": [sys.executable, "-m", "dynamo.pipeline.cli", "--help"],
    "dynamo profile --help": [sys.executable, "-m", "dynamo.pipeline.cli", "profile", "--help"],
}


def median_seconds(command: list[str], runs: int) -> float:
    """Median wall time of ``command`` over ``runs`` runs (output discarded; a failure raises)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seconds = {name: median_seconds(command, args.runs) for name, command in COMMANDS.items()}
    base = seconds["python -c pass"]
    rows = {name: {"median_s": round(s, 3), "ratio": round(s / base, 1)} for name, s in seconds.items()}
    if args.json:
        print(json.dumps(rows))
    else:
        for name, row in rows.items():
            print(f"{name:24s} {row['median_s']:7.3f} s  {row['ratio']:6.1f}x")


if __name__ == "__main__":
    main()
