"""KKT residuals of the margin problem (P) (Appendix C.1, Definitions C.5 / C.6).

(P): min ||theta||^2 / 2  s.t.  q_n(theta) >= 1 for all n (binary), or s_nj(theta) >= 1 for
all n and j != y_n (C classes, Appendix F). At theta~ = theta / q_min(theta)^{1/L} every
constraint holds, and theta~ is an (eps, delta)-KKT point (Definition C.6) for multipliers
lambda >= 0 with eps = || theta~ - sum_k lambda_k h_k || and delta = sum_k lambda_k
(c_k(theta~) - 1) >= 0, h_k = grad c_k(theta~) (the autodiff selection of the Clarke
subdifferential of constraint k). When theta~ has more constraints than directions, many
lambda reach the smallest eps, and they differ in delta; homoflow takes the lambda >= 0 that
minimizes eps^2 + delta^2 (one non-negative least-squares problem, the delta row appended),
so an exact KKT point gives eps = delta = 0 and an inexact one a balanced pair.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .problem import Problem


def nnls(A: jax.Array, b: jax.Array, tol: float | None = None,
         max_iter: int | None = None) -> jax.Array:
    """min ||A x - b||_2 s.t. x >= 0 by Lawson and Hanson's active-set method (1974, ch. 23),
    written with masks so that it is jittable and vmappable.

    Columns enter the passive set one at a time (largest dual w = A^T (b - A x) first);
    each inner step solves the unconstrained least squares on the passive set
    (``jnp.linalg.lstsq``: minimum-norm, so duplicate or zero columns are harmless) and moves
    back to the feasible boundary when it leaves x >= 0. ``tol`` defaults to
    10 eps max(A.shape) ||A||_1 (as SciPy's ``nnls``).
    """
    m, n = A.shape
    tol = 10 * jnp.finfo(A.dtype).eps * max(m, n) * jnp.max(jnp.sum(jnp.abs(A), axis=0)) \
        if tol is None else tol
    max_iter = 3 * n if max_iter is None else max_iter

    def passive_lstsq(P):
        z = jnp.linalg.lstsq(A * P[None, :], b)[0]
        return jnp.where(P, z, 0.0)

    def inner(carry):
        x, P, z, it = carry
        neg = P & (z <= 0)
        ratio = jnp.where(neg, x / jnp.where(neg, x - z, 1.0), jnp.inf)
        alpha = jnp.min(ratio)
        x = x + alpha * (z - x)
        P = P & (x > tol)
        x = jnp.where(P, x, 0.0)
        return x, P, passive_lstsq(P), it + 1

    def inner_cond(carry):
        _, P, z, it = carry
        return jnp.any(P & (z <= 0)) & (it < max_iter)

    def outer(carry):
        x, P, it = carry
        w = A.T @ (b - A @ x)
        j = jnp.argmax(jnp.where(P, -jnp.inf, w))
        P = P.at[j].set(True)
        x, P, z, it = jax.lax.while_loop(inner_cond, inner, (x, P, passive_lstsq(P), it))
        return jnp.where(P, z, 0.0), P, it + 1

    def outer_cond(carry):
        x, P, it = carry
        w = A.T @ (b - A @ x)
        return jnp.any(~P & (w > tol)) & (it < max_iter)

    x0 = jnp.zeros(n, A.dtype)
    x, _, _ = jax.lax.while_loop(outer_cond, outer, (x0, jnp.zeros(n, bool), 0))
    return x


class KKTResidual(NamedTuple):
    eps: jax.Array       # ||theta~ - sum lambda_k h_k||
    delta: jax.Array     # sum lambda_k (c_k(theta~) - 1)
    lam: jax.Array       # the multipliers, one per constraint (N, or N (C - 1))
    valid: jax.Array     # False where q_min <= 0: theta~ is undefined (eps, delta are NaN)


def constraints(problem: Problem, params) -> jax.Array:
    """The constraint functions of (P) at ``params``: q_n (binary) or s_nj, j != y_n."""
    if not problem.model.multiclass:
        return problem.margins(params)
    s, mask = problem.score_gaps(params)
    C = s.shape[1]
    # drop the j = y_n entries: keep, per row, the C - 1 others in order
    order = jnp.argsort(mask, axis=1, stable=True)[:, : C - 1]
    return jnp.take_along_axis(s, order, axis=1).ravel()


def kkt_residual(problem: Problem, params) -> KKTResidual:
    """The best (eps, delta) of Definition C.6 at theta~ = theta / q_min^{1/L} (pure; jit and
    vmap over snapshots). Where q_min <= 0 (not yet separating) the result is flagged
    ``valid = False`` with eps = delta = NaN rather than a number."""
    L = problem.order
    q_min = jnp.min(problem.margins(params))
    valid = q_min > 0
    scale = jnp.where(valid, q_min, 1.0) ** (-1.0 / L)
    theta_t = jax.tree_util.tree_map(lambda p: scale * p, params)
    flat, unravel = ravel_pytree(theta_t)
    c, pullback = jax.vjp(lambda z: constraints(problem, unravel(z)), flat)
    H = jax.vmap(pullback)(jnp.eye(c.shape[0], dtype=c.dtype))[0]  # (K, P): rows h_k
    # rows: theta~ - H^T lambda (eps) and sum lambda_k (c_k - 1) (delta)
    A = jnp.concatenate([H.T, (c - 1.0)[None, :]], axis=0)
    lam = nnls(A, jnp.concatenate([flat, jnp.zeros(1, flat.dtype)]))
    eps = jnp.linalg.norm(flat - H.T @ lam)
    delta = jnp.sum(lam * (c - 1.0))
    nan = jnp.asarray(jnp.nan, flat.dtype)
    return KKTResidual(jnp.where(valid, eps, nan), jnp.where(valid, delta, nan),
                       jnp.where(valid, lam, nan), valid)
