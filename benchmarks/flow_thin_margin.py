"""Solver steps of both flow phases on a thin-margin linear problem with one far support
point, against a 40-point problem (issue 14, finding b).

Problems (linear model in R^2, exponential loss, to log t = 20):
- ``40-point``: ``data.linearly_separable(40, 2, 0)``;
- ``thin, far = F``: five points whose y_n x_n are (0.05, F), (0.05, -1), (0.05, 1 - F),
  (0.6, 0.3), (0.8, -0.2): max margin 0.05 along e1, the first three are support vectors
  and the first lies |x| ~ F from the origin along the decision boundary.

Finding (printed): the far support point costs phase 1 (Tsit5 + PID in original time)
steps in proportion to |x_far|^2 while t0 does not change: the explicit solver is held at
its stability limit dt ~ 3 / lambda_max by the Hessian's eigenvalue
lambda_max ~ l_far |x_far|^2 (a support point's loss share does not decay), and the time
to reach t0 is set by the thin margin; rejected steps are the PID controller oscillating at
that limit. Phase 2 (ROS2, a W-method with the Gauss-Newton Jacobian) is unaffected.

    python benchmarks/flow_thin_margin.py [--far 3 20]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from _report import RESULTS, write_report
from homoflow import data, losses, models
from homoflow.flow import flow
from homoflow.problem import make_problem


def thin_problem(far: float):
    yx = np.array([[0.05, far], [0.05, -1.0], [0.05, 1.0 - far], [0.6, 0.3], [0.8, -0.2]])
    y = np.array([1.0, -1.0, 1.0, -1.0, 1.0])
    return yx * y[:, None], y


def run(model, loss, X, y) -> dict:
    prob = make_problem(model, loss, X, y)
    start = time.perf_counter()
    traj = flow(prob, model.init(jax.random.PRNGKey(0)), log_t_max=20.0, n_saves=5,
                progress=False, kkt=False, snapshots=False, t0_limit=1e12,
                max_steps=3_000_000)
    m = traj.meta
    return {"t0": m["t0"], "phase1_steps": m["phase1"]["steps"],
            "phase1_rejected": m["phase1"]["rejected"], "phase2_steps": m["phase2"]["steps"],
            "phase2_rejected": m["phase2"]["rejected"], "wall_s": time.perf_counter() - start,
            "normalized_margin": float(traj["normalized_margin"][-1])}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--far", type=float, nargs="+", default=[3.0, 20.0])
    args = parser.parse_args(argv)
    model, loss = models.linear(2), losses.exponential()
    rows = {"40-point": run(model, loss, *data.linearly_separable(40, 2, 0))}
    for far in args.far:
        rows[f"thin, far = {far:g}"] = run(model, loss, *thin_problem(far))
    print(f"{'problem':<18}{'t0':>10}{'p1 acc':>9}{'p1 rej':>9}{'p2 acc':>9}{'p2 rej':>9}"
          f"{'wall s':>9}")
    for name, r in rows.items():
        print(f"{name:<18}{r['t0']:>10.4g}{r['phase1_steps']:>9}{r['phase1_rejected']:>9}"
              f"{r['phase2_steps']:>9}{r['phase2_rejected']:>9}{r['wall_s']:>9.1f}")
    write_report({"rows": rows}, RESULTS / "flow_thin_margin.json", "flow_thin_margin.py",
                 sys.argv[1:] if argv is None else argv)
    return rows


if __name__ == "__main__":
    main()
