"""Large steps on logistic regression: the edge-of-stability phase (Wu, Bartlett, Telgarsky
& Yu, COLT 2024, "Large stepsize gradient descent for logistic loss").

GD with a constant step eta on 6 separable points in R^2 (``X_EOS``), logistic loss,
linear model, from w = 0.
For eta far above 2 / lambda_max(hess L(0)) (the classical stability limit, measured here
with ``geometry.sharpness``) the loss is non-monotone for the first steps, then falls and
ends below what any step that keeps the loss monotone reaches in the same number of
iterations. This records, per eta on a geometric grid: the number of loss increases, the
final loss, the sharpness at the end (``descent(..., sharpness=True)``), and compares the
largest step with the best monotone ("stable") one.

    python benchmarks/edge_of_stability.py            # about 20 s on two cores
    python benchmarks/edge_of_stability.py --quick
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import RESULTS, write_report

from homoflow import descent, geometry, losses, models, schedules
from homoflow.problem import make_problem

FULL = {"steps": 5_000, "etas": 12}
QUICK = {"steps": 1_000, "etas": 6}
# separable along e_1 with a small margin (0.1), not along e_2, where the loss is steep: the
# shape of Wu et al.'s examples (a large step oscillates across e_2 until w_1 has grown)
X_EOS = np.array([[.1, 1], [.1, -1], [-.1, 1.5], [-.1, -1.5], [.2, .5], [-.2, -.3]])
Y_EOS = np.array([1, 1, -1, -1, 1, -1.0])
EARLY = 100   # the window (first iterations, every one recorded) where oscillation is counted


def run(cfg: dict) -> dict:
    problem = make_problem(models.linear(2), losses.logistic(), X_EOS, Y_EOS)
    w0 = (jnp.zeros((2, 1)),)
    lam0 = float(geometry.sharpness_jit(problem, w0).sharpness)
    etas = (2.0 / lam0) * np.geomspace(0.25, 1000.0, cfg["etas"])
    grid = np.unique(np.concatenate([np.arange(1, EARLY + 1),
                                     np.geomspace(EARLY, cfg["steps"], 30).round()])).astype(int)
    rows = []
    for eta in etas:
        start = time.perf_counter()
        traj = descent(problem, w0, schedules.constant(float(eta)), cfg["steps"],
                       progress=False, kkt=False, snapshots=False, record_at=grid,
                       divergence_factor=1e300, sharpness=True)
        ll = traj.columns["log_loss"]
        early = ll[: EARLY + 1]
        rows.append({"eta": float(eta), "eta_times_lambda0_over_2": float(eta * lam0 / 2),
                     "increases_early": int(np.sum(np.diff(early) > 0)),
                     "max_log_loss_early": float(early.max()),
                     "final_log_loss": float(ll[-1]),
                     "final_sharpness": float(traj.columns["sharpness"][-1]),
                     "monotone": bool(np.all(np.diff(ll) <= 0)),
                     "wall_s": time.perf_counter() - start})
    stable = [r for r in rows if r["monotone"]]
    best_stable = min(stable, key=lambda r: r["final_log_loss"]) if stable else None
    largest = rows[-1]
    return {"lambda0": lam0, "rows": rows, "best_stable": best_stable, "largest": largest,
            "log10_loss_ratio_largest_vs_best_stable":
                (largest["final_log_loss"] - best_stable["final_log_loss"]) / math.log(10)
                if best_stable else None}


def figure(result: dict):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    r = result["rows"]
    ax.loglog([x["eta"] for x in r], [math.exp(x["final_log_loss"]) for x in r], "o-")
    ax.axvline(2.0 / result["lambda0"], ls="--", c="gray", label="2 / λmax(0)")
    ax.set_xlabel("step size η")
    ax.set_ylabel("final loss")
    ax.set_title("GD on logistic regression: large steps win")
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    result = run(cfg)
    print(f"lambda_max(hess L(0)) = {result['lambda0']:.4g}, 2/lambda = "
          f"{2 / result['lambda0']:.4g}")
    print("eta          eta*lam/2  increases(first 100)  final log10 L   final sharpness")
    for r in result["rows"]:
        print(f"{r['eta']:<12.4g} {r['eta_times_lambda0_over_2']:<10.3g} "
              f"{r['increases_early']:<21d} {r['final_log_loss'] / math.log(10):<15.6g} "
              f"{r['final_sharpness']:.3g}")
    b = result["best_stable"]
    if b:
        print(f"best monotone step eta = {b['eta']:.4g}: final log10 L = "
              f"{b['final_log_loss'] / math.log(10):.6g}; largest step: "
              f"{result['largest']['final_log_loss'] / math.log(10):.6g} "
              f"({-result['log10_loss_ratio_largest_vs_best_stable']:.3g} decades lower)")
    if not args.no_write:
        name = "edge_of_stability_quick" if args.quick else "edge_of_stability"
        RESULTS.mkdir(parents=True, exist_ok=True)
        figure(result).savefig(RESULTS / f"{name}.png", dpi=120)
        write_report({"config": cfg, **{k: v for k, v in result.items()}},
                     RESULTS / f"{name}.json", "edge_of_stability.py", argv or sys.argv[1:])
    return result


if __name__ == "__main__":
    main()
