"""Sliding on every layer: the flow on a deep ReLU MLP and on the paper-cnn CNN.

Two problems, each run by ``homoflow.flow.flow`` with sliding on (``homoflow.flow.deep``)
within a wall budget (compilation excluded, printed apart):

- ``mlp``: a depth-3 bias-free ReLU MLP (widths 10-50-50-1) on the default data
  (``linearly_separable(100, 10, 0)``), exponential loss, to log t = 10^6 (issue 14's target;
  floor 10^5);
- ``cnn``: the CNN of ``homoflow experiment paper-cnn --quick`` (its 200 MNIST 0/1 images,
  channels (4, 8), kernels (5, 3), hidden 16, a bias on the first convolution only, two outputs,
  cross-entropy), to log t = 10^3 in phase 2.

For each: the log t reached, solver steps (both phases), the per-decade table of log t
(phase-2 accepted and rejected steps, wall seconds, kinks in the sliding set, 1 - beta of
the velocity followed and of autodiff's element at the decade's end), and
``flow_reach.audit``'s checks (gamma_tilde non-decreasing after t0, Lemma 5.1 at every
saved point, Lemma C.9 on every window between saved points, finite values).

    python benchmarks/flow_depth.py [--budget 120] [--which mlp cnn] [--no-sliding]
        [--rtol 1e-6 --atol 1e-9] [--polar-tol 1e-6]
"""

from __future__ import annotations

import argparse
import math
import sys

import jax
import numpy as np

from _report import RESULTS, write_report
from flow_reach import audit
from homoflow import data, losses, models
from homoflow.flow import flow
from homoflow.problem import make_problem


def mlp_problem():
    X, y = data.linearly_separable(100, 10, 0)
    model = models.mlp((10, 50, 50, 1))
    return make_problem(model, losses.exponential(), X, y), model.init(jax.random.PRNGKey(0))


def cnn_problem():
    from homoflow.experiments.paper_cnn import QUICK
    # the experiment's own subset (``paper_cnn.run``): 200 training images, not the 12,665
    # of MNIST 0/1, whose N x P Jacobian by N pullbacks asked XLA for 37 TB
    extra = ({"train_size": QUICK.train_size, "test_size": QUICK.test_size,
              "seed": QUICK.seed} if QUICK.data == "mnist" else {})
    split = data.load(QUICK.data, classes=QUICK.classes, **extra)
    model = models.cnn(split.X_train.shape[1:], QUICK.channels, QUICK.kernel,
                       hidden=QUICK.hidden, n_outputs=len(split.classes), bias_first=True)
    problem = make_problem(model, losses.cross_entropy(), split.X_train, split.y_train)
    return problem, model.init(jax.random.PRNGKey(QUICK.seed))


def decades(traj) -> list[dict]:
    c = traj.columns
    lt = c["log_T"]
    out = []
    ph2 = np.nonzero(c["phase"] == 2)[0]
    if not len(ph2):
        return out
    k0 = int(math.floor(math.log10(max(lt[ph2[0]], 1e-3))))
    for k in range(k0, int(math.floor(math.log10(max(lt[-1], 1e-3)))) + 1):
        i0 = np.argmax(lt >= 10.0 ** k) if np.any(lt >= 10.0 ** k) else None
        i1 = np.argmax(lt >= 10.0 ** (k + 1)) if np.any(lt >= 10.0 ** (k + 1)) else len(lt) - 1
        if i0 is None or i1 <= i0:
            continue
        out.append({"decade": f"1e{k}..1e{k + 1}" if lt[i1] >= 10.0 ** (k + 1)
                    else f"1e{k}..{lt[i1]:.3g}",
                    "steps": int(c["step"][i1] - c["step"][i0]),
                    "rejected": int(c["rejected"][i1] - c["rejected"][i0]),
                    "wall_s": float(c["wall_s"][i1] - c["wall_s"][i0]),
                    "sliding": int(c["sliding"][i1]),
                    "one_minus_beta": float(1 - c["flow_beta"][i1]),
                    "one_minus_autodiff_beta": float(1 - c["beta"][i1])})
    return out


