"""Clarke-exact certificates along the default problem's gradient flow (issue 13).

The default problem (bias-free two-layer ReLU, width 100, N = 100, d = 10, exponential
loss), gradient flow to log t = ``--log-t`` (default 1e4), saved at log-spaced points. At
every saved point after t0: the Clarke KKT residual (``kkt_residual``, the default), the
autodiff one (``selection="autodiff"``), the number of active kinks, 1 - beta for
autodiff's gradient and for the minimum-norm Clarke element (``beta_clarke``, the
velocity the flow follows), and the Clarke residual of an independent convex solve
(cvxpy/Clarabel, ``tests/clarke_reference.py``) at ``--check`` of them. Prints the last
value in every decade of log t, the largest relative difference to the independent solve,
and whether the Clarke residual falls over the last three decades; then the polish from
the last point and its Clarke residual.

    python benchmarks/clarke_flow.py [--log-t 1e4] [--check 4]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

from _report import RESULTS, write_report  # noqa: E402
from homoflow import data, kkt, losses, models  # noqa: E402
from homoflow.flow import flow  # noqa: E402
from homoflow.problem import make_problem  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log-t", type=float, default=1e4, help="flow to this log t")
    ap.add_argument("--check", type=int, default=4,
                    help="saved points checked against the independent solve (0: none)")
    ap.add_argument("--polish", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", type=Path, default=RESULTS / "clarke_flow.json")
    args = ap.parse_args(argv)

    X, y = data.linearly_separable(100, 10, 0)
    model = models.mlp((10, 100, 1))
    prob = make_problem(model, losses.exponential(), X, y)
    start = time.perf_counter()
    traj = flow(prob, model.init(jax.random.PRNGKey(0)), log_t_max=args.log_t, n_saves=60,
                progress=True)
    wall = time.perf_counter() - start
    after = np.nonzero((traj["phase"] == 2) & (traj["log_T"] >= 1.0))[0]
    snaps = jax.tree_util.tree_map(lambda a: jnp.asarray(a[after]), traj.snapshots)
    autodiff = jax.jit(jax.vmap(lambda p, th: kkt.kkt_residual(p, th, selection="autodiff")
                                .eps, (None, 0)))(prob, snaps)
    rows = {"log_t": traj["log_T"][after], "clarke_eps": traj["kkt_eps"][after],
            "clarke_delta": traj["kkt_delta"][after], "autodiff_eps": np.asarray(autodiff),
            "n_kinks": traj["kkt_n_kinks"][after], "sliding": traj["sliding"][after],
            "one_minus_beta": 1 - traj["beta"][after],
            "one_minus_beta_clarke": 1 - traj["beta_clarke"][after]}
    print(f"flow to log t = {traj['log_T'][-1]:.4g} in {wall:.1f} s "
          f"(compile {traj.meta.get('compile_time_s', math.nan):.1f} s), status {traj.status}")
    print("| log t | Clarke eps | delta | autodiff eps | kinks | sliding | 1 - beta | "
          "1 - beta_clarke |")
    print("|---|---|---|---|---|---|---|---|")
    decade = np.floor(np.log10(rows["log_t"]))
    last_of_decade = [int(np.nonzero(decade == k)[0][-1]) for k in np.unique(decade)]
    for i in last_of_decade:
        print(f"| {rows['log_t'][i]:.4g} | {rows['clarke_eps'][i]:.4g} | "
              f"{rows['clarke_delta'][i]:.3g} | {rows['autodiff_eps'][i]:.4g} | "
              f"{int(rows['n_kinks'][i])} | {int(rows['sliding'][i])} | "
              f"{rows['one_minus_beta'][i]:.3g} | {rows['one_minus_beta_clarke'][i]:.3g} |")
    top = np.log10(rows["log_t"][-1])
    last3 = [i for i in last_of_decade if decade[i] >= top - 3]
    falls = bool(np.all(np.diff(rows["clarke_eps"][last3]) < 0))
    print(f"Clarke eps falls from decade to decade over the last three: {falls}")
    report = {"wall_s": wall, "log_t_reached": float(traj["log_T"][-1]),
              "per_decade": {k: [float(rows[k][i]) for i in last_of_decade] for k in rows},
              "falls_last_three_decades": falls}
    if args.check:
        from clarke_reference import clarke_eps_reference
        worst = 0.0
        for i in np.unique(np.linspace(0, len(after) - 1, args.check).round().astype(int)):
            theta = jax.tree_util.tree_map(lambda a: jnp.asarray(a[after[i]]), traj.snapshots)
            ref, _, ref_kinks = clarke_eps_reference(prob, theta)
            rel = abs(rows["clarke_eps"][i] - ref) / ref
            worst = max(worst, rel)
            print(f"log t = {rows['log_t'][i]:.4g}: homoflow {rows['clarke_eps'][i]:.10g}, "
                  f"cvxpy/Clarabel {ref:.10g} (relative {rel:.2g}; kinks "
                  f"{int(rows['n_kinks'][i])} / {ref_kinks})")
        report["largest_relative_difference_to_independent_solve"] = worst
    if args.polish:
        end = jax.tree_util.tree_map(lambda a: jnp.asarray(a[-1]), traj.snapshots)
        t = time.perf_counter()
        pol = kkt.polish_kkt(prob, end)
        report["polish"] = {"normalized_margin": pol.normalized_margin, "eps": pol.eps,
                            "delta": pol.delta, "message": pol.message,
                            "wall_s": time.perf_counter() - t,
                            "max_normalized_margin_of_run": float(np.nanmax(
                                traj["normalized_margin"]))}
        print(f"polish from the last point: gamma_bar {pol.normalized_margin:.10g} (run's "
              f"largest {np.nanmax(traj['normalized_margin']):.10g}), Clarke eps "
              f"{pol.eps:.3g}, delta {pol.delta:.3g}; {pol.message}")
    write_report(report, args.out, "clarke_flow.py", sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
