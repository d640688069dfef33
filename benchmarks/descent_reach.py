"""How far loss-based gradient descent gets on the default problem, and why not faster.

1. Runs ``homoflow run``'s default problem (bias-free two-layer ReLU, width 100, N = 100,
   d = 10, exponential loss, loss-based scheduler of Appendix K.1) for ``--steps``
   iterations and reports log L, the wall time and the accept rate.
2. At the state reached, a line search over the step alpha in theta - alpha grad log L
   (alpha from 1e-10 to 1e6) gives the largest decrease of log L that *any* single
   gradient step can make there: the scheduler cannot beat it, so it bounds how many
   iterations a target log L needs.
3. Continues the run until log L <= ``--target`` and reports the iterations and time.

    python benchmarks/descent_reach.py [--steps 10000] [--target -1e5]
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

import homoflow
from _report import RESULTS, write_report
from homoflow import data, losses, models, schedules
from homoflow.problem import make_problem


def best_single_step(problem, params) -> tuple[float, float]:
    """(largest decrease of log L over one gradient step, the alpha that achieves it)."""
    log_loss, grad = jax.value_and_grad(problem.log_loss)(params)
    alphas = jnp.logspace(-10, 6, 641)
    step = lambda a: problem.log_loss(jax.tree_util.tree_map(lambda p, g: p - a * g, params, grad))
    new = jax.jit(jax.vmap(step))(alphas)
    i = int(jnp.argmin(new))
    return float(log_loss - new[i]), float(alphas[i])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10_000)
    ap.add_argument("--target", type=float, default=-1e5, help="log L to reach (natural log)")
    ap.add_argument("--max-steps", type=int, default=2_000_000)
    ap.add_argument("--out", type=Path,
                    default=RESULTS / "descent_reach.json")
    args = ap.parse_args(argv)

    X, y = data.linearly_separable(100, 10, 0)
    model = models.mlp((10, 100, 1))
    problem = make_problem(model, losses.exponential(), X, y)
    params0 = model.init(jax.random.PRNGKey(0))
    policy = schedules.loss_based()
    homoflow.descent(problem, params0, policy, 100, progress=False)  # compile

    start = time.perf_counter()
    traj = homoflow.descent(problem, params0, policy, args.steps, progress=False)
    wall = time.perf_counter() - start
    last = traj.last()
    final = jax.tree_util.tree_map(lambda x: jnp.asarray(x[-1]), traj.snapshots)
    gain, alpha = best_single_step(problem, final)
    log_loss = float(last["log_loss"])
    print(f"{args.steps} iterations ({int(last['attempts'])} attempts) in {wall:.2f} s: "
          f"log L = {log_loss:.6g} (log10 L = {log_loss / math.log(10):.6g}), "
          f"1 - beta = {1 - last['beta']:.3g}, gamma_bar = {last['normalized_margin']:.6g}")
    print(f"best single gradient step from there: log L decreases by {gain:.4g} "
          f"(alpha = {alpha:.3g}); the scheduler's mean gain per iteration over the last "
          f"decade: {_mean_gain(traj):.4g}")
    needed = (log_loss - args.target) / gain if gain > 0 else math.inf
    print(f"=> at least {needed:.3g} more iterations to reach log L = {args.target:g} "
          f"(if every step were the best step)")

    # continue until the target is reached (doubling the budget)
    steps, reach = args.steps, None
    while steps <= args.max_steps:
        steps *= 2
        start = time.perf_counter()
        traj = homoflow.descent(problem, params0, policy, steps, progress=False,
                                n_records=100, snapshots=False)
        seconds = time.perf_counter() - start
        hit = np.nonzero(traj["log_loss"] <= args.target)[0]
        print(f"{steps} iterations in {seconds:.1f} s: log L = {traj['log_loss'][-1]:.6g}")
        if hit.size:
            reach = {"iterations": int(traj["step"][hit[0]]), "run_iterations": steps,
                     "run_wall_s": seconds, "log_loss": float(traj["log_loss"][hit[0]])}
            print(f"log L <= {args.target:g} first recorded at iteration {reach['iterations']} "
                  f"(a {steps}-iteration run took {seconds:.1f} s)")
            break
    write_report({"steps": args.steps, "log_loss": log_loss, "wall_s": wall,
                  "attempts": int(last["attempts"]), "one_minus_beta": 1 - float(last["beta"]),
                  "best_single_step_gain": gain, "best_alpha": alpha, "target": args.target,
                  "reach": reach}, args.out, "descent_reach.py",
                 sys.argv[1:] if argv is None else argv)
    return 0


def _mean_gain(traj) -> float:
    step, ll = traj["step"], traj["log_loss"]
    i = np.searchsorted(step, step[-1] // 10)
    return float((ll[i] - ll[-1]) / (step[-1] - step[i]))


if __name__ == "__main__":
    sys.exit(main())
