"""The CLI's persistent compilation cache: ``homoflow run --steps 1000`` twice on the same
machine, the first time with an empty cache directory, the second with the cache the first
one filled. Reports, for each call, the time from process start to the printed run summary
(the first result), the run's own wall time (the summary's "wall time (s)") and the whole
process (which adds the closing KKT report, its polish and the figures).

    python benchmarks/cli_cache.py [--steps 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args(argv)
    homoflow = Path(sys.executable).with_name("homoflow")
    scratch = Path(tempfile.mkdtemp(prefix="homoflow-cli-cache-"))
    env = dict(os.environ, HOMOFLOW_CACHE_DIR=str(scratch / "cache"))
    try:
        for label in ("first (empty cache)", "second (warm cache)"):
            out = scratch / label.split()[0]
            start = time.perf_counter()
            proc = subprocess.Popen([str(homoflow), "run", "--steps", str(args.steps), "--out",
                                     str(out), "--no-progress"], stdout=subprocess.PIPE,
                                    text=True, env=env)
            first, engine = None, None
            for line in proc.stdout:
                if first is None and "wall time" in line:
                    first, engine = time.perf_counter() - start, line.split()[-1]
            if proc.wait() != 0:
                print(f"{label}: homoflow run exited with {proc.returncode}")
                return 1
            print(f"{label}: first result (run summary) at {first:.2f} s, run wall time "
                  f"{engine} s, process done at {time.perf_counter() - start:.2f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
