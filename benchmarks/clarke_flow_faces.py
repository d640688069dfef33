"""The Clarke KKT residual of the default problem's gradient flow at every saved point late
in the run, with the active kinks, 1 - beta of the minimum-norm Clarke element and the
normalized margin: where the flow releases kinks (leaves a face), eps rises while the
margin keeps rising. Run it at two phase-2 tolerances to tell the flow's own behaviour from
solver error (the default problem: bias-free two-layer ReLU, width 100, N = 100, d = 10).

    python benchmarks/clarke_flow_faces.py [--log-t 1e6] [--polar-rtol 1e-6] [--from 3e4]
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

from homoflow import configs, losses, make_problem  # noqa: E402
from homoflow.flow import flow  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log-t", type=float, default=1e6)
    ap.add_argument("--polar-rtol", type=float, default=1e-6)
    ap.add_argument("--from", dest="start", type=float, default=3e4,
                    help="print the saved points from this log t on")
    ap.add_argument("--saves", type=int, default=120)
    args = ap.parse_args(argv)
    config = configs.resolve(configs.defaults())   # homoflow run's default problem
    model = configs.build_model(config)
    prob = make_problem(model, losses.get_loss(config["loss"]), *configs.load_data(config))
    start = time.perf_counter()
    traj = flow(prob, model.init(jax.random.PRNGKey(config["seed"])), log_t_max=args.log_t,
                n_saves=args.saves, progress=False, polar_rtol=args.polar_rtol,
                rtol=min(args.polar_rtol, 1e-6), snapshots=False)
    print(f"polar_rtol {args.polar_rtol:g}: log t {traj['log_T'][-1]:.4g} in "
          f"{time.perf_counter() - start:.1f} s, status {traj.status}")
    print("| log t | Clarke eps | kinks | 1 - beta_clarke | normalized margin |")
    print("|---|---|---|---|---|")
    for i in np.nonzero(traj["log_T"] >= args.start)[0]:
        print(f"| {traj['log_T'][i]:.4g} | {traj['kkt_eps'][i]:.4f} | "
              f"{int(traj['kkt_n_kinks'][i])} | {1 - traj['beta_clarke'][i]:.3g} | "
              f"{traj['normalized_margin'][i]:.8f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
