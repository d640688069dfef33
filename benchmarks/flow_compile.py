"""Compile time against flow time: the first and second ``flow`` call on a new model.

A 2-D linear model on six points, exponential loss, flow to log t = 1e4 (50 saves, KKT
columns on), twice in one process. The first call compiles phase 1, the polar start, the
ROS2 loop and the recorder's programs (``meta["compile_time_s"]``); the second finds them
in jit's cache. ``max_wall_s`` counts only the part after compilation.

    python benchmarks/flow_compile.py
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from _report import RESULTS, write_report
from homoflow import losses, models
from homoflow.flow import flow
from homoflow.problem import make_problem


def main(argv=None) -> list:
    X = np.array([[1.0, 0.2], [0.8, -0.5], [-1.0, 0.3], [-0.6, -0.9], [0.3, 1.0],
                  [-0.2, -1.2]])
    y = np.array([1.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    model = models.linear(2)
    prob = make_problem(model, losses.exponential(), X, y)
    params0 = model.init(jax.random.PRNGKey(0))
    calls = []
    for i in range(2):
        start = time.perf_counter()
        traj = flow(prob, params0, log_t_max=1e4, n_saves=50, progress=False)
        calls.append({"call": i + 1, "wall_s": time.perf_counter() - start,
                      "compile_time_s": traj.meta["compile_time_s"],
                      "flow_time_s": traj.meta["wall_time_s"], "status": traj.status,
                      "phase1_steps": traj.meta["phase1"]["steps"],
                      "phase2_steps": traj.meta["phase2"]["steps"]})
        c = calls[-1]
        print(f"call {c['call']}: {c['wall_s']:.2f} s in all, {c['compile_time_s']:.2f} s "
              f"compiling, {c['flow_time_s']:.2f} s flowing ({c['phase1_steps']} + "
              f"{c['phase2_steps']} steps, {c['status']})")
    write_report({"calls": calls}, RESULTS / "flow_compile.json", "flow_compile.py",
                 sys.argv[1:] if argv is None else argv)
    return calls


if __name__ == "__main__":
    main()
