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

On (leaky) ReLU networks autodiff's gradient is one element of the Clarke subdifferential,
rarely the one that closes the KKT system; ``kkt_residual`` minimizes over the Clarke set
too by default (``selection="clarke"``, ``homoflow.clarke``: exact for one hidden layer, a
bracket ``eps_lower <= eps`` for deeper MLPs), and reports the kink tolerance and the
number of active kinks with every eps.
"""

from __future__ import annotations

import math
from functools import lru_cache, partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
# (SciPy is imported inside the functions that use it: it costs ~0.4 s of every CLI start)

from . import io
from .diagnostics import diagnostics
from .problem import Problem


def _back_to_boundary(x, P, z, tol):
    """Lawson-Hanson's inner step: from the feasible x toward the passive solution z as far
    as x >= 0 allows, then drop the passive indices at or below ``tol``. Returns (x, P)."""
    neg = P & (z <= 0)
    ratio = jnp.where(neg, x / jnp.where(neg, x - z, 1.0), jnp.inf)
    x = x + jnp.min(ratio) * (z - x)
    P = P & (x > tol)
    return jnp.where(P, x, 0.0), P


def _lawson_hanson(n: int, dtype, passive_solve, dual, tol, max_iter: int) -> jax.Array:
    """Lawson and Hanson's active-set NNLS (1974, ch. 23) with masks, jittable and vmappable.

    Columns enter the passive set P one at a time (largest dual w = A^T (b - A x) first,
    ``dual(x)``); each inner step solves the unconstrained least squares on P
    (``passive_solve(P)``, zero off P) and moves back to the feasible boundary when that
    solution leaves x >= 0."""
    def inner(carry):
        x, P, z, it = carry
        x, P = _back_to_boundary(x, P, z, tol)
        return x, P, passive_solve(P), it + 1

    def inner_cond(carry):
        _, P, z, it = carry
        return jnp.any(P & (z <= 0)) & (it < max_iter)

    def outer(carry):
        x, P, it = carry
        j = jnp.argmax(jnp.where(P, -jnp.inf, dual(x)))
        P = P.at[j].set(True)
        x, P, z, it = jax.lax.while_loop(inner_cond, inner, (x, P, passive_solve(P), it))
        return jnp.where(P, z, 0.0), P, it + 1

    def outer_cond(carry):
        x, P, it = carry
        return jnp.any(~P & (dual(x) > tol)) & (it < max_iter)

    x0 = jnp.zeros(n, dtype)
    x, _, _ = jax.lax.while_loop(outer_cond, outer, (x0, jnp.zeros(n, bool), 0))
    return x


def nnls(A: jax.Array, b: jax.Array, tol: float | None = None,
         max_iter: int | None = None) -> jax.Array:
    """min ||A x - b||_2 s.t. x >= 0 (Lawson-Hanson, jittable and vmappable). Each passive
    solve is ``jnp.linalg.lstsq`` (minimum-norm, so duplicate or zero columns are harmless).
    ``tol`` defaults to 10 eps max(A.shape) ||A||_1 (as SciPy's ``nnls``)."""
    m, n = A.shape
    tol = 10 * jnp.finfo(A.dtype).eps * max(m, n) * jnp.max(jnp.sum(jnp.abs(A), axis=0)) \
        if tol is None else tol

    def passive_lstsq(P):
        return jnp.where(P, jnp.linalg.lstsq(A * P[None, :], b)[0], 0.0)

    return _lawson_hanson(n, A.dtype, passive_lstsq, lambda x: A.T @ (b - A @ x), tol,
                          3 * n if max_iter is None else max_iter)


def nnls_gram(G: jax.Array, g: jax.Array, b_norm=1.0, tol: float | None = None,
              max_iter: int | None = None) -> jax.Array:
    """``nnls`` from the normal equations: min_x>=0 ||A x - b|| given only G = A^T A and
    g = A^T b (and ||b||, for the tolerance), i.e. min 1/2 x^T G x - g^T x over x >= 0.
    Block principal pivoting, then Lawson-Hanson if that has not converged in
    ``max_iter`` passive solves (``_pivoting_nnls``); each passive solve a K x K system on
    G_PP instead of a least squares on the m x K matrix A_P, so the cost no longer depends
    on m (here m = P, the number of parameters). Conditioning is that of G (cond(A)^2):
    fine for multipliers; compute residuals from A, not from G. Each passive solve is a
    Cholesky factorization (ridge below), ~20x faster than the SVD that the dense
    version's minimum-norm ``lstsq`` needs."""
    n = G.shape[0]
    max_iter = 3 * n if max_iter is None else int(max_iter)
    return _pivoting_nnls(G, g, _gram_solve(G, g), _gram_tol(G, b_norm, tol), max_iter)[0]


def _gram_tol(G, b_norm, tol):
    """``nnls_gram``'s dual tolerance: 10 eps K max_k ||a_k|| max(||b||, 1) (as SciPy's)."""
    if tol is not None:
        return tol
    col = jnp.sqrt(jnp.maximum(jnp.diag(G), 0.0))
    return 10 * jnp.finfo(G.dtype).eps * G.shape[0] * jnp.max(col) * jnp.maximum(b_norm, 1.0)


def _gram_solve(G, g):
    """``nnls_gram``'s passive solve: G_PP z_P = g_P by Cholesky, zero off P."""
    # A ridge of 1e-13 max G_kk keeps the Cholesky factor finite when passive columns are
    # duplicate or zero (then it picks a near-minimum-norm solution); two refinement steps
    # remove its bias wherever G_PP is regular.
    ridge = 1e-13 * jnp.max(jnp.diag(G)) + jnp.finfo(G.dtype).tiny
    eye = jnp.eye(G.shape[0], dtype=G.dtype)

    def passive_cholesky(P):
        G_P = jnp.where(P[:, None] & P[None, :], G, 0.0)
        factor = jax.scipy.linalg.cho_factor(G_P + jnp.where(P, ridge, 1.0) * eye)
        g_P = jnp.where(P, g, 0.0)
        z = jax.scipy.linalg.cho_solve(factor, g_P)
        for _ in range(2):
            z = z + jax.scipy.linalg.cho_solve(factor, g_P - G_P @ z)
        return jnp.where(P, z, 0.0)

    return passive_cholesky


def _pivoting_nnls(G, g, passive_solve, tol, max_iter: int, pivoting: bool = True):
    """min 1/2 x^T G x - g^T x over x >= 0, one loop with one passive solve per step.

    First block principal pivoting (Judice and Pires 1994; Kim and Park 2011, alg. 2): F
    is the passive set, z_F solves G_FF z_F = g_F, and every infeasible index (z_i <= 0 on
    F, (G z - g)_i < -tol off F) changes side at once while their number falls, with
    Murty's single exchange (the largest infeasible index) as the backup rule after three
    non-improving exchanges. It needs a few passive solves where Lawson-Hanson needs at
    least one per support element: on the default run's KKT instances (supports of 30-50)
    0.5 ms against 3.5 ms, with the same final passive set, hence the same x. Block
    pivoting is proven finite only for positive definite G, so after ``max_iter`` steps
    without convergence (or from the start, with ``pivoting=False``) the same loop
    restarts as Lawson and Hanson's active-set method (``_lawson_hanson``: one index
    enters at a time, the inner steps move back to the feasible boundary) for
    ``max_iter`` more. Both phases share the loop body's one passive solve, so the
    compiled program holds one Cholesky, not two (the fallback as a second loop cost
    ~60 % more compile time). Returns (x, steps): steps <= max_iter iff pivoting alone
    converged."""
    n = G.shape[0]
    idx = jnp.arange(n)
    switch = max_iter if pivoting else 0

    def infeasible(F, z, y):   # y = G z - g
        return jnp.where(F, z <= 0, y < -tol)

    def body(carry):
        F, x, z, y, n_best, backup, it = carry
        restart = it == switch          # Lawson-Hanson from x = 0, F = {}
        F, x, z, y = (jnp.where(restart, False, F), jnp.where(restart, 0.0, x),
                      jnp.where(restart, 0.0, z), jnp.where(restart, -g, y))
        # block pivoting
        V = infeasible(F, z, y)
        n_v = jnp.sum(V)
        better = n_v < n_best
        backup = jnp.where(better, 3, backup - 1)
        single = V & (idx == jnp.max(jnp.where(V, idx, -1)))
        F_piv = F ^ jnp.where(backup >= 0, V, single)
        # Lawson-Hanson: an inner step back to the boundary, or a new index
        x_in, F_in = _back_to_boundary(x, F, z, tol)
        inner = jnp.any(F & (z <= 0))
        F_lh = jnp.where(inner, F_in, F | (idx == jnp.argmax(jnp.where(F, -jnp.inf, -y))))
        x_lh = jnp.where(inner, x_in, z)
        lh = it >= switch
        F = jnp.where(lh, F_lh, F_piv)
        z = passive_solve(F)
        return (F, jnp.where(lh, x_lh, x), z, G @ z - g, jnp.minimum(n_v, n_best),
                jnp.maximum(backup, -1), it + 1)

    def cond(carry):
        F, _, z, y, _, _, it = carry
        return jnp.any(infeasible(F, z, y)) & (it < switch + max_iter)

    zeros = jnp.zeros(n, G.dtype)
    F, _, z, _, _, _, it = jax.lax.while_loop(
        cond, body, (jnp.zeros(n, bool), zeros, zeros, -g, jnp.asarray(n + 1), jnp.asarray(3),
                     jnp.asarray(0)))
    return jnp.where(F, jnp.maximum(z, 0.0), 0.0), it


class KKTResidual(NamedTuple):
    eps: jax.Array       # ||theta~ - sum lambda_k h_k|| (Clarke: upper end of the bracket)
    delta: jax.Array     # sum lambda_k (c_k(theta~) - 1)
    lam: jax.Array       # the multipliers, one per constraint used (N, N (C-1), or the cap)
    index: jax.Array     # which constraints lam belongs to (row-major in (n, j != y_n))
    valid: jax.Array     # False where q_min <= 0 or a used constraint has a zero gradient
    n_zero_grad: jax.Array  # used constraints whose autodiff gradient is exactly zero
    eps_lower: jax.Array = jnp.nan  # a proven lower bound on the Clarke eps (NaN: none)
    kink_tol: jax.Array = jnp.nan   # the relative kink tolerance the eps was computed with
    n_kinks: jax.Array = 0          # active kinks (|z| <= kink_tol * scale) of used points
    capped: jax.Array = False       # some active kinks exceeded the cap (held at sigma = lo)


def constraints(problem: Problem, params) -> jax.Array:
    """The constraint functions of (P) at ``params``: q_n (binary) or s_nj, j != y_n."""
    return constraints_of(problem, problem.outputs(params))


def constraints_of(problem: Problem, out) -> jax.Array:
    """``constraints`` from the model's outputs ``out`` on ``problem.X``."""
    if not problem.model.multiclass:
        return problem.margin_terms_of(out)[0]
    s, mask = problem.score_gaps_of(out)
    C = s.shape[1]
    # drop the j = y_n entries: keep, per row, the C - 1 others in order
    order = jnp.argsort(mask, axis=1, stable=True)[:, : C - 1]
    return jnp.take_along_axis(s, order, axis=1).ravel()


def row_constraint(problem: Problem, unravel, n, j, slopes, flat, offsets=None):
    """Constraint j of data point n (``constraints`` row n * (C - 1) + j; j = 0 binary) at
    the flat parameters, with the activation derivative ``slopes`` (one array per kinked
    layer, shaped like one data point's pre-activations; NaN: autodiff's) and ``offsets``
    added at its sites (``models.Kinks.apply``)."""
    sub = Problem(problem.X[n][None], problem.y[n][None], problem.model, problem.loss)
    sl = tuple(a[None] for a in slopes)
    off = tuple(jnp.zeros_like(a) for a in sl) if offsets is None else offsets
    return constraints_of(sub, problem.model.kinks.apply(unravel(flat), sub.X, sl, off))[j]


def _constraint_grads(problem: Problem, flat, unravel, index, slopes=None,
                      cotangents: bool = False, per_row: bool = False):
    """Rows grad c_k(theta) for the constraints ``index``, each from its own data point
    only (one single-example backward pass per row, whatever N is).

    ``slopes`` (``models.Kinks``: one array per kinked layer, shaped like its
    pre-activations on X; NaN = autodiff's derivative) sets the activation derivative at
    each site: then the rows are the gradients with that selection, and with
    ``cotangents`` also d c_k / d offset at the sites of c_k's data point (one array per
    kinked layer, shaped (len(index), ...) like one data point's pre-activations). With
    ``per_row``, ``slopes[l]`` has one entry per row of ``index`` instead of per data point."""
    C = problem.model.n_outputs
    rows = 1 if C == 1 else C - 1
    n, j = index // rows, index % rows
    if slopes is not None and not per_row:
        slopes = tuple(s[n] for s in slopes)

    def one(n, j, sl):
        if slopes is None:
            sub = Problem(problem.X[n][None], problem.y[n][None], problem.model, problem.loss)
            return jax.grad(lambda z: constraints(sub, unravel(z))[j])(flat)
        off = tuple(jnp.zeros((1,) + a.shape, a.dtype) for a in sl)
        g, e = jax.grad(lambda z, o: row_constraint(problem, unravel, n, j, sl, z, o),
                        argnums=(0, 1))(flat, off)
        return (g, tuple(a[0] for a in e)) if cotangents else g

    return jax.vmap(one)(n, j, slopes)


SELECTIONS = ("clarke", "autodiff")


def _smooth_residual(problem: Problem, flat, unravel, index, d):
    """(eps, lambda, H) with autodiff's gradients: the NNLS over lambda >= 0 of
    ||[flat; 0] - [H^T; d^T] lambda|| from its normal equations (``nnls_gram``)."""
    H = _constraint_grads(problem, flat, unravel, index)        # (m, P): rows h_k
    G = H @ H.T + d[:, None] * d[None, :]
    lam = nnls_gram(G, H @ flat, jnp.linalg.norm(flat))
    return jnp.linalg.norm(flat - H.T @ lam), lam, H


def kkt_residual(problem: Problem, params, max_constraints: int | None = 256, *,
                 selection: str = "clarke", kink_tol=None, max_kinks_per_unit: int = 8,
                 max_vertex_kinks: int = 4, rounds: int = 4) -> KKTResidual:
    """The best (eps, delta) of Definition C.6 at theta~ = theta / q_min^{1/L} (pure; jit and
    vmap over snapshots). Where q_min <= 0 (not yet separating) the result is flagged
    ``valid = False`` with eps = delta = NaN rather than a number.

    lambda >= 0 minimizes eps^2 + delta^2. With more than ``max_constraints`` constraints
    only the smallest ``max_constraints`` enter (lambda = 0 on the rest): the pair is then
    still a valid certificate of Definition C.6, an upper bound on the best one, and equal
    to it whenever the best multipliers live on those constraints — which they do late in a
    run, where lambda_k (c_k - 1) penalizes every far constraint.

    ``selection="autodiff"``: h_k = autodiff's gradient (relu'(0) = 0, leaky relu'(0) = 1),
    an NNLS solved from its K x K normal equations (``nnls_gram``). On ReLU nets with
    kinks at theta~ this is only an upper bound that need not fall (DESIGN §6).

    ``selection="clarke"`` (default): h_k ranges over the Clarke subdifferential too
    (``homoflow.clarke``). A kink is active when |z| <= ``kink_tol`` ||h_n|| ||w_u||
    (default ``clarke.KINK_TOL`` = 1e-9; the certificates hold at the point with those
    kinks moved onto 0). One hidden layer (``Kinks.exact``): the exact minimum (a convex
    QP; eps_lower = eps); a unit's active kinks beyond ``max_kinks_per_unit`` stay at
    sigma = lo (``capped``; still an upper bound, eps_lower NaN). Deeper MLPs: a bracket,
    eps a feasible selection (upper bound) and eps_lower a proven lower bound or NaN
    (``clarke.mlp_bracket``: ``max_vertex_kinks``, ``rounds``). Other kinked models (CNN):
    exact (autodiff's = Clarke's) where no kink is active, NaN otherwise. Smooth models:
    Clarke = autodiff, eps_lower = eps.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    from . import clarke
    kink_tol = clarke.KINK_TOL if kink_tol is None else kink_tol
    if not isinstance(kink_tol, jax.Array) and not (float(kink_tol) >= 0):
        raise ValueError(f"kink_tol must be >= 0 (relative), got {kink_tol!r}")
    for name, v in (("max_kinks_per_unit", max_kinks_per_unit),
                    ("max_vertex_kinks", max_vertex_kinks), ("rounds", rounds)):
        if int(v) < 1:
            raise ValueError(f"{name} must be >= 1, got {v!r}")
    return _kkt_residual(problem, params, max_constraints, selection, kink_tol,
                         int(max_kinks_per_unit), int(max_vertex_kinks), int(rounds))


# one compiled program per model and shape, for eager callers too (inlined under jit/vmap)
@partial(jax.jit, static_argnums=(2, 3, 5, 6, 7))
def _kkt_residual(problem: Problem, params, max_constraints, selection, kink_tol,
                  max_kinks_per_unit, max_vertex_kinks, rounds) -> KKTResidual:
    from . import clarke
    L = problem.order
    c_all = constraints(problem, params)
    q_min = jnp.min(c_all)
    valid = q_min > 0
    scale = jnp.where(valid, q_min, 1.0) ** (-1.0 / L)
    flat, unravel = ravel_pytree(jax.tree_util.tree_map(lambda p: scale * p, params))
    K = c_all.shape[0]
    m = K if max_constraints is None else min(K, int(max_constraints))
    index = jnp.arange(K) if m == K else jax.lax.top_k(-c_all, m)[1]
    d = c_all[index] * scale ** L - 1.0                           # c_k(theta~) - 1
    kinks = problem.model.kinks
    tol = jnp.asarray(kink_tol, flat.dtype)
    n_kinks, capped = jnp.asarray(0), jnp.asarray(False)
    if selection == "clarke" and kinks is not None and kinks.exact:
        def with_kinks(_):
            sol = clarke.one_hidden_residual(problem, flat, unravel, index, d, tol,
                                             max_kinks_per_unit)
            return sol.eps, sol.lam, sol.H, sol.capped

        def without_kinks(_):  # q_n differentiable at every used point: Clarke = autodiff
            return _smooth_residual(problem, flat, unravel, index, d) + (jnp.asarray(False),)

        n_kinks = clarke.count_active(problem, unravel(flat), index, tol)
        eps, lam, H, capped = jax.lax.cond(n_kinks > 0, with_kinks, without_kinks, None)
        eps_lower = jnp.where(capped, jnp.nan, eps)
    elif selection == "clarke" and kinks is not None and clarke.is_mlp(problem.model):
        def bracket(_):
            br = clarke.mlp_bracket(problem, flat, unravel, index, d, tol, max_vertex_kinks,
                                    rounds)
            return br.eps, br.eps_lower, br.lam, br.H, br.capped

        def smooth(_):
            eps, lam, H = _smooth_residual(problem, flat, unravel, index, d)
            return eps, eps, lam, H, jnp.asarray(False)

        n_kinks = clarke.count_active(problem, unravel(flat), index, tol)
        eps, eps_lower, lam, H, capped = jax.lax.cond(n_kinks > 0, bracket, smooth, None)
    else:
        eps, lam, H = _smooth_residual(problem, flat, unravel, index, d)
        eps_lower = eps
        if selection == "clarke" and kinks is not None:
            n_kinks = clarke.count_active(problem, unravel(flat), index, tol)
            eps = jnp.where(n_kinks == 0, eps, jnp.nan)
            eps_lower = eps
        elif selection == "autodiff" and kinks is not None:
            eps_lower = jnp.nan
    delta = jnp.sum(lam * d)
    n_zero = jnp.sum(jnp.all(H == 0.0, axis=1))
    valid = valid & (n_zero == 0)
    nan = jnp.asarray(jnp.nan, flat.dtype)
    return KKTResidual(jnp.where(valid, eps, nan), jnp.where(valid, delta, nan),
                       jnp.where(valid, lam, nan), index, valid, n_zero,
                       jnp.where(valid, eps_lower, nan), tol, n_kinks, capped)


@partial(jax.jit, static_argnames=("max_constraints", "selection"))
def kkt_columns(problem: Problem, params, max_constraints: int | None = 256,
                selection: str = "clarke", kink_tol=None) -> dict:
    """The Trajectory columns ``kkt_eps`` (Clarke: the upper end of the bracket),
    ``kkt_eps_lower`` (a proven lower bound or NaN), ``kkt_delta``, ``kkt_kink_tol`` and
    ``kkt_n_kinks`` (NaN where not valid)."""
    r = kkt_residual(problem, params, max_constraints, selection=selection, kink_tol=kink_tol)
    return {"kkt_eps": r.eps, "kkt_delta": r.delta, "kkt_eps_lower": r.eps_lower,
            "kkt_kink_tol": r.kink_tol, "kkt_n_kinks": r.n_kinks,
            "beta_clarke": beta_clarke(problem, params)}


def _log_loss_of_constraints(problem: Problem, c):
    """log L as a function of the constraint values (q_n, or s_nj for j != y_n)."""
    if not problem.model.multiclass:
        return problem.loss.log_loss(c)
    s = c.reshape(problem.n, problem.model.n_outputs - 1)
    return problem.loss.log_loss(-jax.scipy.special.logsumexp(-s, axis=1))


def beta_clarke(problem: Problem, params) -> jax.Array:
    """beta = cos(theta, g) for g the minimum-norm element of the Clarke subdifferential of
    -log L (Lemma C.8's beta; the velocity the flow follows, DESIGN §3/§6): the chain rule
    sum_k w_k h_k(sigma_k) with w_k = -d log L / d c_k and sigma_k in [lo, hi] at every
    active kink (``clarke.min_norm_element``, exact for one hidden layer). On models
    without kinks this is autodiff's beta; on deeper kinked nets it is not computed (NaN).
    Jittable and vmappable. Autodiff's beta (the ``beta`` column) uses relu'(0) = 0,
    another element of the set, and on ReLU nets stays far from 1 where this one does
    not."""
    from . import clarke
    kinks = problem.model.kinks
    flat = ravel_pytree(params)[0]
    if kinks is None or not kinks.exact:
        if kinks is not None:
            return jnp.asarray(jnp.nan, flat.dtype)
        g = -ravel_pytree(jax.grad(problem.log_loss)(params))[0]
    else:
        w = -jax.grad(partial(_log_loss_of_constraints, problem))(constraints(problem, params))
        g = ravel_pytree(clarke.min_norm_element(problem, params, w).element)[0]
    norm = jnp.linalg.norm(g) * jnp.linalg.norm(flat)
    return jnp.where(norm > 0, flat @ g / jnp.where(norm > 0, norm, 1.0), 0.0)


class LemmaC8(NamedTuple):
    eps: jax.Array    # C1 sqrt(1 - beta)
    delta: jax.Array  # C2 / log(1/L)
    C1: jax.Array
    C2: jax.Array


def lemma_c8_pair(problem: Problem, params, smoothed_margin_t0, B1=jnp.nan) -> LemmaC8:
    """Lemma C.8's constructive (eps, delta): theta~ is an (eps, delta)-KKT point with
    eps = C1 sqrt(1 - beta), delta = C2 / log(1/L), C1 = sqrt(2) / gamma~(t0)^{1/L} and
    C2 = 2 e N K^2 / (L gamma~(t0)^{2/L}) (B1 / gamma~(t0))^{log2 K}, K and b_g of (B3.4)
    (``loss.K``, ``loss.b_g``; K = 1 for the exponential loss, so B1 drops out; otherwise
    pass B1 = sup ||grad q_n|| on the unit sphere, e.g. the *estimate* of
    ``schedules.estimate_smoothness_constants``). NaN where log(1/L) < b_g or a constant
    is unknown. beta is that of the minimum-norm Clarke element (``beta_clarke``, the
    lemma's velocity; autodiff's where it is not computed)."""
    L = problem.order
    d = diagnostics(problem, params)
    beta = beta_clarke(problem, params)
    beta = jnp.where(jnp.isfinite(beta), beta, d.beta)
    g0 = jnp.asarray(smoothed_margin_t0, jnp.float64)
    K = problem.loss.K
    C1 = jnp.sqrt(2.0) / g0 ** (1.0 / L)
    B_term = 1.0 if K == 1.0 else (jnp.asarray(B1) / g0) ** math.log2(K)
    C2 = 2 * math.e * problem.n * K ** 2 / (L * g0 ** (2.0 / L)) * B_term
    s = -d.log_loss
    ok = s >= problem.loss.b_g
    nan = jnp.asarray(jnp.nan)
    return LemmaC8(jnp.where(ok, C1 * jnp.sqrt(jnp.maximum(1.0 - beta, 0.0)), nan),
                   jnp.where(ok, C2 / s, nan), C1, C2)


# --- max-margin references -------------------------------------------------------------

class SVMReference(NamedTuple):
    solution: np.ndarray   # w*: the minimum-norm vector with <w*, g_k> >= 1 for all k
    direction: np.ndarray  # w* / ||w*||
    margin: float          # 1 / ||w*||: the max-margin value of the reference problem
    dual: np.ndarray       # alpha_k >= 0 with w* = sum alpha_k g_k (zero off the support)
    kind: str


def least_distance(Gmat, h=None) -> tuple[np.ndarray, np.ndarray]:
    """min ||w|| s.t. Gmat w >= h (default h = 1: a hard-margin SVM with feature rows
    g_k = Gmat[k]) as Lawson and Hanson's least-distance program (1974, ch. 23): one NNLS
    min_{u >= 0} ||[Gmat^T; h^T] u - e_{P+1}|| by SciPy's ``nnls``; then
    w = Gmat^T u / (1 - h.u) and the dual multipliers are alpha = u / (1 - h.u).
    Raises ValueError when no w satisfies the constraints (the data are not separable by
    these features)."""
    import scipy.optimize
    Gmat = np.asarray(Gmat, np.float64)
    K, P = Gmat.shape
    h = np.ones(K) if h is None else np.asarray(h, np.float64)
    E = np.vstack([Gmat.T, h[None, :]])
    f = np.zeros(P + 1)
    f[-1] = 1.0
    u, _ = scipy.optimize.nnls(E, f, maxiter=50 * K)
    r = E @ u - f
    if np.linalg.norm(r) <= 1e-12:
        raise ValueError("the constraints <w, g_k> >= 1 are infeasible: the data are not "
                         "separable by these features, so there is no hard-margin SVM")
    scale = -r[-1]  # = 1 - h.u > 0
    return Gmat.T @ u / scale, u / scale


@jax.jit
def _grads_at(problem: Problem, params, index) -> jax.Array:
    """``_constraint_grads`` from a params pytree: one compiled program per model and
    shape, reused across calls (a fresh ``unravel`` as a static argument would recompile)."""
    flat, unravel = ravel_pytree(params)
    return _constraint_grads(problem, flat, unravel, index)


_constraints_at = jax.jit(constraints)


def _constraint_jacobian(problem: Problem, params) -> np.ndarray:
    K = _constraints_at(problem, params).shape[0]
    return np.asarray(_grads_at(problem, params, jnp.arange(K)))


def svm_reference(problem: Problem, params=None, kind: str = "linear",
                  norm=2.0) -> SVMReference:
    """The hard-margin SVM that the theory says a trajectory's direction approaches.

    ``norm`` = p in [1, inf] gives the l_p max-margin classifier instead (``max_margin``:
    min ||w||_p s.t. the same constraints), the limit of l_p steepest descent on a linear
    model (p = 1: coordinate descent, and the end-to-end predictor of a depth-2 diagonal
    net; p = inf: sign descent and Adam). ``direction`` is then w* / ||w*||_p and
    ``margin`` 1 / ||w*||_p.

    ``kind="linear"``: the SVM on the raw inputs (no bias; multi-class: the constraints
    (w_y - w_j)·x_n >= 1 of Appendix F) — the exact limit for linear models, for the
    end-to-end predictor of fully connected deep linear networks, and for the linear (odd)
    part of two-layer (leaky) ReLU networks on symmetric separable data. Compare it with
    ``linear_predictor(problem, params)``; ``solution`` has ``models.linear``'s layout.

    ``kind="tangent_kernel"``: problem (Q) of Corollary 4.5 / Lemma C.13 at ``params``
    (a late direction theta_bar): min ||theta||^2 / 2 s.t. <theta, h_k> >= 1 with h_k the
    autodiff gradients of the constraints at theta_bar, i.e. the SVM with the tangent
    kernel K(x, x') = <grad Phi_x(theta_bar), grad Phi_x'(theta_bar)>. For a smooth model,
    a KKT direction of (P) is exactly this SVM's direction (compare with ``angle``).
    """
    if kind == "linear":
        X = problem.X.reshape(problem.n, -1)
        lin = Problem(X, problem.y, _linear_model(X.shape[1], problem.model.n_outputs),
                      problem.loss)
        H = _constraint_jacobian(lin, lin.model.init(jax.random.PRNGKey(0)))
    elif kind == "tangent_kernel":
        if params is None:
            raise ValueError("svm_reference(kind='tangent_kernel') needs params: the "
                             "direction theta_bar whose tangent kernel defines the SVM")
        H = _constraint_jacobian(problem, params)
    else:
        raise ValueError(f"kind must be 'linear' or 'tangent_kernel', got {kind!r}")
    w, alpha = max_margin(H, norm)
    size = float(np.linalg.norm(w, ord=_check_norm(norm)))
    return SVMReference(w, w / size, 1.0 / size, alpha, kind)


@lru_cache(maxsize=None)  # the same Model object, so the jitted gradients are reused
def _linear_model(dim, n_outputs):
    from .models import linear
    return linear(dim, n_outputs)


def linear_predictor(problem: Problem, params) -> np.ndarray:
    """The end-to-end linear predictor w with (Phi(x) - Phi(-x)) / 2 = w·x, flattened in
    ``models.linear``'s layout ((d,) binary, (d, C) ravelled for C classes): the product
    of the layers of a deep linear network, w itself for a linear model, and
    (1 + slope)/2 sum_j a_j w_j for a two-layer (leaky) ReLU network (its odd part is linear).
    Raises ValueError when the odd part is not linear (measured at two data points)."""
    X = problem.X

    def odd(x):
        return (problem.model.apply(params, x[None]) - problem.model.apply(params, -x[None]))[0] / 2

    J = jax.jacrev(odd)
    a, b = np.asarray(J(X[0])), np.asarray(J(X[-1]))
    if not np.allclose(a, b, rtol=1e-8, atol=1e-12 * np.abs(a).max()):
        raise ValueError(f"model {problem.model.name!r}: its odd part (Phi(x) - Phi(-x))/2 is "
                         "not linear in x, so it has no end-to-end linear predictor")
    return a.reshape(-1) if a.ndim == X.ndim - 1 else a.reshape(a.shape[0], -1).T.ravel()


def angle(a, b) -> float:
    """The angle (radians) between two vectors or parameter pytrees, accurate near 0."""
    a = np.ravel(ravel_pytree(a)[0]) if not isinstance(a, np.ndarray) else a.ravel()
    b = np.ravel(ravel_pytree(b)[0]) if not isinstance(b, np.ndarray) else b.ravel()
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return float(2 * np.arctan2(np.linalg.norm(a - b), np.linalg.norm(a + b)))


# --- the KKT point a run is heading to ---------------------------------------------------

def _point_of(problem: Problem) -> np.ndarray:
    """The data point each constraint of ``constraints`` belongs to."""
    C = problem.model.n_outputs
    per = 1 if C == 1 else C - 1
    return np.repeat(np.arange(problem.n), per)


def _flat_pre(problem: Problem, params):
    """Every kink site's pre-activation at ``params``, (N, S) (``models.Kinks``)."""
    zs = problem.model.kinks.pre(params, problem.X)
    return jnp.concatenate([z.reshape(problem.n, -1) for z in zs], axis=1)


def _slopes_of(problem: Problem, params, flat):
    """The per-layer slope arrays from a flat (N, S) array (NaN: autodiff's)."""
    zs = jax.eval_shape(problem.model.kinks.pre, params, problem.X)
    out, i = [], 0
    for z in zs:
        size = math.prod(z.shape[1:])
        out.append(flat[:, i:i + size].reshape(z.shape))
        i += size
    return tuple(out)


@jax.jit
def _piece_jacobians(problem: Problem, params, slope):
    """At ``params``, with the activation derivative set to ``slope`` (N, S) at the kink
    sites where it is finite (autodiff's elsewhere): every constraint c_k, its gradient h_k
    (rows, (K, P)), every site's pre-activation z (N, S), and e (K, S): d c_k / d
    (activation output at the sites of c_k's data point)."""
    kinks = problem.model.kinks
    flat, unravel = ravel_pytree(params)
    slopes = _slopes_of(problem, params, slope)
    point = jnp.asarray(_point_of(problem))
    C = problem.model.n_outputs

    def one(k):
        n = point[k]
        sub = Problem(problem.X[n][None], problem.y[n][None], problem.model, problem.loss)
        j = 0 if C == 1 else k - n * (C - 1)

        def c_k(z, off):
            offs = _slopes_of(sub, params, off)
            out = kinks.apply(unravel(z), sub.X, tuple(s[n][None] for s in slopes), offs)
            if C == 1:
                return (sub.y * out)[0]
            s, mask = sub.score_gaps_of(out)
            order = jnp.argsort(mask, axis=1, stable=True)[:, : C - 1]
            return jnp.take_along_axis(s, order, axis=1).ravel()[j]

        S = slope.shape[1]
        return jax.grad(c_k, argnums=(0, 1))(flat, jnp.zeros((1, S), flat.dtype))

    H, E = jax.vmap(one)(jnp.arange(point.shape[0]))
    return constraints(problem, params), H, _flat_pre(problem, params), E[:, 0, :]


@jax.jit
def _site_gradients(problem: Problem, params, n, s):
    """Rows grad z_(n, s) of the pre-activations at the sites (n, s) (vectors)."""
    flat, unravel = ravel_pytree(params)

    def one(n, s):
        return jax.grad(lambda z: _flat_pre(
            Problem(problem.X[n][None], problem.y[n][None], problem.model, problem.loss),
            unravel(z))[0, s])(flat)

    return jax.vmap(one)(n, s)


def _bucket(k: int) -> int:
    """Pad counts to powers of two, so that a few compiled shapes serve every call."""
    return 1 << max(3, int(k - 1).bit_length())


_margins_batch = jax.jit(jax.vmap(constraints, (None, 0)))


_margins_batch = jax.jit(jax.vmap(constraints, (None, 0)))


def _line_search(problem: Problem, unravel, x, target, Z, L, crossings: int = 48,
                 halvings: int = 40):
    """The best normalized margin along x + a (target - x): a on a halving sequence 1, 1/2,
    ... and, on kinked models, at the first ``crossings`` points where a kink's
    pre-activation changes sign (where the margin's piece changes: exact for a first dense
    layer, whose pre-activations are linear along the segment). Returns (the point
    rescaled to q_min = 1, its margin, its constraints, a)."""
    alphas = [0.5 ** k for k in range(halvings)]
    if Z is not None:
        Z_t = np.asarray(_flat_pre(problem, unravel(jnp.asarray(target))))
        with np.errstate(divide="ignore", invalid="ignore"):
            t = Z / (Z - Z_t)
        t = np.sort(t[(Z * Z_t < 0) & (t > 0) & (t < 1)])[:crossings]
        alphas = alphas + list(t) + [1.0] * (crossings - len(t))
    a = np.asarray(alphas)
    pts = x[None, :] + a[:, None] * (target - x)[None, :]
    c = np.asarray(_margins_batch(problem, jax.vmap(unravel)(jnp.asarray(pts))))
    q = c.min(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        # gamma_bar = exp(log q - L log rho): q / rho^L overflows once rho^L > 1.8e308
        m = np.where(q > 0, np.exp(np.log(q) - L * np.log(np.linalg.norm(pts, axis=1))),
                     -np.inf)
    k = int(np.argmax(m))
    if not np.isfinite(m[k]):
        return None, -np.inf, None, 0.0
    return pts[k] * q[k] ** (-1.0 / L), float(m[k]), c[k] / q[k], float(a[k])


def _lagrangian_curvature(problem: Problem, params, lam, slope):
    """B = I - sum_k lam_k Hess c_k, the Hessian of (P)'s Lagrangian on the piece (the
    activation derivative ``slope`` where finite); None for lam = None (the first step)."""
    if lam is None or not np.any(lam > 0):
        return None
    slope = jnp.zeros((problem.n, 0)) if slope is None else jnp.asarray(slope)
    B = np.eye(ravel_pytree(params)[0].size) - np.asarray(_lagrangian_hessian(
        problem, params, jnp.asarray(lam), jnp.arange(lam.size), slope))
    return 0.5 * (B + B.T)


def _curved_least_distance(A, rhs, x, B, active=None):
    """min_d d^T B d / 2 + <x, d> s.t. A (x + d) >= rhs (B None: B = I) as a least-distance
    program. B need only be positive definite on the null space of the rows ``active``
    (bool; those expected to hold with equality, e.g. the last multipliers' support), as
    at a strict local solution: then B + rho sum_active a a^T is positive definite for a
    large rho, and adding rho (a.d - r)^2 / 2 changes no step that keeps them equalities
    (an augmented Lagrangian; where a row turns inactive it is only a regularization). If
    no rho up to 1e6 |B| gives a Cholesky factor, B is shifted by kappa I. Returns
    (x + d, the multipliers)."""
    import scipy.linalg
    if B is None:
        return least_distance(A, rhs)
    g = x.copy()
    Bp = B
    if active is not None and np.any(active):
        Aa, ra = A[active], rhs[active] - A[active] @ x
        AtA = Aa.T @ Aa
        scale = np.abs(B).max() / max(np.abs(AtA).max(), 1e-300)
        for rho in scale * 10.0 ** np.arange(0, 7):
            try:
                R = np.linalg.cholesky(B + rho * AtA).T
                Bp, g = B + rho * AtA, x - rho * Aa.T @ ra
                break
            except np.linalg.LinAlgError:
                R = None
    else:
        R = None
    if R is None:
        low = float(scipy.linalg.eigh(Bp, eigvals_only=True, subset_by_index=[0, 0])[0])
        try:
            R = np.linalg.cholesky(Bp + max(0.0, 1e-3 - low) * np.eye(B.shape[0])).T
        except np.linalg.LinAlgError:
            return least_distance(A, rhs)
    AR = scipy.linalg.solve_triangular(R, A.T, trans="T").T          # A R^{-1}
    Rg = scipy.linalg.solve_triangular(R, g, trans="T")               # R^{-T} g
    v, alpha = least_distance(AR, rhs - A @ x + AR @ Rg)
    return x + scipy.linalg.solve_triangular(R, v - Rg), alpha


class Polished(NamedTuple):
    params: object            # a feasible point of (P) (q_min = 1), the polished KKT point
    normalized_margin: float  # its gamma_bar = q_min / rho^L
    start_margin: float       # gamma_bar of the direction it started from
    distance: float           # angle (radians) between the start direction and the polished one
    eps: float                # its KKT residual (Definition C.6; ``kkt_residual``'s default
    delta: float              # selection, the Clarke set on kinked models) ...
    multipliers: np.ndarray   # ... and multipliers, on the constraints ``index``
    index: np.ndarray
    n_active: int             # constraints with multiplier > 1e-8 max
    success: bool
    message: str
    n_kinks: int = 0          # kink sites the polished point sits on (|z| <= 1e-12 scale;
    #                           pattern polish: the face's kinks of active points, live units)
    selection: np.ndarray | None = None  # sigma at those kinks (the Clarke selection)


def _at_unit_margin(problem: Problem, params, caller: str):
    """theta~ = theta / q_min^{1/L} (flat, float64), its unravel and constraints (q_min = 1);
    a ValueError naming ``caller`` where theta does not separate the data."""
    c = np.asarray(constraints(problem, params))
    if not c.min() > 0:
        raise ValueError(f"{caller} needs a separating direction (q_min > 0); got q_min = "
                         f"{c.min():.6g}")
    flat, unravel = ravel_pytree(params)
    return np.asarray(flat, np.float64) * c.min() ** (-1.0 / problem.order), unravel, c / c.min()


def polish_kkt(problem: Problem, params, *, slack: float = 1.0, max_iter: int = 100,
               rtol: float = 1e-13, curvature: bool = False, method: str = "auto") -> Polished:
    """Solve (P) locally from a late direction, to find the KKT point the run is heading to.

    ``method="pieces"`` (the default, ``"auto"``, on a bias-free binary one-hidden-layer
    (leaky) ReLU net): on an activation pattern, (P) in v_j = |a_j| w_j is a convex
    program (min sum ||v_j||, the margins and the pattern linear in v; at a KKT point
    |a_j| = ||w_j||), solved by Clarabel from theta's own pattern, so gamma_bar never
    falls; sites whose pattern multiplier asks for a Clarke selection outside [lo, hi]
    change side and it is solved again (at most ``max_iter`` programs), and Newton's
    method on the square KKT system of the final face takes the point to round-off
    (``_polish_on_pieces``). Units with a_j = 0 and w_j = 0 stay dead, as under the flow.
    ``method="sqp"`` (every other model) is the following.

    Sequential quadratic programming: from a feasible theta (q_min = 1; first
    theta~ = theta / q_min^{1/L}), solve min <theta, d> + d^T B d / 2 s.t.
    c_k(theta) + <h_k, d> >= 1 over the constraints with c_k <= (1 + ``slack``) q_min, B the
    Hessian of (P)'s Lagrangian ||theta||^2 / 2 - sum lam_k (c_k - 1) at the last
    multipliers (shifted until positive definite; B = I at the first step), as a
    least-distance program (``least_distance``, SciPy's NNLS); then take the step a in
    (0, 1] along d that gives the largest normalized margin q_min / rho^L after rescaling
    to q_min = 1 — so every iterate is feasible and the margin never decreases. Stops when
    a full step gains less than ``rtol`` (relative) or no step gains, or after ``max_iter``.

    Kinks (models with ``Model.kinks``) make the constraints piecewise smooth, and a
    linearization with autodiff's gradient cannot move along them. The SQP works on pieces
    (DESIGN §6): every kink of a working constraint's data point that the step would cross
    gets a side constraint s (z + <grad z, d>) >= 0 (s: its current side), with the
    constraints' gradients taken with that side's derivative (hi for s = +1, lo for
    s = -1), so a step stops on the kink instead of crossing it. The side constraint's
    multiplier nu says which Clarke derivative the KKT system needs at a kink the step
    reaches: sigma = sigma_s + s nu / (sum_k lam_k e_k) over the constraints k of its data
    point (e_k: the constraint's cotangent there). Where sigma leaves [lo, hi] the kink
    switches side (the worst one per unit first) and the subproblem is solved again. At
    a fixed point every kink on which the point sits has sigma in [lo, hi], so theta is an
    exact Clarke-KKT point of (P): the subproblem's multipliers are (P)'s. Its residual
    is reported from ``kkt_residual`` (the Clarke set on kinked models)."""
    if method not in ("auto", "pieces", "sqp"):
        raise ValueError(f"method must be 'auto', 'pieces' or 'sqp', got {method!r}")
    if method == "pieces" and not _piecewise_convex(problem):
        raise ValueError(f"method='pieces' needs a bias-free binary one-hidden-layer (leaky) "
                         f"ReLU net (models.mlp((d, U, 1))), got {problem.model.name}")
    L = problem.order
    x, unravel, c = _at_unit_margin(problem, params, "polish_kkt")
    flat0 = ravel_pytree(params)[0]
    if method == "pieces" or (method == "auto" and _piecewise_convex(problem)):
        piece = _polish_on_pieces(problem, x, unravel, max_iter, tol=1e-10)
        start = float(np.linalg.norm(x)) ** (-L)
        if piece is not None and piece.margin >= start * (1 - 1e-12):
            theta = unravel(jnp.asarray(piece.flat))
            r = kkt_residual(problem, theta)
            lam = np.asarray(r.lam)
            return Polished(theta, piece.margin, start, angle(np.asarray(flat0), piece.flat),
                            float(r.eps), float(r.delta), lam, np.asarray(r.index),
                            int(np.sum(lam > 1e-8 * np.nanmax(lam))),
                            piece.message.startswith("converged"), piece.message,
                            piece.n_kinks, piece.sigma)
    kinks = problem.model.kinks
    point = _point_of(problem)

    def site_rows(x, sites):
        k = len(sites)
        pad = np.zeros((_bucket(k), 2), np.int64)
        pad[:k] = sites
        rows = _site_gradients(problem, unravel(jnp.asarray(x)), jnp.asarray(pad[:, 0]),
                               jnp.asarray(pad[:, 1]))
        return np.asarray(rows)[:k]

    margin = float(np.linalg.norm(x)) ** (-L)
    start_margin, converged, it = margin, False, 0
    message = f"stopped after max_iter = {max_iter} steps"
    lam_prev, side, sigma, slope_prev = None, None, np.zeros(0), None
    for it in range(1, max_iter + 1):
        S = np.nonzero(c <= (1.0 + slack) * c.min())[0]
        theta = unravel(jnp.asarray(x))
        B = _lagrangian_curvature(problem, theta, lam_prev, slope_prev) if curvature else None
        if kinks is None:
            J = np.asarray(_grads_at(problem, theta, jnp.asarray(S)))
            rows, rhs = J, 1.0 - c[S] + J @ x
            active = lam_prev[S] > 0 if lam_prev is not None else None
            target, alpha = _curved_least_distance(rows, rhs, x, B, active)
            lam_prev = np.zeros(c.shape[0])
            lam_prev[S] = alpha
            Z = None
        else:
            Z = np.asarray(_flat_pre(problem, theta))
            working = np.isin(np.arange(problem.n), point[S])[:, None]
            # side: +-1 for the kinks under a side constraint, 0 elsewhere; kept from the last
            # step where the point still sits on the kink, else its current side
            at = np.abs(Z) <= 1e-9 * np.abs(Z).max(axis=1, keepdims=True)
            side = np.where(at & (side != 0), side, 0) if side is not None else np.zeros(Z.shape)
            # a working point's kink the point sits on is under a side constraint from the
            # start (the lo side, whose derivative the gradients use): a step must not leave
            # it unseen (z = 0 shows no sign change)
            side = np.where(at & working & (side == 0), -1, side)
            for inner in range(10):  # side changes and new crossings, then step anyway
                slope = np.where(side > 0, kinks.hi, np.where(side < 0, kinks.lo, np.nan))
                slope = np.where(at | (side != 0), slope, np.nan)
                slope = np.where(at & (side == 0), kinks.lo, slope)
                c, H, Z, E = (np.asarray(a) for a in _piece_jacobians(
                    problem, theta, jnp.asarray(slope)))
                sites = np.argwhere(side != 0)
                rows, rhs = H[S], 1.0 - c[S] + H[S] @ x
                if len(sites):
                    s_k = side[sites[:, 0], sites[:, 1]]
                    Gz = s_k[:, None] * site_rows(x, sites)
                    rows = np.vstack([rows, Gz])
                    rhs = np.concatenate([rhs, Gz @ x - s_k * Z[sites[:, 0], sites[:, 1]]])
                # expected equalities: the last step's active constraints, the kinks on which
                # the point sits
                active = np.zeros(rows.shape[0], bool)
                if lam_prev is not None:
                    active[:len(S)] = lam_prev[S] > 0
                if len(sites):
                    active[len(S):] = at[sites[:, 0], sites[:, 1]]
                target, alpha = _curved_least_distance(rows, rhs, x, B, active)
                lam = alpha[:len(S)]
                lam_prev = np.zeros(c.shape[0])
                lam_prev[S] = lam
                flip = np.zeros(0, bool)
                if len(sites):
                    # sigma = sigma_s + s nu / (sum_k lam_k e_k) must lie in [lo, hi]
                    nu = alpha[len(S):]
                    le = np.array([np.sum(lam[point[S] == n] * E[S[point[S] == n], s_])
                                   for n, s_ in sites])
                    with np.errstate(divide="ignore", invalid="ignore"):
                        sig = np.where(s_k > 0, kinks.hi, kinks.lo) + s_k * nu / le
                    width = kinks.hi - kinks.lo
                    out = np.where(nu > 1e-12 * max(np.abs(alpha).max(), 1e-300),
                                   np.maximum(kinks.lo - sig, sig - kinks.hi) / width, -1.0)
                    out = np.where(np.isfinite(out), out, np.where(nu > 0, np.inf, -1.0))
                    sigma = sig
                    worst = np.full(side.shape[1], -np.inf)
                    # only a kink the point sits on changes side; one it is moving to is
                    # reached first (the step stops on it), and decided there
                    out = np.where(at[sites[:, 0], sites[:, 1]], out, -1.0)
                    np.maximum.at(worst, sites[:, 1], out)
                    flip = (out > 1e-9) & (out >= worst[sites[:, 1]])
                Z_t = np.asarray(_flat_pre(problem, unravel(jnp.asarray(target))))
                cross = (Z * Z_t < 0) & (side == 0) & working
                if flip.any():
                    side[sites[flip, 0], sites[flip, 1]] *= -1
                elif cross.any():
                    side = np.where(cross, np.sign(Z), side)
                else:
                    break
        slope_prev = None if Z is None else slope
        z, m, c_z, step = _line_search(problem, unravel, x, target, Z, L)
        if step < 1.0:
            # second-order correction (the Maratos effect: the constraints' curvature makes
            # the full step fall short of the margin): shift each working constraint by its
            # linearization's error at the full step and solve once more
            c_t = np.asarray(_constraints_at(problem, unravel(jnp.asarray(target))))[S]
            error = np.zeros(rows.shape[0])
            error[:len(S)] = c_t - (c[S] + rows[:len(S)] @ (target - x))
            target2, _ = _curved_least_distance(rows, rhs - error, x, B, active)
            z2, m2, c_z2, step2 = _line_search(problem, unravel, x, target2, Z, L)
            if m2 > m:
                z, m, c_z, step = z2, m2, c_z2, step2
        if not m > margin:
            converged = True
            message = "converged: no step along the linearized solution raises the margin"
            break
        x, c, margin, old = z, c_z, m, margin
        if m - old <= rtol * m and step == 1.0:
            converged = True
            message = f"converged: a full step gained {m / old - 1:.2g} (relative) < rtol"
            break
    theta = unravel(jnp.asarray(x))
    r = kkt_residual(problem, theta)
    lam = np.asarray(r.lam)
    on = 0 if Z is None else int(np.sum(np.abs(Z) <= 1e-12 * np.abs(Z).max(axis=1,
                                                                          keepdims=True)))
    return Polished(theta, margin, start_margin, angle(np.asarray(flat0), x), float(r.eps),
                    float(r.delta), lam, np.asarray(r.index),
                    int(np.sum(lam > 1e-8 * np.nanmax(lam))), converged, f"{message} ({it} steps)",
                    on, sigma)


# --- the polish on the pieces of a one-hidden-layer (leaky) ReLU net --------------------

def _piecewise_convex(problem: Problem) -> bool:
    """A bias-free binary one-hidden-layer (leaky) ReLU net (``models.mlp((d, U, 1))``):
    the model on which (P) is a convex program on every activation pattern."""
    m = problem.model
    return (m.kinks is not None and m.kinks.exact and len(m.config.get("widths", ())) == 3
            and m.n_outputs == 1)


def _pattern_program(X, y, s, side, lo, hi, live, tol):
    """min sum_j ||v_j|| s.t. y_n sum_j s_j D_nj <x_n, v_j> >= 1 and side_nj <x_n, v_j> >= 0
    (D = hi on side +1, lo on side -1) over the units ``live`` (v_j = 0 elsewhere): (P) on
    one activation pattern in the variables v_j = |a_j| w_j, a second-order cone program
    (Clarabel). Returns (status, V (d, U), lambda (N,), nu (N, U): the multipliers of the
    margin and pattern constraints)."""
    import clarabel
    import scipy.sparse as sp

    N, d = X.shape
    U = side.shape[1]
    units = np.nonzero(live)[0]
    u = units.size
    nv = d * u
    D = np.where(side > 0, hi, lo)[:, units]
    cols = (np.arange(u)[:, None] * d + np.arange(d)[None, :]).ravel()       # v_j contiguous
    margin = sp.csr_matrix(-(y[:, None, None] * (s[units][None, :, None] * D[:, :, None])
                             * X[:, None, :]).reshape(N, nv))
    pattern = sp.csr_matrix(((-side[:, units, None] * X[:, None, :]).ravel(),
                             (np.repeat(np.arange(N * u), d), np.tile(cols, N))),
                            shape=(N * u, nv))
    # (t_j, v_j) in the second-order cone: rows -(t_j, v_j) + s = 0
    r = np.arange(u * (d + 1))
    c = np.where(r % (d + 1) == 0, nv + r // (d + 1), (r // (d + 1)) * d + r % (d + 1) - 1)
    cone = sp.csr_matrix((-np.ones(r.size), (r, c)), shape=(r.size, nv + u))
    A = sp.vstack([sp.hstack([margin, sp.csr_matrix((N, u))]),
                   sp.hstack([pattern, sp.csr_matrix((N * u, u))]), cone]).tocsc()
    b = np.concatenate([-np.ones(N), np.zeros(N * u + r.size)])
    q = np.concatenate([np.zeros(nv), np.ones(u)])
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = tol
    settings.tol_ktratio = tol
    cones = [clarabel.NonnegativeConeT(N + N * u)] + [clarabel.SecondOrderConeT(d + 1)] * u
    sol = clarabel.DefaultSolver(sp.csc_matrix((nv + u, nv + u)), q, A, b, cones,
                                 settings).solve()
    z = np.asarray(sol.z)
    V = np.zeros((d, U))
    V[:, units] = np.asarray(sol.x)[:nv].reshape(u, d).T
    nu = np.zeros((N, U))
    nu[:, units] = z[N:N + N * u].reshape(N, u)
    return str(sol.status), V, z[:N], nu


@partial(jax.jit, static_argnums=(0, 1, 2))
def _pattern_kkt_system(d, u, m, v, X, y, slope, A, kn, kj):
    """F(v) and its Jacobian for the square KKT system of (P) on a pattern's face:
    v = (W (d, u), a (u), lambda_A (m), sigma_K), with slope the activation derivative of
    every (point, unit) and sigma at the kink sites K = (kn, kj);
    F = (w_j - sum_A lambda_n y_n a_j S_nj x_n, a_j - sum_A lambda_n y_n S_nj z_nj,
    c_n - 1 on A, z_K)."""
    def F(v):
        W, a = v[:d * u].reshape(d, u), v[d * u:(d + 1) * u]
        lam, sig = v[(d + 1) * u:(d + 1) * u + m], v[(d + 1) * u + m:]
        S = slope.at[kn, kj].set(sig)
        Z = X @ W
        ly = (lam * y[A])[:, None] * S[A]
        return jnp.concatenate([(W - X[A].T @ ly * a[None, :]).ravel(),
                                a - jnp.sum(ly * Z[A], axis=0),
                                y[A] * ((S[A] * Z[A]) @ a) - 1.0, Z[kn, kj]])
    return F(v), jax.jacfwd(F)(v)


class _Piece(NamedTuple):
    flat: np.ndarray     # theta (flat, q_min = 1)
    margin: float
    sigma: np.ndarray    # the selections at the kink sites the KKT system uses
    n_kinks: int
    message: str


def _polish_on_pieces(problem: Problem, x, unravel, max_rounds: int, tol: float):
    """Identify, then Newton: the pattern programs (``_pattern_program``) from theta's
    activation pattern; where a pattern constraint's multiplier nu asks for a Clarke
    selection sigma = D + side nu / (lambda_n y_n s_j) outside [lo, hi] the site changes
    side (the point, on that boundary, stays feasible, so gamma_bar never falls) and the
    program is solved again; at a pattern with no such site the optimum is a Clarke-KKT
    point of (P) to the solver's accuracy. Newton's method on the square KKT system of
    its face then takes it to round-off. The face is read off the program's solution,
    where the interior-point method leaves clear gaps (default problem: 1e-2 against 1e-9
    and below): units with ||v_j|| > 1e-6 max, constraints A with lambda > 1e-6 max, and
    kink sites K of A's points on those units with |z| <= 1e-6 ||x_n|| ||v_j||. Newton's
    solution is kept only if it converged (|F| <= 1e-10), lambda >= 0, sigma in [lo, hi],
    every other site keeps its side and gamma_bar does not fall: a wrong face fails one of
    these, and the program's point is returned instead, with a message saying so."""
    import scipy.linalg
    kinks = problem.model.kinks
    lo, hi = float(kinks.lo), float(kinks.hi)
    X = np.asarray(problem.X, np.float64).reshape(problem.n, -1)
    y = np.asarray(problem.y, np.float64)
    W, a = (np.asarray(p, np.float64) for p in unravel(jnp.asarray(x)))
    a = a[:, 0]
    N, d = X.shape
    s = np.where(a >= 0, 1.0, -1.0)
    side = np.where(X @ W >= 0, 1.0, -1.0)
    # a unit with a_j = 0 and w_j = 0 has no gradient: the flow never moves it, nor does this
    live = (a != 0) | np.any(W != 0, axis=0)
    best = 0.5 * float(x @ x)                                  # sum ||v_j|| at the start
    V, lam, nu, rounds, status = None, None, None, 0, "not run"
    for rounds in range(1, max_rounds + 1):
        status, V1, lam1, nu1 = _pattern_program(X, y, s, side, lo, hi, live, tol)
        if status not in ("Solved", "AlmostSolved"):
            break
        obj = float(np.linalg.norm(V1, axis=0).sum())
        if V is not None and obj > best * (1 + 1e-9):
            break                                              # no gain: keep the last
        V, lam, nu, best = V1, lam1, nu1, min(best, obj)
        norms = np.linalg.norm(V, axis=0)
        used = norms > 1e-6 * norms.max()
        with np.errstate(divide="ignore", invalid="ignore"):
            sig = np.where(side > 0, hi, lo) + side * nu / (lam[:, None] * y[:, None] * s)
        out = ((nu > 1e-7 * lam.max()) & used[None, :]
               & ~((sig >= lo - 1e-6 * (hi - lo)) & (sig <= hi + 1e-6 * (hi - lo))))
        if not out.any():
            break
        side = np.where(out, -side, side)
    if V is None:
        return None
    norms = np.linalg.norm(V, axis=0)
    units = np.nonzero(norms > 1e-6 * norms.max())[0]
    u = units.size
    root = np.sqrt(norms[units])
    W0, a0 = V[:, units] / root, s[units] * root
    # the face: active constraints, and the kinks of their points on the units in use
    A = np.nonzero(lam > 1e-6 * lam.max())[0]
    Zr = np.abs(X @ V[:, units]) / (np.linalg.norm(X, axis=1)[:, None] * norms[units])
    onA = np.zeros(N, bool)
    onA[A] = True
    kn, kj = np.nonzero((Zr <= 1e-6) & onA[:, None])
    slope = np.where(side > 0, hi, lo)[:, units]
    with np.errstate(divide="ignore", invalid="ignore"):
        sig0 = slope[kn, kj] + side[kn, units[kj]] * nu[kn, units[kj]] / (
            lam[kn] * y[kn] * s[units[kj]])
    v = np.concatenate([W0.ravel(), a0, lam[A], np.clip(sig0, lo, hi)])
    args = tuple(jnp.asarray(t) for t in (X, y, slope, A, kn, kj))
    res, steps, best_v = np.inf, 0, v
    for steps in range(1, 31):
        F, J = (np.asarray(t) for t in _pattern_kkt_system(d, u, A.size, jnp.asarray(v),
                                                           *args))
        r = float(np.linalg.norm(F))
        if not r < res:
            break
        res, best_v = r, v
        if r <= 1e-14 * max(1.0, float(np.linalg.norm(v))):
            break
        # least squares: the face may have a continuum of solutions (equal units)
        v = v + scipy.linalg.lstsq(J, -F, cond=1e-12, lapack_driver="gelsd")[0]
    v = best_v

    def theta_of(Wu, au):
        Wf, af = np.zeros_like(W), np.zeros_like(a)
        Wf[:, units], af[units] = Wu, au
        flat = np.concatenate([Wf.ravel(), af])
        c = np.asarray(constraints(problem, unravel(jnp.asarray(flat))))
        if not c.min() > 0:
            return flat, -np.inf
        flat = flat * c.min() ** -0.5                          # q_min = 1: gamma_bar = 1/rho^2
        return flat, float(1.0 / (flat @ flat))

    flat0, margin0 = theta_of(W0, a0)
    Wn, an = v[:d * u].reshape(d, u), v[d * u:(d + 1) * u]
    lam_n, sig_n = v[(d + 1) * u:(d + 1) * u + A.size], v[(d + 1) * u + A.size:]
    Zn = X @ Wn
    keep = np.ones(Zn.shape, bool)
    keep[kn, kj] = False
    sides_kept = np.all((np.sign(Zn) == side[:, units]) | ~keep | (np.abs(Zn) == 0))
    flat_n, margin_n = theta_of(Wn, an)
    width = hi - lo
    ok = (res <= 1e-10 and np.all(lam_n >= 0) and np.all(sig_n >= lo - 1e-12 * width)
          and np.all(sig_n <= hi + 1e-12 * width) and sides_kept
          and margin_n >= margin0 * (1 - 1e-12))
    text = (f"{rounds} pattern programs (Clarabel: {status}), face |A| = {A.size}, "
            f"{kn.size} kinks, {u} units; Newton {steps} steps, |F| {res:.2g}")
    if ok:
        return _Piece(flat_n, margin_n, sig_n, int(kn.size), f"converged: {text}")
    return _Piece(flat0, margin0, np.clip(sig0, lo, hi), int(kn.size),
                  f"pattern optimum kept, Newton's face solution rejected: {text}")


# --- convergence report -------------------------------------------------------------------

_REPORT_COLUMNS = ("log_T", "log_loss", "one_minus_beta", "one_minus_beta_clarke", "kkt_eps",
                   "kkt_delta", "normalized_margin", "margin_gap", "path_length")


# one compiled program per model and shape across reports (DESIGN §1)
_kkt_residual_batch = jax.jit(jax.vmap(kkt_residual, (None, 0)))


def convergence_report(problem: Problem, trajectory, polished: Polished | None = None,
                       decades: int = 4, polish: bool = True, local: bool = True,
                       polish_max_iter: int = 100) -> dict:
    """How far a run has converged: for the saved points after t0 in the last ``decades``
    decades of log T (T = t for flow, sum eta for descent), eps and delta (the
    Trajectory's ``kkt_eps``/``kkt_delta``, or computed from its snapshots), 1 - beta, the
    normalized margin and its gap to the polished KKT point (``polish_kkt`` from the saved
    direction of largest normalized margin in the last decade, unless ``polished`` is
    given or ``polish=False``), and the path length of
    theta^ (sum of ||theta^_i - theta^_{i-1}|| between saved points). ``verdict`` reads
    the certificates (``_verdict``: the angle to the polished point, the margin gap and
    eps, decade against decade; without a polished point, the path of theta^).
    ``local_optimality`` (with ``local=True`` and a polished point) says whether the
    polished point is a local maximum of the margin. The polish takes at most
    ``polish_max_iter`` pattern programs (one-hidden-layer ReLU nets; the default problem
    needs 7, ~0.4 s each) or SQP steps (other models)."""
    cols = trajectory.columns
    after = np.nonzero(cols["separated"].astype(bool) & np.isfinite(cols["log_T"])
                       & (cols["log_T"] > 0))[0]
    if after.size == 0:
        if trajectory.meta.get("status") == "not_separated":
            raise ValueError(f"the data were never separated (status not_separated), so (P) "
                             f"has no KKT point to converge to: "
                             f"{trajectory.meta.get('message', '')}")
        raise ValueError("no saved point after separation with log T > 0: nothing to report")
    snaps = trajectory.snapshots
    have_snaps = snaps is not None and len(jax.tree_util.tree_leaves(snaps)) > 0
    dirs = None
    if have_snaps:
        flat = np.stack([np.asarray(ravel_pytree(jax.tree_util.tree_map(lambda a: a[i], snaps))[0])
                         for i in after])
        dirs = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    if "kkt_eps" in cols:
        eps, delta = cols["kkt_eps"][after], cols["kkt_delta"][after]
    elif have_snaps:
        batch = jax.tree_util.tree_map(lambda a: jnp.asarray(a[after]), snaps)
        r = _kkt_residual_batch(problem, batch)
        eps, delta = np.asarray(r.eps), np.asarray(r.delta)
    else:
        eps = delta = np.full(after.size, np.nan)
    gamma = cols["normalized_margin"][after]
    log10_log_T = np.log10(cols["log_T"][after])
    top = log10_log_T[-1]
    if polished is None and polish and have_snaps:
        # start from the best late direction: gamma_bar need not be monotone (descent)
        late = np.nonzero(log10_log_T >= top - 1)[0]
        best = after[late[np.nanargmax(gamma[late])]]
        polished = polish_kkt(problem, jax.tree_util.tree_map(lambda a: a[best], snaps),
                              max_iter=polish_max_iter)
    path = np.full(after.size, np.nan)
    if dirs is not None:
        path[1:] = np.linalg.norm(np.diff(dirs, axis=0), axis=1)
    keep = log10_log_T >= top - decades
    rows = {
        "log_T": cols["log_T"][after][keep],
        "log_loss": cols["log_loss"][after][keep],
        "one_minus_beta": 1.0 - cols["beta"][after][keep],
        "one_minus_beta_clarke": 1.0 - (cols["beta_clarke"] if "beta_clarke" in cols else
                                        np.full(len(cols["beta"]), np.nan))[after][keep],
        "kkt_eps": eps[keep], "kkt_delta": delta[keep],
        "normalized_margin": gamma[keep],
        "margin_gap": (polished.normalized_margin - gamma[keep]) if polished else
        np.full(keep.sum(), np.nan),
        "path_length": path[keep],
    }
    last = np.nansum(path[log10_log_T > top - 1])
    before = np.nansum(path[(log10_log_T > top - 2) & (log10_log_T <= top - 1)])
    verdict = _verdict(log10_log_T, eps, gamma, dirs, polished, last, before)
    # is the polished KKT point a local maximum of the margin? (``local_optimality``)
    optimality = None
    if local and polished is not None:
        optimality = local_optimality(problem, polished.params)
    return {"rows": rows, "polished": polished, "path_last_decade": float(last),
            "path_previous_decade": float(before), "verdict": verdict,
            "max_normalized_margin_seen": float(np.nanmax(gamma)),
            "local_optimality": optimality}


def _decade_trend(v, log10_log_T):
    """(median over the last decade of log T, median over the decade before) of ``v``."""
    top = log10_log_T[-1]
    last = v[(log10_log_T > top - 1) & np.isfinite(v)]
    prev = v[(log10_log_T > top - 2) & (log10_log_T <= top - 1) & np.isfinite(v)]
    med = lambda a: float(np.median(a)) if a.size else math.nan
    return med(last), med(prev)


def _verdict(log10_log_T, eps, gamma, dirs, polished, path_last, path_before) -> str:
    """The convergence verdict from the certificates, with its evidence.

    A direction converging like 1/log t moves less every decade, but its path per decade
    shrinks only by the ratio of the decades' logs, so a verdict read off the path alone
    flips on slow runs (a depth-2 diagonal net was "converging" at log t = 10^4 and "not
    converged" at 10^8 on the same run). With a polished KKT point the verdict reads the
    certificates instead: the angle to that point and the margin gap must shrink from the
    decade before to the last one (each median), and the KKT residual eps must not grow;
    "converged" when the last direction is within 1e-6 rad of the polished point, whose
    residual is below 1e-8. Without a polished point it falls back on the path: converging
    when the path over the last decade is at most half the one before and eps does not
    grow (the Mexican hat of Appendix I moves 0.95 times as much per decade: not
    converged)."""
    eps_last, eps_prev = _decade_trend(eps, log10_log_T)
    eps_ok = not (eps_last > eps_prev * (1 + 1e-6))  # NaN (unknown) does not count against
    eps_text = f"eps {eps_prev:.3g} -> {eps_last:.3g}"
    if dirs is None:
        return "unknown: the trajectory has no snapshots, so theta^'s path is not known"
    if polished is not None:
        p = np.asarray(ravel_pytree(polished.params)[0])
        p = p / np.linalg.norm(p)
        ang = 2 * np.arctan2(np.linalg.norm(dirs - p, axis=1), np.linalg.norm(dirs + p, axis=1))
        gap = (polished.normalized_margin - gamma) / polished.normalized_margin
        ang_last, ang_prev = _decade_trend(ang, log10_log_T)
        gap_last, gap_prev = _decade_trend(gap, log10_log_T)
        evidence = (f"angle to the polished KKT point {ang_prev:.3g} -> {ang_last:.3g} rad, "
                    f"relative margin gap {gap_prev:.3g} -> {gap_last:.3g}, {eps_text} "
                    f"(medians, decade before -> last decade of log T); polished point eps "
                    f"{polished.eps:.3g}")
        if ang[-1] <= 1e-6 and polished.eps <= 1e-8:
            return f"converged: the last direction is {ang[-1]:.2g} rad from the polished KKT point; {evidence}"
        if ang_last < ang_prev and not gap_last > gap_prev and eps_ok:
            return f"converging: {evidence}"
        if np.isfinite(ang_prev):
            return (f"not converged: {evidence}; a converging direction approaches the KKT "
                    f"point it is heading to")
    if path_before == 0:
        return (f"unknown: no saved motion of theta^ in the decade before the last "
                f"(last decade: {path_last:.3g}); run longer or save more points")
    ratio = path_last / path_before
    if ratio < 0.5 and eps_ok:
        return (f"converging: theta^ moved {path_last:.3g} over the last decade of log T, "
                f"{ratio:.2g} times the {path_before:.3g} of the decade before; {eps_text}")
    return (f"not converged: theta^ moved {path_last:.3g} over the last decade of log T, "
            f"{ratio:.2g} times the {path_before:.3g} of the decade before (a converging "
            f"direction's path shrinks geometrically per decade); {eps_text}; no limit "
            f"direction is claimed")


def format_report(report: dict, max_rows: int = 12) -> str:
    """The report as a markdown table (at most ``max_rows`` rows, evenly thinned)."""
    rows = report["rows"]
    n = len(rows["log_T"])
    pick = np.unique(np.linspace(0, n - 1, min(n, max_rows)).round().astype(int))
    head = "| " + " | ".join(_REPORT_COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(_REPORT_COLUMNS)]
    for i in pick:
        lines.append("| " + " | ".join(f"{rows[k][i]:.4g}" for k in _REPORT_COLUMNS) + " |")
    lines.append("")
    lines.append("kkt_eps: the KKT residual over the Clarke subdifferential (exact for one "
                 "hidden layer, the upper end of the bracket deeper; autodiff's fixed "
                 "selection relu'(0) = 0 gives only an upper bound that need not fall)")
    p = report["polished"]
    if p is not None:
        lines.append("")
        lines.append(f"polished KKT point: normalized margin {p.normalized_margin:.10g} "
                     f"(max seen on the trajectory {report['max_normalized_margin_seen']:.10g}), "
                     f"Clarke eps {p.eps:.3g}, delta {p.delta:.3g}, {p.n_active} active constraints, "
                     f"angle to its start {p.distance:.3g} rad; polish: {p.message}")
    lines.append(f"direction: {report['verdict']}")
    opt = report.get("local_optimality")
    if opt is not None:
        lines.append(f"polished point: {opt.verdict} ({opt.reason})"
                     + (f"; escaping gains {opt.gain:.3g} in gamma_bar" if opt.escaped else ""))
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    """eps, delta, 1 - beta, the margin gap and the path length against log T (log-log)."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    rows = report["rows"]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for k, label in [("kkt_eps", "ε (KKT)"), ("kkt_delta", "δ (KKT)"),
                     ("one_minus_beta", "1 − β (autodiff)"),
                     ("one_minus_beta_clarke", "1 − β (min-norm Clarke)"), ("margin_gap", "γ̄* − γ̄"),
                     ("path_length", "‖Δθ̂‖ per saved step")]:
        v = np.asarray(rows[k], float)
        ok = np.isfinite(v) & (v > 0)
        if ok.any():
            ax.loglog(rows["log_T"][ok], v[ok], ".-", label=label)
    ax.set_xlabel("log T")
    ax.set_title("convergence to a KKT point of (P)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    io.write_figure(fig, path, dpi=120)


# --- max-margin references in other norms (optimizer geometry, ``homoflow.geometry``) ------

def _check_norm(norm) -> float:
    try:
        p = float(norm)
    except (TypeError, ValueError):
        raise ValueError(f"norm must be a number in [1, inf] (an l_p norm), got {norm!r}") from None
    if not p >= 1:
        raise ValueError(f"norm must be a number in [1, inf] (an l_p norm), got {norm}")
    return p


def _linprog(c, A_ub, b_ub, bounds, what):
    import scipy.optimize
    res = scipy.optimize.linprog(c, A_ub=A_ub, b_ub=b_ub, bounds=bounds, method="highs-ds",
                                 options={"primal_feasibility_tolerance": 1e-10,
                                          "dual_feasibility_tolerance": 1e-10})
    if res.status == 2:
        raise ValueError(f"the constraints <w, g_k> >= 1 are infeasible: the data are not "
                         f"separable by these features, so there is no {what} max-margin "
                         f"classifier")
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the {what} max-margin LP: {res.message}")
    return res


def _lp_margin_general(Gmat, p):
    """min ||w||_p s.t. Gmat w >= 1 for 1 < p < inf: SciPy's SLSQP on ||w||_p^p / p from
    the l2 solution, then Newton on the KKT system of its active set (w = psi(G_S^T lam),
    psi(v) = sign(v) |v|^{q-1}, G_S w = 1), dropping negative multipliers, to full
    precision."""
    import scipy.optimize
    K, P = Gmat.shape
    q = p / (p - 1.0)
    psi = lambda v: np.sign(v) * np.abs(v) ** (q - 1.0)
    w0, _ = least_distance(Gmat)
    res = scipy.optimize.minimize(
        lambda w: (np.sum(np.abs(w) ** p) / p, np.sign(w) * np.abs(w) ** (p - 1.0)),
        w0 * max(1.0, 1.0 / (Gmat @ w0).min()), jac=True, method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda w: Gmat @ w - 1.0, "jac": lambda w: Gmat}],
        options={"ftol": 1e-15, "maxiter": 1000})
    w = res.x
    S = np.nonzero(Gmat @ w <= 1.0 + 1e-5)[0]
    for _ in range(K):
        G = Gmat[S]
        lam0 = np.linalg.lstsq(G.T, np.sign(w) * np.abs(w) ** (p - 1.0), rcond=None)[0]
        sol = scipy.optimize.root(
            lambda lam: (G @ psi(G.T @ lam) - 1.0,
                         (G * ((q - 1.0) * np.abs(G.T @ lam) ** (q - 2.0))) @ G.T),
            lam0, jac=True, method="lm", options={"xtol": 1e-15, "ftol": 1e-15})
        lam = sol.x
        if lam.min() >= 0:
            break
        S = S[lam > 0]
    w = psi(Gmat[S].T @ lam)
    alpha = np.zeros(K)
    alpha[S] = lam
    return w, alpha


def max_margin(Gmat, norm=2.0) -> tuple[np.ndarray, np.ndarray]:
    """min ||w||_p s.t. Gmat w >= 1 (p = ``norm``): the l_p max-margin classifier of the
    feature rows Gmat[k] (its margin is 1 / ||w||_p, its direction the limit of l_p
    steepest descent on a linear model; Gunasekar, Lee, Soudry & Srebro, ICML 2018).
    Returns (w, alpha) with alpha >= 0 the multipliers of the constraints.

    p = 2: ``least_distance``. p = 1 (w = u - v, u, v >= 0, min 1^T (u + v)) and p = inf
    (min t s.t. -t <= w_i <= t) are linear programs solved by HiGHS's dual simplex (an exact
    vertex); other p by SciPy (``_lp_margin_general``: SLSQP, then Newton on the KKT
    system). Raises ValueError for a bad norm or data that no w separates."""
    p = _check_norm(norm)
    Gmat = np.asarray(Gmat, np.float64)
    K, P = Gmat.shape
    if p == 2.0:
        return least_distance(Gmat)
    if p == 1.0:
        res = _linprog(np.ones(2 * P), -np.hstack([Gmat, -Gmat]), -np.ones(K),
                       [(0, None)] * (2 * P), "l1")
        return res.x[:P] - res.x[P:], -res.ineqlin.marginals
    if math.isinf(p):
        c = np.zeros(P + 1)
        c[-1] = 1.0
        eye, one = np.eye(P), np.ones((P, 1))
        A = np.vstack([np.hstack([-Gmat, np.zeros((K, 1))]), np.hstack([eye, -one]),
                       np.hstack([-eye, -one])])
        b = np.concatenate([-np.ones(K), np.zeros(2 * P)])
        res = _linprog(c, A, b, [(None, None)] * P + [(0, None)], "l_inf")
        return res.x[:P], -res.ineqlin.marginals[:K]
    return _lp_margin_general(Gmat, p)


class NormKKT(NamedTuple):
    eps: float            # || grad(||w~||_p^2 / 2) - G^T lam ||_q (dual norm), best subgradient
    delta: float          # sum lam_k (<g_k, w~> - 1)
    lam: np.ndarray


def norm_kkt_residual(Gmat, w, norm=2.0, tol: float = 1e-9) -> NormKKT:
    """The (eps, delta)-KKT residual (Definition C.6 with the l_p norm) of w for
    min ||w||_p^2 / 2 s.t. Gmat w >= 1 (the l_p max-margin problem of a linear model), at
    w~ = w / min_k <g_k, w>: eps = min || s - Gmat^T lam ||_q over lam >= 0 and s in the
    subdifferential of ||.||_p^2 / 2 at w~, delta = sum lam_k (<g_k, w~> - 1); both 0 exactly
    at the l_p max-margin classifier (Tsilivis et al. 2025's generalized KKT points).

    p = 1, inf: one LP (HiGHS) over lam and the subgradient (coordinates with
    |w_i| <= ``tol`` max|w| count as zero; for p = inf the maximal ones are those within
    ``tol``), minimizing eps + delta. 1 < p < inf: s is the gradient
    ||w~||_p^{2-p} sign(w~)|w~|^{p-1} (``geometry.steepest_direction`` of w~ in the dual
    norm) and lam minimizes ||s - G^T lam||_2^2 + delta^2 (``nnls``), a valid certificate
    whose eps is reported in the q-norm. ValueError where w does not separate."""
    import scipy.optimize
    from .geometry import steepest_direction
    p = _check_norm(norm)
    Gmat = np.asarray(Gmat, np.float64)
    w = np.asarray(w, np.float64).ravel()
    K, P = Gmat.shape
    m = Gmat @ w
    if not m.min() > 0:
        raise ValueError(f"w does not separate the data (min <g_k, w> = {m.min():.6g})")
    w = w / m.min()
    d = Gmat @ w - 1.0
    a = np.abs(w)
    if 1 < p < math.inf:
        s = np.asarray(steepest_direction(jnp.asarray(w), 1.0 - 1.0 / p))
        lam = np.asarray(nnls(jnp.asarray(np.vstack([Gmat.T, d[None, :]])),
                              jnp.asarray(np.concatenate([s, [0.0]]))))
        q = p / (p - 1.0)
        return NormKKT(float(np.linalg.norm(s - Gmat.T @ lam, ord=q)), float(lam @ d), lam)
    if p == 1.0:
        # variables [lam (K), s_free (P), t]; s_i = ||w||_1 sign(w_i) off the zero set
        n1 = a.sum()
        free = a <= tol * a.max()
        s_fixed = np.where(free, 0.0, n1 * np.sign(w))
        c = np.concatenate([d, np.zeros(P), [1.0]])
        E = np.diag(free.astype(float))
        one = np.ones((P, 1))
        A = np.vstack([np.hstack([-Gmat.T, E, -one]), np.hstack([Gmat.T, -E, -one])])
        b = np.concatenate([-s_fixed, s_fixed])
        bounds = [(0, None)] * K + [(-n1, n1) if f else (0, 0) for f in free] + [(0, None)]
        x = _linprog(c, A, b, bounds, "l1 KKT").x
        lam = x[:K]
        s = s_fixed + x[K:K + P] * free
        return NormKKT(float(np.abs(s - Gmat.T @ lam).max()), float(lam @ d), lam)
    # p = inf: s = ||w||_inf sum_{i in argmax} mu_i sign(w_i) e_i, mu in the simplex;
    # variables [lam (K), mu (P), r (P) >= |s - G^T lam|]
    ninf = a.max()
    top = a >= (1.0 - tol) * ninf
    S = np.diag(ninf * np.sign(w) * top)
    c = np.concatenate([d, np.zeros(P), np.ones(P)])
    I = np.eye(P)
    A = np.vstack([np.hstack([-Gmat.T, S, -I]), np.hstack([Gmat.T, -S, -I])])
    b = np.zeros(2 * P)
    A_eq = np.concatenate([np.zeros(K), top.astype(float), np.zeros(P)])[None, :]
    res = scipy.optimize.linprog(c, A_ub=A, b_ub=b, A_eq=A_eq, b_eq=[1.0],
                                 bounds=[(0, None)] * K + [(0, None) if t else (0, 0) for t in top]
                                 + [(0, None)] * P, method="highs-ds")
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the l_inf KKT LP: {res.message}")
    lam, mu = res.x[:K], res.x[K:K + P]
    s = S @ mu
    return NormKKT(float(np.abs(s - Gmat.T @ lam).sum()), float(lam @ d), lam)


# --- is the KKT point a local maximum of the margin? --------------------------------------

class LocalOptimality(NamedTuple):
    verdict: str              # "local maximum (second order)", "not a local maximum", "inconclusive"
    reason: str
    min_curvature: float      # smallest eigenvalue of the Lagrangian's reduced Hessian (piece)
    escape: object            # params pytree: the escape direction (None unless escaping)
    step: float               # the step along it that was taken (in units of ||theta||)
    gain: float               # relative gain in gamma_bar after the step and a re-polish
    escaped: object           # the re-polished point (None unless escaping)


@jax.jit
def _lagrangian_hessian(problem: Problem, params, lam, index, slope):
    """The Hessian of sum_k lam_k c_k (constraints ``index``) at ``params``, with the
    activation derivative ``slope`` (N, S) where finite (a smooth piece of the
    constraints)."""
    flat, unravel = ravel_pytree(params)
    kinks = problem.model.kinks

    def total(z):
        p = unravel(z)
        if kinks is None:
            c = constraints(problem, p)
        else:
            slopes = _slopes_of(problem, p, slope)
            out = kinks.apply(p, problem.X, slopes, (0.0,) * kinks.layers)
            c = constraints_of(problem, out)
        return jnp.sum(lam * c[index])

    return jax.hessian(total)(flat)


def _dead_unit_gain(X, y, lam, rng, starts: int = 64, iters: int = 300):
    """max over unit u and s = +-1 of s sum_n lam_n y_n relu(u . x_n): a new unit a relu(w . x)
    of size r (|a| = |w| = r) raises the Lagrangian sum_n lam_n q_n by r^2 times this and
    the squared norm by 2 r^2, so above 1 the second-order condition fails along it (a
    heuristic ascent from many starts; a value it finds is attained, so it is a certificate
    once the step is verified on the margin itself)."""
    c = lam * y
    best, best_u, best_s = -np.inf, None, 1.0
    d = X.shape[1]
    U = rng.normal(size=(starts, d))
    U = np.vstack([U, X, -X])
    U /= np.linalg.norm(U, axis=1, keepdims=True)
    for s in (1.0, -1.0):
        V = U.copy()
        for _ in range(iters):
            act = (V @ X.T > 0)
            g = s * (act * c[None, :]) @ X
            V = V + 0.1 * (g - np.sum(g * V, axis=1, keepdims=True) * V)
            V /= np.linalg.norm(V, axis=1, keepdims=True)
        vals = s * np.maximum(V @ X.T, 0.0) @ c
        i = int(np.argmax(vals))
        if vals[i] > best:
            best, best_u, best_s = float(vals[i]), V[i], s
    return best, best_u, best_s


def local_optimality(problem: Problem, params, *, dead_tol: float = 1e-6,
                     curvature_tol: float = 1e-8, seed: int = 0) -> LocalOptimality:
    """Is the KKT point ``params`` (e.g. ``polish_kkt``'s) a local maximum of the
    normalized margin? (Beyond the paper: Vardi, Shamir & Srebro, NeurIPS 2022, show that
    gradient flow on ReLU nets can converge to KKT points of (P) that are not local optima.)

    1. Escape probe for dead units (one-hidden-layer (leaky) ReLU MLPs): a unit whose
       weights are below ``dead_tol`` ||theta|| contributes nothing at first order, and
       regrowing it as a relu(w . x) with |a| = |w| = r changes the Lagrangian
       sum_n lam_n q_n - ||theta||^2 / 2 by r^2 (s sum_n lam_n y_n relu(u . x_n) - 1)
       (``_dead_unit_gain``; lam: the KKT multipliers at q_min = 1). Above 0 the
       second-order necessary condition fails: the unit is regrown at the step r that gives
       steps 0.03, 0.1 and 0.3 ||theta|| and re-polished (``polish_kkt``); the verdict is
       "not a local maximum" only when that gives a strictly larger gamma_bar, and
       ``escaped`` is that point.
    2. Second-order test on the smooth piece: the Hessian of the Lagrangian
       ||theta||^2 / 2 - sum_n lam_n (q_n - 1) (with the derivative lo at the kinks the
       point sits on, the piece's) restricted to the directions that keep every constraint
       with lam_n > 0 and every kink at first order. Positive definite there (above
       ``curvature_tol``) and no dead-unit escape: "local maximum (second order)", the
       second-order sufficient condition on that piece; directions leaving the piece (off a
       kink) are first-order and covered by the KKT multipliers being strictly inside
       their bounds, which the reason reports. A negative eigenvalue on the subspace of
       all active constraints: "not a local maximum" after the same verification.
    Otherwise "inconclusive", with the reason."""
    L = problem.order
    flat, unravel, c = _at_unit_margin(problem, params, "local_optimality")
    theta = unravel(jnp.asarray(flat))
    gamma = float(np.linalg.norm(flat)) ** (-L)
    r = kkt_residual(problem, theta)
    lam_used, index = np.asarray(r.lam), np.asarray(r.index)
    lam = np.zeros(c.shape[0])
    lam[index] = lam_used
    if not (np.isfinite(r.eps) and r.eps <= 1e-6 * np.linalg.norm(flat)):
        return LocalOptimality("inconclusive", f"not a KKT point: eps = {float(r.eps):.3g} "
                               f"(polish it first)", math.nan, None, math.nan, math.nan, None)
    kinks = problem.model.kinks

    def verify(direction, reason, curvature):
        """Step along ``direction`` (flat) and re-polish: the escape is verified when the
        re-polished margin is strictly larger (the gain is of second order, so the step
        itself may lower gamma_bar before the polish rebalances the other weights)."""
        best, best_step, best_pol = gamma, math.nan, None
        for step in (0.03, 0.1, 0.3):
            z = flat + step * np.linalg.norm(flat) * direction / np.linalg.norm(direction)
            if not np.min(np.asarray(_constraints_at(problem, unravel(jnp.asarray(z))))) > 0:
                continue
            pol = polish_kkt(problem, unravel(jnp.asarray(z)))
            if pol.normalized_margin > best:
                best, best_step, best_pol = pol.normalized_margin, step, pol
        if not best > gamma * (1 + 1e-9):
            return None
        return LocalOptimality("not a local maximum", reason, curvature,
                               unravel(jnp.asarray(direction)), best_step, best / gamma - 1,
                               best_pol)

    reasons = []
    # 1. dead units of a one-hidden-layer MLP
    if kinks is not None and kinks.exact and not problem.model.multiclass:
        W, a = (np.asarray(g) for g in theta[:2])
        a = a.reshape(W.shape[1], -1)[:, 0]
        size = np.sqrt(np.sum(W * W, axis=0) + a * a)
        dead = np.nonzero(size <= dead_tol * np.linalg.norm(flat))[0]
        if dead.size:
            X = np.asarray(problem.X).reshape(problem.n, -1)
            value, u, s = _dead_unit_gain(X, np.asarray(problem.y), lam,
                                          np.random.default_rng(seed))
            if value > 1.0 + 1e-9:
                j = dead[0]
                dW, da = np.zeros_like(W), np.zeros_like(a)
                dW[:, j], da[j] = u, s
                direction = np.asarray(ravel_pytree((jnp.asarray(dW),
                                                     jnp.asarray(da.reshape(-1, 1))) +
                                                    tuple(jnp.zeros_like(g) for g in theta[2:]))[0])
                out = verify(direction, f"dead unit {j} regrown along u with sign {s:+g}: "
                             f"s sum lam_n y_n relu(u . x_n) = {value:.6g} > 1", math.nan)
                if out is not None:
                    return out
                reasons.append(f"dead unit {j} has gain {value:.4g} > 1 but the step did not "
                               f"raise gamma_bar")
            else:
                reasons.append(f"{dead.size} dead unit(s), none can be regrown with gain "
                               f"(best {value:.4g} <= 1)")
    # 2. the smooth piece
    held = None
    act = np.nonzero(lam > 1e-9 * max(lam.max(), 1e-300))[0]
    rows = [np.asarray(_grads_at(problem, theta, jnp.asarray(act)))] if act.size else []
    if kinks is not None:
        Z = np.asarray(_flat_pre(problem, theta))
        held = np.abs(Z) <= 1e-9 * np.abs(Z).max(axis=1, keepdims=True)
        sites = np.argwhere(held & np.isin(np.arange(problem.n), _point_of(problem)[act])[:, None])
        if len(sites):
            rows.append(np.asarray(_site_gradients(problem, theta, jnp.asarray(sites[:, 0]),
                                                   jnp.asarray(sites[:, 1]))))
        held = jnp.asarray(np.where(held, kinks.lo, np.nan))
    else:
        held = jnp.zeros((problem.n, 0))
    A = np.vstack(rows) if rows else np.zeros((0, flat.size))
    Hess = np.eye(flat.size) - np.asarray(_lagrangian_hessian(problem, theta, jnp.asarray(lam),
                                                              jnp.arange(lam.size), held))
    _, sv, Vt = np.linalg.svd(A, full_matrices=True) if A.size else (None, np.zeros(0),
                                                                      np.eye(flat.size))
    rank = int(np.sum(sv > 1e-10 * (sv.max() if sv.size else 1.0)))
    Zb = Vt[rank:].T
    if Zb.shape[1] == 0:
        curvature = math.inf
    else:
        ev, evec = np.linalg.eigh(Zb.T @ Hess @ Zb)
        curvature = float(ev[0])
        if curvature < -curvature_tol:
            out = verify(Zb @ evec[:, 0], f"negative curvature {curvature:.3g} of the "
                         f"Lagrangian on the critical subspace", curvature)
            if out is None:
                out = verify(-(Zb @ evec[:, 0]), f"negative curvature {curvature:.3g} of the "
                             f"Lagrangian on the critical subspace", curvature)
            if out is not None:
                return out
            reasons.append(f"negative curvature {curvature:.3g} on the critical subspace, but "
                           f"no step along it raised gamma_bar")
            return LocalOptimality("inconclusive", "; ".join(reasons), curvature, None,
                                   math.nan, math.nan, None)
    if curvature > curvature_tol and not any("gain" in r_ and "> 1" in r_ for r_ in reasons):
        return LocalOptimality("local maximum (second order)",
                               "; ".join(reasons + [f"the Lagrangian's Hessian is positive "
                                                    f"definite (>= {curvature:.3g}) on the "
                                                    f"critical subspace of {act.size} active "
                                                    f"constraints"]),
                               curvature, None, math.nan, math.nan, None)
    reasons.append(f"the smallest curvature on the critical subspace is {curvature:.3g}")
    return LocalOptimality("inconclusive", "; ".join(reasons), curvature, None, math.nan,
                           math.nan, None)
