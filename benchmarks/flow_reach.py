"""How far in time gradient flow gets within a wall-clock budget: homoflow vs a plain solve.

On the default problem of ``homoflow run`` (bias-free two-layer ReLU, width 100, N = 100,
d = 10, exponential loss), both measured in the same run with the same budget:

- homoflow: ``homoflow.flow.flow`` (diffrax to t0, then log-polar time with ROS2) with
  ``max_wall_s`` = budget, which starts after ``flow`` has compiled its programs (the
  compile time is printed separately; the plain solve also compiles before its budget);
- baseline: a plain ``diffrax.diffeqsolve`` of d theta/dt = -grad L in original time, Tsit5 +
  PIDController (rtol 1e-6, atol 1e-9), chained over segments [t, t + dt] of at most 4096
  steps each (dt doubles after a segment that finishes and halves after one that runs out
  of steps), until the budget is spent. Its vector field is exp(log L) grad log L, which
  underflows to exactly 0 once L < 1e-308 (log t ~ 700): the plain solve cannot pass that.

Prints the largest log t each reached, their ratio, homoflow's solver steps and wall time
per decade of log t, and an audit of issue 3's checks on homoflow's run (``audit``);
writes
``benchmarks/results/flow_reach.json``.

    python benchmarks/flow_reach.py [--budget 120] [--polar-tol 1e-6] [--stiff-ref 1e5]
                                    [--no-plain]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from _report import RESULTS, write_report
from homoflow import data, losses, models
from homoflow.flow import flow
from homoflow.problem import make_problem


def default_problem():
    X, y = data.linearly_separable(100, 10, 0)
    model = models.mlp((10, 100, 1))
    return make_problem(model, losses.exponential(), X, y), model.init(jax.random.PRNGKey(0))


def plain_reach(problem, params0, budget: float) -> dict:
    flat0, unravel = ravel_pytree(params0)

    def vector_field(t, y, args):
        log_loss, grad = jax.value_and_grad(lambda z: problem.log_loss(unravel(z)))(y)
        return -jnp.exp(log_loss) * grad

    @jax.jit
    def segment(t0, t1, y0):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vector_field), diffrax.Tsit5(), t0=t0, t1=t1, dt0=None, y0=y0,
            stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-9),
            saveat=diffrax.SaveAt(t1=True), max_steps=4096, throw=False)
        return sol.ys[-1], sol.result == diffrax.RESULTS.successful, sol.stats["num_steps"]

    segment(0.0, 1e-3, flat0)  # compile
    start, t, y, dt, steps = time.perf_counter(), 0.0, flat0, 1e-2, 0
    while time.perf_counter() - start < budget:
        y_new, ok, n = segment(t, t + dt, y)
        steps += int(n)
        if bool(ok):
            t, y, dt = t + dt, y_new, 2.0 * dt
        else:
            dt *= 0.5
    log_loss = float(problem.log_loss(unravel(y)))
    return {"log_t": math.log(t) if t > 0 else -math.inf, "t": t, "steps": steps,
            "log_loss": log_loss, "wall_s": time.perf_counter() - start}


def homoflow_reach(problem, params0, budget: float, polar_tol: float = 1e-6,
                   stiff_ref: float = 1e5, u_tol: float | None = None) -> dict:
    start = time.perf_counter()
    traj = flow(problem, params0, log_t_max=1e12, max_wall_s=budget, n_saves=400,
                polar_rtol=polar_tol, polar_atol=polar_tol, stiff_ref=stiff_ref, u_tol=u_tol,
                progress=False,
                snapshots=False)
    c = traj.columns
    decades = []
    lt, steps, wall = c["log_T"], c["step"], c["wall_s"]
    for k in range(0, int(math.floor(math.log10(max(lt[-1], 1.0)))) + 1):
        inside = (lt >= 10.0 ** k) & np.isfinite(lt)
        if inside.sum() and k + 1 <= math.log10(lt[-1]):
            i0, i1 = np.argmax(inside), np.argmax(lt >= 10.0 ** (k + 1))
            decades.append({"decade": f"1e{k}..1e{k + 1}", "steps": int(steps[i1] - steps[i0]),
                            "wall_s": float(wall[i1] - wall[i0])})
    return {"log_t": float(lt[-1]), "steps": int(steps[-1]), "log_loss": float(c["log_loss"][-1]),
            "one_minus_beta": float(1 - c["flow_beta"][-1]),
            "one_minus_autodiff_beta": float(1 - c["beta"][-1]), "sliding": int(c["sliding"][-1]),
            "wall_s": time.perf_counter() - start,
            "compile_time_s": traj.meta["compile_time_s"],
            "flow_time_s": traj.meta["wall_time_s"], "status": traj.status, "decades": decades, "checks": audit(traj, problem.order)}


def audit(traj, L: float) -> dict:
    """Issue 3's checks after t0, for each the number of violations and the first log t of
    one: on every window between saved points, gamma_tilde non-decreasing (relative 1e-10)
    and Lemma C.9, its left side int |d theta_hat / d tau|^2 d tau = int (beta^-2 - 1) dtau
    (beta of the velocity the flow follows) by the end-corrected trapezoid rule over the
    solver's steps (``speed_integral``) and from the simulated path's chords
    (``path_energy``), and, as coarse comparisons, by the trapezoid rule over the saved
    points only, with that beta (``flow_beta``) and with the autodiff beta; at every saved
    point, Lemma 5.1 along the flow's velocity (d log gamma_tilde / d tau >=
    L ||d theta_hat / d tau||^2, relative 1e-9), and every value finite."""
    c = traj.columns
    i = np.nonzero((c["phase"] == 2) & c["separated"].astype(bool))[0]
    i = np.concatenate([[i[0] - 1], i])   # from the t0 record (path_energy = 0 there)
    g, tau, lt = (c[k][i] for k in ("smoothed_margin", "log_rho", "log_T"))
    energy = np.nan_to_num(c["path_energy"][i], nan=0.0)
    speed = np.nan_to_num(c["speed_integral"][i], nan=0.0)
    rhs = np.log(g[1:] / g[:-1]) / L

    def trapezoid(b):
        return 0.5 * ((b[1:] ** -2 - 1) + (b[:-1] ** -2 - 1)) * np.diff(tau)

    rate, speed2 = c["dlog_smoothed_dtau"][i[1:]], c["speed2"][i[1:]]
    finite = np.all([np.isfinite(c[k][i[1:]]) for k in
                     ("smoothed_margin", "normalized_margin", "log_rho", "log_T", "log_loss",
                      "flow_beta", "path_energy", "speed_integral", "dlog_smoothed_dtau",
                      "speed2")], axis=0)
    out = {"windows": int(len(rhs))}
    for name, bad in (("gamma_tilde_decreases", g[1:] < g[:-1] * (1 - 1e-10)),
                      ("lemma_c9_speed_integral", np.diff(speed) > rhs),
                      ("lemma_c9_path_energy", np.diff(energy) > rhs),
                      ("lemma_5_1", rate < L * speed2 * (1 - 1e-9)),
                      ("nonfinite", ~finite),
                      ("lemma_c9_saved_points_flow_beta (coarse)",
                       trapezoid(c["flow_beta"][i]) > rhs),
                      ("lemma_c9_saved_points_autodiff_beta (coarse)",
                       trapezoid(c["beta"][i]) > rhs)):
        out[name] = {"violations": int(bad.sum()),
                     "first_log_t": float(lt[1:][bad][0]) if bad.any() else None}
    # how far the accurate Lemma C.9 sides overshoot, relative to the right side
    for name, lhs in (("lemma_c9_speed_integral", np.diff(speed)),
                      ("lemma_c9_path_energy", np.diff(energy))):
        out[name]["max_relative_excess"] = float(np.max(lhs / rhs - 1.0))
        for k in range(1, 13):  # violations by decade of log t (where the window ends)
            inside = (lt[1:] >= 10.0 ** (k - 1)) & (lt[1:] < 10.0 ** k)
            if inside.any():
                out[name].setdefault("by_decade", {})[f"1e{k - 1}..1e{k}"] = {
                    "windows": int(inside.sum()),
                    "violations": int((lhs[inside] > rhs[inside]).sum()),
                    "max_relative_excess": float(np.max(lhs[inside] / rhs[inside] - 1.0))}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120.0, help="wall-clock seconds per engine")
    ap.add_argument("--polar-tol", type=float, default=1e-6,
                    help="homoflow's phase-2 rtol = atol (flow's default 1e-6)")
    ap.add_argument("--stiff-ref", type=float, default=1e5,
                    help="flow's stiff_ref: the tolerances shrink like e^{-L tau} past "
                         "e^{L tau} = this (inf: fixed tolerances)")
    ap.add_argument("--u-tol", type=float, default=None,
                    help="flow's u_tol (the fast-slow error control on the per-point log "
                         "losses; use with --stiff-ref inf)")
    ap.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                    help="also run the plain Tsit5 baseline (--no-plain skips it)")
    ap.add_argument("--out", type=Path,
                    default=RESULTS / "flow_reach.json")
    args = ap.parse_args(argv)
    problem, params0 = default_problem()
    hf = homoflow_reach(problem, params0, args.budget, args.polar_tol, args.stiff_ref,
                        args.u_tol)
    plain = (plain_reach(problem, params0, args.budget) if args.plain else
             {"log_t": math.nan, "log_loss": math.nan, "steps": 0, "wall_s": 0.0})
    print(f"budget {args.budget:g} s per engine on {jax.devices()[0].device_kind}")
    print(f"homoflow flow : log t = {hf['log_t']:.6g}  (log L = {hf['log_loss']:.6g}, "
          f"{hf['steps']} steps, 1 - beta = {hf['one_minus_beta']:.3g} (flow's velocity; "
          f"autodiff's {hf['one_minus_autodiff_beta']:.3g}), {hf['sliding']} kinks sliding, "
          f"{hf['wall_s']:.1f} s: {hf['compile_time_s']:.1f} s compiling, then "
          f"{hf['flow_time_s']:.1f} s of the budget)")
    print(f"plain Tsit5   : log t = {plain['log_t']:.6g}  (log L = {plain['log_loss']:.6g}, "
          f"{plain['steps']} steps, {plain['wall_s']:.1f} s)")
    ratio = hf["log_t"] / plain["log_t"] if plain["log_t"] > 0 else math.nan
    print(f"ratio of log t reached (homoflow / plain): {ratio:.4g}")
    for d in hf["decades"]:
        print(f"  log t in {d['decade']:>10}: {d['steps']:>7} steps, {d['wall_s']:7.2f} s")
    checks = hf["checks"]
    print(f"checks over {checks['windows']} windows between saved points after t0:")
    for k, v in checks.items():
        if k == "windows":
            continue
        print(f"  {k:>40}: {v['violations']} violations"
              + (f", first at log t = {v['first_log_t']:.4g}" if v["violations"] else "")
              + (f" (left side at most {1 + v['max_relative_excess']:.4g} x the right)"
                 if v.get("max_relative_excess", -1) > 0 else ""))
    for k in ("lemma_c9_speed_integral", "lemma_c9_path_energy"):
        print(f"  {k} by decade of log t (windows, violations, largest left/right - 1):")
        for dec, v in checks[k]["by_decade"].items():
            print(f"    {dec:>10}: {v['windows']:>4} {v['violations']:>4} "
                  f"{v['max_relative_excess']:+.3g}")
    write_report({"budget_s": args.budget, "polar_tol": args.polar_tol,
                  "stiff_ref": args.stiff_ref, "homoflow": hf, "plain": plain,
                  "ratio_log_t": ratio},
                 args.out, "flow_reach.py", sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
