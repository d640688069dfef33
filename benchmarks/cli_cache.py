"""The CLI's persistent compilation cache: ``homoflow run --steps 1000`` twice on the same
machine, the first time with an empty cache directory, the second with the cache the first
one filled. Reports, for each call, the time from process start to the printed run summary
(the first result), the run's own wall time (the summary's "wall time (s)") and the whole
process (which adds the closing KKT report, its polish and the figures).

    python benchmarks/cli_cache.py [--steps 1000] [--repeats 3]

Each repeat starts from a fresh empty cache directory; the ratios of the repeats and their
median are printed (an empty-cache run varies with the machine's load and page cache:
9.6-27 s on one 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        ap.error(f"--steps and --repeats must be >= 1, got {args.steps} and {args.repeats}")
    homoflow = Path(sys.executable).with_name("homoflow")
    ratios = []
    for repeat in range(1, args.repeats + 1):
        scratch = Path(tempfile.mkdtemp(prefix="homoflow-cli-cache-"))
        env = dict(os.environ, HOMOFLOW_CACHE_DIR=str(scratch / "cache"))
        firsts = []
        try:
            for label in ("first (empty cache)", "second (warm cache)"):
                out = scratch / label.split()[0]
                start = time.perf_counter()
                proc = subprocess.Popen([str(homoflow), "run", "--steps", str(args.steps),
                                         "--out", str(out), "--no-progress"],
                                        stdout=subprocess.PIPE, text=True, env=env)
                first, engine = None, None
                for line in proc.stdout:
                    if first is None and "wall time" in line:
                        first, engine = time.perf_counter() - start, line.split()[-1]
                if proc.wait() != 0:
                    print(f"{label}: homoflow run exited with {proc.returncode}")
                    return 1
                firsts.append(first)
                print(f"repeat {repeat}, {label}: first result (run summary) at {first:.2f} s, "
                      f"run wall time {engine} s, process done at "
                      f"{time.perf_counter() - start:.2f} s", flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        ratios.append(firsts[0] / firsts[1])
        print(f"repeat {repeat}: first result {ratios[-1]:.2f}x sooner with the warm cache",
              flush=True)
    print(f"ratios {', '.join(f'{r:.2f}' for r in ratios)}; median "
          f"{statistics.median(ratios):.2f}x (load {os.getloadavg()[0]:.2f} at the end)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
