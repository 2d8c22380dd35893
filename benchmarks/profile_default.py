"""The README's main job, `dynamo profile --out DIR` on the embedded default, with dynamo's default threads
against ``OMP_NUM_THREADS=1``, in one run.

Run by hand (not a test)::

    python benchmarks/profile_default.py                 # the whole main job, both ways
    python benchmarks/profile_default.py --limit 32      # a quick check that it works

Each way runs the installed ``dynamo`` command in a fresh process, into a fresh folder, one after
the other (never together: they would share the cores). Prints, per way, the wall and CPU seconds
of the whole command and the seconds of each stage (``summary.json``'s ``seconds``: record, phases,
dynamics), then the ratio default / one-thread of the wall times (dynamo's default must not be
slower: at most 1.05), and whether the two ways printed the same numbers. ``--json FILE`` writes it all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WAYS = {"default threads": {}, "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"}}


def run_profile(out: Path, env_extra: dict, limit: int | None) -> dict:
    """Time one `dynamo profile --out OUT` in a fresh process; its stage seconds and headline numbers."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"} | env_extra
    command = [str(Path(sys.executable).with_name("dynamo")), "profile", "--out", str(out), "--quiet",
               *(["--limit", str(limit)] if limit else [])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((out / "summary.json").read_text())
    numbers = {"partition": summary["partition"], "similarity": summary["similarity"],
               **{name: {k: v for k, v in entry.items() if isinstance(v, (int, float))}
                  for name, entry in summary["dynamics"].items()}}
    return {"command": " ".join(command), "env": env_extra, "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "stages_s": summary["seconds"], "numbers": numbers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="use only N images (a quick check; default the whole job)")
    parser.add_argument("--out-dir", help="where the profile folders go (default a temporary folder, removed)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    root = Path(args.out_dir or tempfile.mkdtemp(prefix="profile-default-"))
    try:
        results = {way: run_profile(root / f"profile-{i}", env, args.limit) for i, (way, env) in enumerate(WAYS.items())}
    finally:
        if args.out_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    default, single = results["default threads"], results["OMP_NUM_THREADS=1"]
    report = {"cores": os.cpu_count(), "limit": args.limit, "results": results,
              "ratio_default_over_one_thread": round(default["wall_s"] / single["wall_s"], 3),
              "same_numbers": default["numbers"] == single["numbers"]}
    stages = list(dict.fromkeys(stage for result in results.values() for stage in result["stages_s"]))
    print(f"dynamo profile (embedded default{f', --limit {args.limit}' if args.limit else ''}) on {os.cpu_count()} cores")
    print(f"{'':<20}{'wall s':>8}{'cpu s':>8}" + "".join(f"{stage:>10}" for stage in stages))
    for way, result in results.items():
        print(f"{way:<20}{result['wall_s']:>8}{result['cpu_s']:>8}"
              + "".join(f"{result['stages_s'].get(stage, float('nan')):>10}" for stage in stages))
    print(f"default / one thread (wall): {report['ratio_default_over_one_thread']} (must be <= 1.05); "
          f"same numbers: {report['same_numbers']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
