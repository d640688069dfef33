"""Margin-rate race on one linear problem: how fast each method closes the l2 margin gap
gamma* - gamma_bar(w_t) against the exact hard-margin SVM (``kkt.svm_reference``).

    method                 predicted gap                          source
    GD (constant step)     ~ C / log t   (gap x log T flat)       Soudry et al., JMLR 2018
    normalized GD          O(1/t)        (log-log slope -1)       Ji & Telgarsky, ALT 2021
    dual acceleration      O(log t / t^2) (slope -2 up to logs)   Ji, Srebro & Telgarsky, ICML 2021
    progressive rescaling  exp(-c t)     (c = ln(growth)/period)  Wang, Min & Wu, ICML 2024

The problem: ``data.linearly_separable(10, 3, seed=5)`` scaled to max ||x_n|| = 1. All four
start from w = 0 with the exponential loss and run through ``homoflow.descent``
(``schedules.constant``, ``normalized``, ``dual_acceleration``, ``progressive_rescaling``).
Fits: the slope of log gap on log t over the last ``decades`` decades (for dual
acceleration also of log(gap / log t), its bound's shape); for progressive rescaling a
least-squares line of log gap on t.

Progressive rescaling's exponential rate needs its data assumption: with this fixed
schedule (step 1, radius doubled every 10 steps) the direction froze at gaps 1e-5 to 1e-2
on 13 of 17 random draws measured (n, d in {(20, 5), (10, 3), (12, 4)}, seeds 0-5); this
problem is one where it does not. Writes benchmarks/results/margin_rates.{json,png}.

    python benchmarks/margin_rates.py            # about 30 s on two cores
    python benchmarks/margin_rates.py --quick    # the test suite's version (a few seconds)
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

from homoflow import data, descent, losses, models, schedules
from homoflow.kkt import svm_reference
from homoflow.problem import make_problem

FULL = {"steps": 10_000, "gd_steps": 1_000_000, "decades": 2.0, "gd_decades": 3.0,
        "prgd_steps": 350}
QUICK = {"steps": 2_000, "gd_steps": 100_000, "decades": 1.0, "gd_decades": 3.0,
         "prgd_steps": 300}
GD_LR = 1.0   # T = t
DATA = {"n": 10, "dim": 3, "seed": 5}  # linearly_separable, scaled to max ||x_n|| = 1
PRGD = {"lr": 1.0, "radius0": 1.0, "growth": 2.0, "period": 10}
PREDICTED = {"gd": "gap x log T flat (within 2x)", "normalized_gd": -1.0,
             "dual_acceleration": -2.0,
             "progressive_rescaling": math.log(PRGD["growth"]) / PRGD["period"]}


def _policies():
    return {"gd": schedules.constant(GD_LR), "normalized_gd": schedules.normalized(1.0),
            "dual_acceleration": schedules.dual_acceleration(),
            "progressive_rescaling": schedules.progressive_rescaling(**PRGD)}


def race(cfg: dict) -> dict:
    """Run the four methods; return {method: {"t", "log_T", "gap", "wall_s"}} and gamma*."""
    X, y = data.linearly_separable(**DATA)
    X = X / np.linalg.norm(X, axis=1).max()
    problem = make_problem(models.linear(X.shape[1]), losses.exponential(), X, y)
    gamma = svm_reference(problem).margin
    curves = {}
    for name, policy in _policies().items():
        steps = {"gd": cfg["gd_steps"], "progressive_rescaling": cfg["prgd_steps"]}.get(
            name, cfg["steps"])
        grid = (np.arange(5, steps + 1, 5) if name == "progressive_rescaling" else
                np.unique(np.round(np.geomspace(1, steps, 80)).astype(int)))
        start = time.perf_counter()
        # rescaling raises the loss when the radius jumps: no divergence stop for it
        traj = descent(problem, (jnp.zeros((X.shape[1], 1)),), policy, steps, progress=False,
                       kkt=False, snapshots=False, record_at=grid, divergence_factor=1e300)
        cols = traj.columns
        curves[name] = {"t": cols["step"][1:].astype(float), "log_T": cols["log_T"][1:],
                        "gap": gamma - cols["normalized_margin"][1:],
                        "wall_s": time.perf_counter() - start}
    return {"gamma": gamma, "curves": curves}


def _slope(x, y):
    A = np.vstack([x, np.ones_like(x)]).T
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    r2 = 1.0 - resid @ resid / max(np.sum((y - y.mean()) ** 2), 1e-300)
    return float(coef[0]), float(r2)


def fit(result: dict, cfg: dict) -> dict:
    """Fitted vs predicted rate per method (see the module docstring)."""
    out = {}
    c = result["curves"]
    for name in ("normalized_gd", "dual_acceleration"):
        t, gap = c[name]["t"], c[name]["gap"]
        w = (t >= t[-1] / 10 ** cfg["decades"]) & (gap > 0)
        slope, r2 = _slope(np.log(t[w]), np.log(gap[w]))
        out[name] = {"fitted_slope": slope, "r2": r2, "predicted_slope": PREDICTED[name],
                     "window_t": [float(t[w][0]), float(t[w][-1])]}
        if name == "dual_acceleration":
            out[name]["fitted_slope_log_corrected"] = _slope(
                np.log(t[w]), np.log(gap[w] / np.log(t[w])))[0]
    t, log_T, gap = c["gd"]["t"], c["gd"]["log_T"], c["gd"]["gap"]
    w = t >= t[-1] / 10 ** cfg["gd_decades"]
    prod = gap[w] * log_T[w]
    out["gd"] = {"gap_x_log_T_max_over_min": float(prod.max() / prod.min()),
                 "gap_x_log_T": [float(prod[0]), float(prod[-1])],
                 "slope_of_log_gap_on_log_log_T": _slope(np.log(log_T[w]), np.log(gap[w]))[0],
                 "predicted": PREDICTED["gd"], "window_t": [float(t[w][0]), float(t[w][-1])]}
    t, gap = c["progressive_rescaling"]["t"], c["progressive_rescaling"]["gap"]
    w = (gap > 0) & (gap < 1e-3)
    slope, r2 = _slope(t[w], np.log(gap[w]))
    out["progressive_rescaling"] = {
        "fitted_rate": -slope, "r2": r2, "predicted_rate": PREDICTED["progressive_rescaling"],
        "final_gap": float(gap[-1]), "at_t": float(t[-1]),
        "window_t": [float(t[w][0]), float(t[w][-1])] if w.any() else None}
    return out


def figure(result: dict):
    """The four gap curves against t (log-log), a matplotlib Figure (no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for name, cur in result["curves"].items():
        ok = cur["gap"] > 0
        ax.loglog(cur["t"][ok], cur["gap"][ok], label=name.replace("_", " "))
    ax.set_xlabel("iteration t")
    ax.set_ylabel("γ* − γ̄(w_t)  (ℓ2)")
    ax.set_title("margin-gap race on a linear problem")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (the test suite's run)")
    ap.add_argument("--no-write", action="store_true", help="print only, write no files")
    args = ap.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    result = race(cfg)
    fits = fit(result, cfg)
    for name, f in fits.items():
        print(f"{name:22s} " + ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else
                                          f"{k} = {v}" for k, v in f.items()))
    for name, cur in result["curves"].items():
        print(f"{name:22s} {len(cur['t'])} records, {cur['wall_s']:.2f} s (compile included)")
    if not args.no_write:
        name = "margin_rates_quick" if args.quick else "margin_rates"
        RESULTS.mkdir(parents=True, exist_ok=True)
        figure(result).savefig(RESULTS / f"{name}.png", dpi=120)
        write_report({"config": cfg, "prgd": PRGD, "gamma": result["gamma"], "fits": fits},
                     RESULTS / f"{name}.json", "margin_rates.py", argv or sys.argv[1:])
    return fits


if __name__ == "__main__":
    main()
