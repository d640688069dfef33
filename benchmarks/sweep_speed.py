"""Throughput of a vmapped sweep: configurations x steps per second.

The problem: a bias-free two-layer ReLU network (5-16-1), exponential loss, 32 linearly
separable points; the configurations: constant step sizes log-spaced in [1e-4, 1e-3] x
seeds, ``--configs`` of them. Three ways to run them, timed in the same process:

- **sweep**: ``homoflow.sweep`` — every configuration in one jitted, vmapped program
  (compiled first by a warm-up sweep of the same shape; the timed call includes the
  recorded diagnostics, ``n_records`` = 2);
- **one at a time**: ``homoflow.descent`` per configuration, steady state (compiled first;
  the compile that each new step size costs there is reported separately);
- **torch eager**: the same math in a plain PyTorch loop (CPU, float64, one thread,
  autograd, logsumexp), one configuration after another.

Reports configurations x steps per second for each, the ratios sweep / one-at-a-time and
sweep / torch, and checks that the three agree on a configuration's final log L (1e-9).
On a GPU machine it also times 1024 configurations on one GPU.

    python benchmarks/sweep_speed.py [--configs 64] [--steps 2000] [--single 4] [--repeats 3]
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
    sys.exit("sweep_speed.py needs PyTorch for its baseline: pip install 'homoflow[bench]'")

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import RESULTS, write_report

import homoflow
from homoflow import data, losses, models, schedules, sweep

N, DIM, WIDTH = 32, 5, 16


def grid(n_configs: int, steps: int) -> dict:
    seeds = 2 if n_configs >= 2 else 1
    lrs = np.geomspace(1e-4, 1e-3, n_configs // seeds).tolist()
    return {"model": "mlp", "depth": 2, "width": WIDTH, "n": N, "dim": DIM,
            "loss": "exponential", "policy": "constant", "lr": lrs,
            "seed": list(range(seeds)), "steps": steps, "n_records": 2}


def time_sweep(g: dict, repeats: int) -> tuple[float, sweep.SweepTable]:
    sweep.sweep({**g, "steps": 10}, progress=False)  # compile (same shapes)
    times, table = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        table = sweep.sweep(g, progress=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times), table


def time_one_at_a_time(g: dict, configs: list[dict], repeats: int):
    X, y = data.linearly_separable(N, DIM, 0)
    model = models.mlp((DIM, WIDTH, 1))
    problem = homoflow.make_problem(model, losses.exponential(), X, y)
    per, compile_s, finals = [], [], []
    for c in configs:
        policy = schedules.constant(c["lr"])
        params = model.init(jax.random.PRNGKey(c["seed"]))
        start = time.perf_counter()
        homoflow.descent(problem, params, policy, 10, n_records=2, progress=False,
                         snapshots=False)
        compile_s.append(time.perf_counter() - start)
        ts = []
        for _ in range(repeats):
            start = time.perf_counter()
            tr = homoflow.descent(problem, params, policy, g["steps"], n_records=2,
                                  progress=False, snapshots=False)
            ts.append(time.perf_counter() - start)
        per.append(statistics.median(ts))
        finals.append(float(tr["log_loss"][-1]))
    return per, compile_s, finals


def time_torch(g: dict, configs: list[dict]):
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)  # 32 x 16 matrices: more threads only add synchronization
    X, y = data.linearly_separable(N, DIM, 0)
    model = models.mlp((DIM, WIDTH, 1))
    Xt, yt = torch.tensor(X), torch.tensor(y)
    per, finals = [], []
    for c in configs:
        W1, W2 = (torch.tensor(np.asarray(w), requires_grad=True)
                  for w in model.init(jax.random.PRNGKey(c["seed"])))
        lr = c["lr"]
        start = time.perf_counter()
        for _ in range(g["steps"]):
            log_loss = torch.logsumexp(-yt * (torch.relu(Xt @ W1) @ W2)[:, 0], 0)
            g1, g2 = torch.autograd.grad(log_loss, (W1, W2))
            scale = lr * math.exp(float(log_loss.detach()))  # eta grad L = eta L grad log L
            with torch.no_grad():
                W1 -= scale * g1
                W2 -= scale * g2
        per.append(time.perf_counter() - start)
        with torch.no_grad():
            finals.append(float(torch.logsumexp(-yt * (torch.relu(Xt @ W1) @ W2)[:, 0], 0)))
    return per, finals


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--single", type=int, default=4,
                        help="configurations timed one at a time (homoflow and torch)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore", message=".*not separated.*")

    g = grid(args.configs, args.steps)
    t_sweep, table = time_sweep(g, args.repeats)
    configs = table.meta["configs"]
    sample = [configs[i] for i in np.linspace(0, len(configs) - 1, args.single).astype(int)]
    per_h, compile_h, finals_h = time_one_at_a_time(g, sample, args.repeats)
    per_t, finals_t = time_torch(g, sample)

    n = len(configs)
    rate_sweep = n * args.steps / t_sweep
    rate_single = args.steps / statistics.median(per_h)
    rate_torch = args.steps / statistics.median(per_t)
    idx = [configs.index(c) for c in sample]
    finals_s = [float(table.select(config=i)["log_loss"][-1]) for i in idx]
    agree = max(abs(a - b) / abs(b) for a, b in zip(finals_s + finals_t, finals_h + finals_h))
    report = {
        "problem": f"mlp ({DIM}-{WIDTH}-1, ReLU), exponential loss, N = {N}",
        "configs": n, "steps": args.steps, "sweep_s": t_sweep,
        "config_steps_per_s": {"sweep": rate_sweep, "one_at_a_time": rate_single,
                               "torch_eager": rate_torch},
        "ratio_sweep_over_one_at_a_time": rate_sweep / rate_single,
        "ratio_sweep_over_torch": rate_sweep / rate_torch,
        "one_at_a_time_compile_s_per_new_step_size": statistics.median(compile_h),
        # what running the n configurations one by one costs, compile included
        "config_steps_per_s_one_at_a_time_with_compile": n * args.steps / (
            n * (statistics.median(compile_h) + statistics.median(per_h))),
        "final_log_loss_max_rel_disagreement": agree,
        "devices": len(jax.devices()),
    }
    if agree > 1e-9:
        raise SystemExit(f"the three runs disagree on the final log L: {agree:.3g}")
    if jax.default_backend() == "gpu":
        g_big = grid(1024, args.steps)
        t_big, _ = time_sweep(g_big, args.repeats)
        report["gpu_1024"] = {"card": jax.devices()[0].device_kind, "sweep_s": t_big,
                              "config_steps_per_s": 1024 * args.steps / t_big}
    else:
        report["gpu_1024"] = "no GPU on this machine"
    write_report(report, RESULTS / "sweep_speed.json", "sweep_speed.py", argv)
    for k, v in report["config_steps_per_s"].items():
        print(f"{k:14s} {v:12.0f} configuration-steps/s")
    print(f"sweep / one at a time: {report['ratio_sweep_over_one_at_a_time']:.1f}x; "
          f"sweep / torch eager: {report['ratio_sweep_over_torch']:.1f}x "
          f"({n} configurations x {args.steps} steps, {report['devices']} device(s))")
    print(f"one at a time, each new step size also compiles: "
          f"{report['one_at_a_time_compile_s_per_new_step_size']:.2f} s "
          f"({report['config_steps_per_s_one_at_a_time_with_compile']:.0f} "
          f"configuration-steps/s compile included)")
    return report


if __name__ == "__main__":
    main()
