"""Gradient-descent speed of homoflow against a plain PyTorch eager loop.

Measures attempts per second (one attempt = a parameter update and the loss at the
candidate, plus the gradient there if it is accepted; rejected loss-based attempts count)
of ``homoflow.descent`` on the default problem of ``homoflow run``: a bias-free two-layer
ReLU network (10-100-1) with the exponential loss on ``data.linearly_separable(100, 10, 0)``, for the loss-based scheduler
and a constant step size of 1e-4.

The baseline is the same math written the way a researcher would in PyTorch: eager mode,
CPU, float64, log L = logsumexp(-y Phi) and its gradient by autograd: one forward pass per
attempt at the candidate, and the backward pass only when the candidate is accepted (its
gradient is then the next step's), which is also exactly the work homoflow does. Both
run in the same process from the same initial parameters. The script reports median
times over ``--repeats`` runs, the ratio of the rates (homoflow / torch) per policy, and
checks that both compute the same iterates: after ``--torch-steps`` constant-step
iterations their final log L agree to 1e-8 relative. The loss-based runs are compared
but not checked: the scheduler keeps the step at the edge of stability, where rounding
differences eventually flip an accept/reject decision (here after about 100 iterations).

    python benchmarks/descent_speed.py [--steps 20000] [--torch-steps 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

try:
    import torch
except ImportError:
    sys.exit("descent_speed.py needs PyTorch for its baseline: "
             "pip install 'homoflow[bench]' (or pip install torch)")

import jax
import numpy as np

import homoflow
from _report import RESULTS, write_report
from homoflow import data, losses, models, schedules
from homoflow.problem import make_problem

LR = 1e-4                                  # the constant policy's step size
ALPHA0, R_U, R_D = 0.1, 2 ** (1 / 5), 2 ** (1 / 10)  # the loss-based scheduler's defaults
POLICIES = {"loss_based": lambda: schedules.loss_based(ALPHA0, R_U, R_D),
            "constant": lambda: schedules.constant(LR)}
AGREEMENT_RTOL = 1e-8


def build_problem():
    X, y = data.linearly_separable(100, 10, 0)
    model = models.mlp((10, 100, 1))
    problem = make_problem(model, losses.exponential(), X, y)
    return problem, X, y, model.init(jax.random.PRNGKey(0))


def homoflow_run(problem, params0, policy: schedules.Policy, steps: int):
    """(seconds, attempts, final log L) of one ``homoflow.descent`` call."""
    start = time.perf_counter()
    with warnings.catch_warnings():  # "not separated" is irrelevant to speed
        warnings.simplefilter("ignore")
        tr = homoflow.descent(problem, params0, policy, steps, progress=False,
                              n_records=2, snapshots=False)
    seconds = time.perf_counter() - start
    return seconds, int(tr.columns["attempts"][-1]), float(tr.columns["log_loss"][-1])


def torch_log_loss(W, X, y):
    """log L = logsumexp(-y Phi), Phi = relu(X W1) W2, with its autograd graph."""
    return torch.logsumexp(-y * (torch.relu(X @ W[0]) @ W[1])[:, 0], dim=0)


def torch_value_and_grad(W, X, y):
    """log L and its gradient in W = (W1, W2)."""
    log_loss = torch_log_loss(W, X, y)
    return log_loss.detach(), torch.autograd.grad(log_loss, W)


def _step(W, grad, scale):
    with torch.no_grad():
        return tuple((w - scale * g).requires_grad_() for w, g in zip(W, grad))


def torch_loss_based(W, X, y, steps: int):
    """theta <- theta - alpha grad log L; alpha *= r_u if log L decreased, else retry with
    alpha / r_d. Returns (attempts, final log L)."""
    log_loss, grad = torch_value_and_grad(W, X, y)
    alpha, accepted, attempts = ALPHA0, 0, 0
    while accepted < steps:
        candidate = _step(W, grad, alpha)
        new_log_loss = torch_log_loss(candidate, X, y)
        attempts += 1
        if new_log_loss < log_loss:  # backward pass only for accepted steps, as homoflow
            grad = torch.autograd.grad(new_log_loss, candidate)
            W, log_loss = candidate, new_log_loss.detach()
            accepted += 1
            alpha *= R_U
        else:
            alpha /= R_D
    return attempts, float(log_loss)


def torch_constant(W, X, y, steps: int):
    """theta <- theta - exp(log eta + log L) grad log L. Returns (attempts, final log L)."""
    log_lr = math.log(LR)
    log_loss, grad = torch_value_and_grad(W, X, y)
    for _ in range(steps):
        W = _step(W, grad, torch.exp(log_lr + log_loss))
        log_loss, grad = torch_value_and_grad(W, X, y)
    return steps, float(log_loss)


def torch_run(X, y, params0, policy: str, steps: int):
    """(seconds, attempts, final log L) of one PyTorch run from params0."""
    W = tuple(torch.tensor(np.asarray(p), dtype=torch.float64, requires_grad=True)
              for p in params0)
    X, y = torch.tensor(X, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    run = {"loss_based": torch_loss_based, "constant": torch_constant}[policy]
    start = time.perf_counter()
    attempts, log_loss = run(W, X, y, steps)
    return time.perf_counter() - start, attempts, log_loss


def timed(run, repeats: int) -> dict:
    """Median time of ``repeats`` calls of ``run`` (all make the same number of attempts)."""
    times, attempts, log_loss = [], None, None
    for _ in range(repeats):
        seconds, attempts, log_loss = run()
        times.append(seconds)
    median = statistics.median(times)
    return {"attempts": attempts, "median_s": median, "attempts_per_s": attempts / median,
            "times_s": times, "final_log_loss": log_loss}


def compare(policy: str, homoflow_log_loss: float, torch_log_loss: float, steps: int) -> float:
    rel = abs(homoflow_log_loss - torch_log_loss) / abs(torch_log_loss)
    print(f"{policy:<10}  final log L after {steps} iterations: homoflow "
          f"{homoflow_log_loss:.15g}, torch {torch_log_loss:.15g}, relative difference {rel:.2e}")
    return rel


def benchmark(policy: str, problem, X, y, params0, args) -> tuple[dict, dict]:
    # descent compiles once per Policy object, so every call shares one; the first call
    # compiles, and its --torch-steps iterations give the log L to compare with torch
    homoflow_policy = POLICIES[policy]()
    _, _, reference = homoflow_run(problem, params0, homoflow_policy, args.torch_steps)
    hf = timed(lambda: homoflow_run(problem, params0, homoflow_policy, args.steps),
               args.repeats)
    th = timed(lambda: torch_run(X, y, params0, policy, args.torch_steps), args.repeats)
    rel = compare(policy, reference, th["final_log_loss"], args.torch_steps)
    if policy == "constant":
        assert rel < AGREEMENT_RTOL, f"homoflow and torch disagree: relative difference {rel:.2e}"
    hf.update(implementation="homoflow", policy=policy, steps=args.steps)
    th.update(implementation="torch", policy=policy, steps=args.torch_steps,
              agreement_log_loss_homoflow=reference, agreement_rel_diff=rel)
    return hf, th


def print_table(results: list[dict], ratios: dict):
    print(f"\n{'implementation':<15}{'policy':<12}{'steps':>7}{'attempts':>10}"
          f"{'attempts/s':>14}{'median s':>11}")
    for r in results:
        print(f"{r['implementation']:<15}{r['policy']:<12}{r['steps']:>7}{r['attempts']:>10}"
              f"{r['attempts_per_s']:>14.1f}{r['median_s']:>11.3f}")
    for policy, ratio in ratios.items():
        print(f"ratio homoflow / torch ({policy}): {ratio:.2f}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20000, help="iterations per homoflow run")
    p.add_argument("--torch-steps", type=int, default=2000,
                   help="iterations per torch run (and of the agreement check)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per implementation")
    p.add_argument("--out", type=Path,
                   default=RESULTS / "descent_speed.json",
                   help="JSON output (default: benchmarks/results/descent_speed.json)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    problem, X, y, params0 = build_problem()
    device = jax.devices()[0]
    print(f"JAX backend {jax.default_backend()} ({device.device_kind}), "
          f"torch {torch.__version__} on CPU with {torch.get_num_threads()} threads")
    results, ratios = [], {}
    for policy in POLICIES:
        hf, th = benchmark(policy, problem, X, y, params0, args)
        results += [hf, th]
        ratios[policy] = hf["attempts_per_s"] / th["attempts_per_s"]
    print_table(results, ratios)
    write_report({"torch_threads": torch.get_num_threads(), "results": results,
                  "ratio_loss_based": ratios["loss_based"], "ratio_constant": ratios["constant"]},
                 args.out, "descent_speed.py", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
