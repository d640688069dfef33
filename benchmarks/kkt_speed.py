"""Time the KKT residual's NNLS on the default problem: homoflow's Gram-form solver (block
principal pivoting, ``kkt.nnls_gram``, jitted) against the dense jittable Lawson-Hanson
(``kkt.nnls``) and SciPy's
``scipy.optimize.nnls``, on the same instance, measured in the same run; also the whole
``kkt_residual`` per call, autodiff's selection against the Clarke residual
(``selection="clarke"``, the default: IPM + active-set QP over the kinks' Clarke intervals)
at the default kink tolerance and at a loose one (1e-4) that makes ~100 kinks active; and
``polish_kkt`` from that point (wall time, Clarke eps, gamma_bar). The instance: the
(P + 1) x N matrix [H^T; (c - 1)^T] of the default problem (two-layer ReLU, width 100,
N = 100) after 3000 loss-based iterations.

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
        # the residual alone (kkt_columns adds beta_clarke to both)
        "kkt_residual": median_time(
            lambda: kkt.kkt_residual(prob, theta, selection="autodiff").eps),
        "clarke": median_time(lambda: kkt.kkt_residual(prob, theta).eps),
        "clarke_loose": median_time(lambda: kkt.kkt_residual(prob, theta, kink_tol=1e-4).eps),
    }
    cl = {tol: {k: float(v) for k, v in kkt.kkt_columns(prob, theta, kink_tol=tol).items()}
          for tol in (1e-9, 1e-4)}
    auto_eps = float(kkt.kkt_columns(prob, theta, selection="autodiff")["kkt_eps"])
    print(f"instance: {A.shape[0]} x {A.shape[1]} (P + 1 rows, N columns) on "
          f"{jax.devices()[0].device_kind}")
    for k in ("gram", "dense", "scipy"):
        print(f"  {k:>6} NNLS: {1e3 * times[k]:8.3f} ms  residual {res[k]:.15g}")
    print(f"  kkt_residual autodiff (gradients + Gram NNLS), per call: "
          f"{1e3 * times['kkt_residual']:.3f} ms, eps {auto_eps:.6g}")
    for tol, key in ((1e-9, "clarke"), (1e-4, "clarke_loose")):
        c = cl[tol]
        print(f"  kkt_residual clarke, kink_tol {tol:g}: {1e3 * times[key]:.3f} ms per call "
              f"({times[key] / times['kkt_residual']:.1f}x autodiff), "
              f"{int(c['kkt_n_kinks'])} active kinks, eps {c['kkt_eps']:.6g} "
              f"(lower {c['kkt_eps_lower']:.6g}), delta {c['kkt_delta']:.3g}")
    print(f"ratios: dense / gram = {times['dense'] / times['gram']:.1f}, "
          f"scipy / gram = {times['scipy'] / times['gram']:.1f}")
    # the polish from this point (pattern programs, then Newton on the face), twice: the
    # first call compiles the residual and the face system
    walls = []
    for _ in range(2):
        start = time.perf_counter()
        pol = kkt.polish_kkt(prob, theta)
        walls.append(time.perf_counter() - start)
    gamma = float(traj["normalized_margin"][-1])
    print(f"  polish_kkt from this point: {walls[0]:.2f} s (first call), {walls[1]:.2f} s "
          f"(again); gamma_bar {gamma:.10g} -> {pol.normalized_margin:.10g}, Clarke eps "
          f"{pol.eps:.3g}, delta {pol.delta:.3g}; {pol.message}")
    polish = {"wall_s": walls, "eps": pol.eps, "delta": pol.delta, "message": pol.message,
              "normalized_margin": pol.normalized_margin, "start_margin": gamma}
    write_report({"times_s": times, "residuals": res, "shape": list(A.shape),
                  "clarke": {str(k): v for k, v in cl.items()}, "autodiff_eps": auto_eps,
                  "polish": polish},
                 RESULTS / "kkt_speed.json", "kkt_speed.py", sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
