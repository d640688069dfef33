"""Time the KKT residual's NNLS on the default problem: homoflow's Gram-form Lawson-Hanson
(``kkt.nnls_gram``, jitted) against the dense jittable version (``kkt.nnls``) and SciPy's
``scipy.optimize.nnls``, on the same instance, measured in the same run; also the whole
``kkt_residual`` per call. The instance: the (P + 1) x N matrix [H^T; (c - 1)^T] of the
default problem (two-layer ReLU, width 100, N = 100) after 3000 loss-based iterations.

    python benchmarks/kkt_speed.py
"""

from __future__ import annotations

import sys
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import scipy.optimize

import homoflow  # noqa: F401  (float64)
from _report import RESULTS, write_report
from homoflow import data, kkt, losses, models, schedules
from homoflow.descent import descent
from homoflow.problem import make_problem


def median_time(fn, repeats: int = 7) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> int:
    X, y = data.linearly_separable(100, 10, 0)
    model = models.mlp((10, 100, 1))
    prob = make_problem(model, losses.exponential(), X, y)
    traj = descent(prob, model.init(jax.random.PRNGKey(0)), schedules.loss_based(), 3000,
                   n_records=5, progress=False, kkt=False)
    theta = jax.tree_util.tree_map(lambda a: a[-1], traj.snapshots)
    c = np.asarray(kkt.constraints(prob, theta))
    scale = c.min() ** (-1.0 / prob.order)
    flat, unravel = jax.flatten_util.ravel_pytree(jax.tree_util.tree_map(lambda p: scale * p, theta))
    H = np.asarray(kkt._constraint_grads(prob, flat, unravel, jnp.arange(len(c))))
    d = c * scale ** prob.order - 1.0
    A = np.vstack([H.T, d[None, :]])
    b = np.concatenate([np.asarray(flat), [0.0]])
    G, g = jnp.asarray(A.T @ A), jnp.asarray(A.T @ b)

    gram, dense = jax.jit(kkt.nnls_gram), jax.jit(kkt.nnls)
    x_gram = np.asarray(gram(G, g, np.linalg.norm(b)))
    x_dense = np.asarray(dense(jnp.asarray(A), jnp.asarray(b)))
    x_scipy, r_scipy = scipy.optimize.nnls(A, b)
    res = {k: float(np.linalg.norm(A @ x - b)) for k, x in
           (("gram", x_gram), ("dense", x_dense), ("scipy", x_scipy))}
    times = {
        "gram": median_time(lambda: gram(G, g, np.linalg.norm(b))),
        "dense": median_time(lambda: dense(jnp.asarray(A), jnp.asarray(b))),
        "scipy": median_time(lambda: scipy.optimize.nnls(A, b)[0]),
        "kkt_residual": median_time(lambda: kkt.kkt_columns(prob, theta)["kkt_eps"]),
    }
    print(f"instance: {A.shape[0]} x {A.shape[1]} (P + 1 rows, N columns) on "
          f"{jax.devices()[0].device_kind}")
    for k in ("gram", "dense", "scipy"):
        print(f"  {k:>6} NNLS: {1e3 * times[k]:8.3f} ms  residual {res[k]:.15g}")
    print(f"  kkt_residual (gradients + Gram NNLS), per call: {1e3 * times['kkt_residual']:.3f} ms")
    print(f"ratios: dense / gram = {times['dense'] / times['gram']:.1f}, "
          f"scipy / gram = {times['scipy'] / times['gram']:.1f}")
    write_report({"times_s": times, "residuals": res, "shape": list(A.shape)},
                 RESULTS / "kkt_speed.json", "kkt_speed.py", sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
