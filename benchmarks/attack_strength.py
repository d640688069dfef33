"""Is the experiment's L2 attack strong enough? Median attack radius at the default budget
against budgets 10x and 100x larger, on the same test points of one trained checkpoint.

The attack's budget is binary-search steps x Adam iterations per search. The default is the
experiment's (``paper_cnn.Config``: 5 x 100, 3 polish rounds). The larger budgets move toward
Carlini & Wagner's settings used by the paper (9 binary-search steps x 10 000 iterations):
10x = 9 x 556, 100x = 9 x 5 556 (polish 3 rounds each). A stronger attack can only find
closer misclassified points (every radius is an upper bound on the robustness R(z)), so the
default is adequate when its median radius is within 2 % of the strongest budget's; otherwise
the script says by how much it is not and the default should be raised.

The checkpoint is model-``--model`` of a finished ``homoflow experiment paper-cnn`` run
directory (``--run``); without one, the script trains the ``--quick`` configuration first.

    python benchmarks/attack_strength.py --run runs/paper-cnn-mnist [--model 4] [--points 50]
        [--budgets 1 10 100]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import RESULTS, write_report  # noqa: E402

from homoflow import attacks, data  # noqa: E402
from homoflow.experiments import paper_cnn  # noqa: E402

DEFAULT = paper_cnn.Config()


def budget(factor: float) -> tuple[int, int]:
    """(binary steps, iterations per step) with factor x the default's total iterations."""
    if factor == 1:
        return DEFAULT.attack_binary_steps, DEFAULT.attack_steps
    total = factor * DEFAULT.attack_binary_steps * DEFAULT.attack_steps
    return 9, int(math.ceil(total / 9))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="a paper-cnn run directory (default: train "
                    "the --quick configuration into a temporary directory)")
    ap.add_argument("--model", type=int, default=4, help="model-k checkpoint to attack")
    ap.add_argument("--points", type=int, default=50, help="test points attacked")
    ap.add_argument("--budgets", type=float, nargs="+", default=[1, 10, 100])
    ap.add_argument("--out", default=str(RESULTS / "attack_strength.json"))
    args = ap.parse_args(argv)
    run = Path(args.run) if args.run else Path(tempfile.mkdtemp(prefix="attack_strength_"))
    if not (run / "checkpoints.npz").exists():
        print(f"training the quick configuration into {run} ...")
        paper_cnn.run(paper_cnn.QUICK, run, progress=False)
    config, model, params = paper_cnn.load_checkpoint(run, f"model-{args.model}")
    extra = ({"train_size": config.train_size, "test_size": config.test_size,
              "seed": config.seed} if config.data == "mnist" else {})
    split = data.load(config.data, classes=config.classes, **extra)
    X, y = split.X_test[:args.points], split.y_test[:args.points]
    rows = []
    for factor in args.budgets:
        steps_b, steps = budget(factor)
        t = time.perf_counter()
        res = attacks.l2_attack(model.apply, params, X, y, box=(0.0, 1.0),
                                binary_steps=steps_b, steps=steps,
                                polish_steps=DEFAULT.attack_polish, batch=DEFAULT.attack_batch)
        wall = time.perf_counter() - t
        d = res.distance
        rows.append({"factor": factor, "binary_steps": steps_b, "steps": steps,
                     "median_radius": float(np.median(d)), "mean_radius": float(np.mean(d)),
                     "found": int(np.sum(np.isfinite(d))), "wall_s": wall, "radii": d.tolist()})
        print(f"budget {factor:g}x ({steps_b} x {steps}): median radius "
              f"{rows[-1]['median_radius']:.5f}, {wall:.0f} s")
    ref = rows[-1]["median_radius"]
    default = rows[0]["median_radius"]
    gap = default / ref - 1.0
    per_point = np.asarray(rows[0]["radii"]) / np.asarray(rows[-1]["radii"]) - 1.0
    verdict = ("adequate" if gap <= 0.02 else
               f"too weak: raise the default (median {100 * gap:.1f} % above the strongest)")
    print(f"default median {default:.5f} vs {rows[-1]['factor']:g}x {ref:.5f}: "
          f"{100 * gap:+.2f} % -> {verdict}")
    report = {"run": str(run), "model": f"model-{args.model}", "points": len(y),
              "data": config.data, "budgets": rows, "default_over_strongest_median": gap,
              "max_per_point_excess": float(np.nanmax(per_point)), "verdict": verdict,
              "load_average": os.getloadavg()}
    write_report(report, Path(args.out), "attack_strength.py", list(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