def run(name, problem, params0, log_t_max, budget, sliding, tol=None) -> dict:
    tol = tol or {}
    traj = flow(problem, params0, log_t_max=log_t_max, max_wall_s=budget, n_saves=200,
                progress=False, snapshots=False, kkt=False, sliding=sliding, **tol)
    c, m = traj.columns, traj.meta
    res = {"problem": name, "status": traj.status, "log_t": float(c["log_T"][-1]),
           "phase1": m.get("phase1"), "phase2": m.get("phase2"),
           "compile_time_s": m["compile_time_s"], "flow_time_s": m["wall_time_s"],
           "sliding_mode": m["solver"]["sliding"], "decades": decades(traj),
           "checks": audit(traj, problem.order)}
    p2 = res["phase2"] or {"steps": 0, "rejected": 0}
    print(f"\n{name}: {res['status']}, log t = {res['log_t']:.6g} "
          f"(sliding {'on' if res['sliding_mode'] else 'off'}); phase 1 "
          f"{res['phase1']['steps']} accepted / {res['phase1']['rejected']} rejected, phase 2 "
          f"{p2['steps']} / {p2['rejected']}; compile {res['compile_time_s']:.1f} s, flow "
          f"{res['flow_time_s']:.1f} s ({res['flow_time_s'] / max(p2['steps'] + p2['rejected'], 1) * 1e3:.1f} ms per phase-2 attempt)")
    print(f"  {'log t':>14} {'steps':>7} {'rejected':>8} {'wall s':>8} {'sliding':>7} "
          f"{'1-beta':>9} {'1-beta(ad)':>10}")
    for d in res["decades"]:
        print(f"  {d['decade']:>14} {d['steps']:>7} {d['rejected']:>8} {d['wall_s']:>8.1f} "
              f"{d['sliding']:>7} {d['one_minus_beta']:>9.3g} "
              f"{d['one_minus_autodiff_beta']:>10.3g}")
    ch = res["checks"]
    print(f"  checks over {ch['windows']} windows after t0: " + ", ".join(
        f"{k} {v['violations']}" for k, v in ch.items() if k != "windows"))
    for k in ("lemma_c9_speed_integral", "lemma_c9_path_energy"):
        print(f"    {k}: left side at most {1 + ch[k]['max_relative_excess']:.6g} x the right")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120.0, help="wall seconds per problem")
    ap.add_argument("--which", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    ap.add_argument("--sliding", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--mlp-log-t", type=float, default=1e6)
    ap.add_argument("--cnn-log-t", type=float, default=1e3)
    ap.add_argument("--rtol", type=float, default=1e-6, help="phase 1's rtol")
    ap.add_argument("--atol", type=float, default=1e-9, help="phase 1's atol")
    ap.add_argument("--polar-tol", type=float, default=1e-6,
                    help="phase 2's rtol = atol on theta_hat")
    args = ap.parse_args(argv)
    tol = dict(rtol=args.rtol, atol=args.atol, polar_rtol=args.polar_tol,
               polar_atol=args.polar_tol)
    print(f"tolerances: {tol}")
    out = {}
    if "mlp" in args.which:
        out["mlp"] = run("depth-3 ReLU MLP 10-50-50-1, N = 100", *mlp_problem(),
                         args.mlp_log_t, args.budget, args.sliding, tol)
    if "cnn" in args.which:
        out["cnn"] = run("paper-cnn --quick CNN (digits 0/1)", *cnn_problem(), args.cnn_log_t,
                         args.budget, args.sliding, tol)
    write_report({"budget_s": args.budget, "tolerances": tol, **out}, RESULTS / "flow_depth.json",
                 "flow_depth.py", list(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
