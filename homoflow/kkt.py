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
import scipy.optimize
from jax.flatten_util import ravel_pytree

from .diagnostics import diagnostics
from .problem import Problem


def _lawson_hanson(n: int, dtype, passive_solve, dual, tol, max_iter: int) -> jax.Array:
    """Lawson and Hanson's active-set NNLS (1974, ch. 23) with masks, jittable and vmappable.

    Columns enter the passive set P one at a time (largest dual w = A^T (b - A x) first,
    ``dual(x)``); each inner step solves the unconstrained least squares on P
    (``passive_solve(P)``, zero off P) and moves back to the feasible boundary when that
    solution leaves x >= 0."""
    def inner(carry):
        x, P, z, it = carry
        neg = P & (z <= 0)
        ratio = jnp.where(neg, x / jnp.where(neg, x - z, 1.0), jnp.inf)
        x = x + jnp.min(ratio) * (z - x)
        P = P & (x > tol)
        x = jnp.where(P, x, 0.0)
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
    g = A^T b (and ||b||, for the tolerance). The same Lawson-Hanson iteration, each passive
    solve a K x K system on G_PP instead of a least squares on the m x K matrix A_P, so the
    cost no longer depends on m (here m = P, the number of parameters). Conditioning is
    that of G (cond(A)^2): fine for multipliers; compute residuals from A, not from G.
    Each passive solve is a Cholesky factorization (ridge below), ~20x faster than the SVD
    that the dense version's minimum-norm ``lstsq`` needs."""
    n = G.shape[0]
    col = jnp.sqrt(jnp.maximum(jnp.diag(G), 0.0))
    tol = 10 * jnp.finfo(G.dtype).eps * n * jnp.max(col) * jnp.maximum(b_norm, 1.0) \
        if tol is None else tol
    # A ridge of 1e-13 max G_kk keeps the Cholesky factor finite when passive columns are
    # duplicate or zero (then it picks a near-minimum-norm solution); two refinement steps
    # remove its bias wherever G_PP is regular.
    ridge = 1e-13 * jnp.max(jnp.diag(G)) + jnp.finfo(G.dtype).tiny
    eye = jnp.eye(n, dtype=G.dtype)

    def passive_cholesky(P):
        G_P = jnp.where(P[:, None] & P[None, :], G, 0.0)
        factor = jax.scipy.linalg.cho_factor(G_P + jnp.where(P, ridge, 1.0) * eye)
        g_P = jnp.where(P, g, 0.0)
        z = jax.scipy.linalg.cho_solve(factor, g_P)
        for _ in range(2):
            z = z + jax.scipy.linalg.cho_solve(factor, g_P - G_P @ z)
        return jnp.where(P, z, 0.0)

    return _lawson_hanson(n, G.dtype, passive_cholesky, lambda x: g - G @ x, tol,
                          3 * n if max_iter is None else max_iter)


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
            "kkt_kink_tol": r.kink_tol, "kkt_n_kinks": r.n_kinks}


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
    is unknown."""
    L = problem.order
    d = diagnostics(problem, params)
    g0 = jnp.asarray(smoothed_margin_t0, jnp.float64)
    K = problem.loss.K
    C1 = jnp.sqrt(2.0) / g0 ** (1.0 / L)
    B_term = 1.0 if K == 1.0 else (jnp.asarray(B1) / g0) ** math.log2(K)
    C2 = 2 * math.e * problem.n * K ** 2 / (L * g0 ** (2.0 / L)) * B_term
    s = -d.log_loss
    ok = s >= problem.loss.b_g
    nan = jnp.asarray(jnp.nan)
    return LemmaC8(jnp.where(ok, C1 * jnp.sqrt(jnp.maximum(1.0 - d.beta, 0.0)), nan),
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

class Polished(NamedTuple):
    params: object            # a feasible point of (P) (q_min = 1), the polished KKT point
    normalized_margin: float  # its gamma_bar = q_min / rho^L
    start_margin: float       # gamma_bar of the direction it started from
    distance: float           # angle (radians) between the start direction and the polished one
    eps: float                # its KKT residual (Definition C.6) ...
    delta: float
    multipliers: np.ndarray   # ... and multipliers, on the constraints ``index``
    index: np.ndarray
    n_active: int             # constraints with multiplier > 1e-8 max
    success: bool
    message: str


def polish_kkt(problem: Problem, params, *, slack: float = 1.0, max_iter: int = 100,
               rtol: float = 1e-13) -> Polished:
    """Solve (P) locally from a late direction, to find the KKT point the run is heading to.

    Sequential linearization (an SQP whose QP keeps the objective's exact Hessian I and
    drops the constraints' curvature): from a feasible theta (q_min = 1; first
    theta~ = theta / q_min^{1/L}), solve the least-distance program
    min ||theta'|| s.t. c_k(theta) + <h_k, theta' - theta> >= 1 over the constraints with
    c_k <= (1 + ``slack``) q_min (``least_distance``, i.e. SciPy's NNLS), then move toward
    theta' with a backtracking line search that accepts only a larger normalized margin
    q_min / rho^L after rescaling to q_min = 1 — so every iterate is feasible and the
    margin never decreases. Stops when a full step gains less than ``rtol`` (relative) or
    after ``max_iter`` steps. A fixed point is a KKT point of (P) (the subproblem's
    multipliers are then (P)'s); its residual is reported from ``kkt_residual``. Gradients
    are the autodiff selection, so at ReLU kinks read ``eps`` before trusting the point."""
    L = problem.order
    c0 = np.asarray(constraints(problem, params))
    if not c0.min() > 0:
        raise ValueError(f"polish_kkt needs a separating direction (q_min > 0); got q_min = "
                         f"{c0.min():.6g}")
    flat0, unravel = ravel_pytree(params)

    def feasible(z):  # rescaled to q_min = 1: (point, its normalized margin, its constraints)
        c = np.asarray(_constraints_at(problem, unravel(jnp.asarray(z))))
        q = float(c.min())
        if not q > 0:
            return None, -np.inf, None
        return z * q ** (-1.0 / L), float(np.linalg.norm(z * q ** (-1.0 / L))) ** (-L), c / q

    x, margin, c = feasible(np.asarray(flat0, np.float64))
    start_margin, converged, it = margin, False, 0
    message = f"stopped after max_iter = {max_iter} steps"
    for it in range(1, max_iter + 1):
        S = np.nonzero(c <= (1.0 + slack) * c.min())[0]
        J = np.asarray(_grads_at(problem, unravel(jnp.asarray(x)), jnp.asarray(S)))
        target, _ = least_distance(J, 1.0 - c[S] + J @ x)
        alpha, gained = 1.0, False
        while alpha > 1e-10:
            z, m, c_z = feasible(x + alpha * (target - x))
            if m > margin:
                gained = True
                break
            alpha *= 0.5
        if not gained:
            converged = True
            message = "converged: no step along the linearized solution raises the margin"
            break
        x, c, margin, old = z, c_z, m, margin
        if m - old <= rtol * m and alpha == 1.0:
            converged = True
            message = f"converged: a full step gained {m / old - 1:.2g} (relative) < rtol"
            break
    theta = unravel(jnp.asarray(x))
    r = kkt_residual(problem, theta)
    lam = np.asarray(r.lam)
    return Polished(theta, margin, start_margin, angle(np.asarray(flat0), x), float(r.eps),
                    float(r.delta), lam, np.asarray(r.index),
                    int(np.sum(lam > 1e-8 * np.nanmax(lam))), converged, f"{message} ({it} steps)")


# --- convergence report -------------------------------------------------------------------

_REPORT_COLUMNS = ("log_T", "log_loss", "one_minus_beta", "kkt_eps", "kkt_delta",
                   "normalized_margin", "margin_gap", "path_length")


def convergence_report(problem: Problem, trajectory, polished: Polished | None = None,
                       decades: int = 4, polish: bool = True) -> dict:
    """How far a run has converged: for the saved points after t0 in the last ``decades``
    decades of log T (T = t for flow, sum eta for descent), eps and delta (the
    Trajectory's ``kkt_eps``/``kkt_delta``, or computed from its snapshots), 1 - beta, the
    normalized margin and its gap to the polished KKT point (``polish_kkt`` from the saved
    direction of largest normalized margin in the last decade, unless ``polished`` is
    given or ``polish=False``), and the path length of
    theta^ (sum of ||theta^_i - theta^_{i-1}|| between saved points). ``verdict`` compares
    the path length of theta^ over the last decade of log T with the one before: a
    direction converging like 1/log t (the linear model) moves ~10x less per decade, and
    the verdict says "converging" only when the path shrank by at least 2x; one that keeps
    moving (the Mexican hat of Appendix I: 0.13 rad per decade, ratio 0.95) is reported
    as not converged."""
    cols = trajectory.columns
    after = np.nonzero(cols["separated"].astype(bool) & np.isfinite(cols["log_T"])
                       & (cols["log_T"] > 0))[0]
    if after.size == 0:
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
        r = jax.jit(jax.vmap(kkt_residual, (None, 0)))(problem, batch)
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
        polished = polish_kkt(problem, jax.tree_util.tree_map(lambda a: a[best], snaps))
    path = np.full(after.size, np.nan)
    if dirs is not None:
        path[1:] = np.linalg.norm(np.diff(dirs, axis=0), axis=1)
    keep = log10_log_T >= top - decades
    rows = {
        "log_T": cols["log_T"][after][keep],
        "log_loss": cols["log_loss"][after][keep],
        "one_minus_beta": 1.0 - cols["beta"][after][keep],
        "kkt_eps": eps[keep], "kkt_delta": delta[keep],
        "normalized_margin": gamma[keep],
        "margin_gap": (polished.normalized_margin - gamma[keep]) if polished else
        np.full(keep.sum(), np.nan),
        "path_length": path[keep],
    }
    last = np.nansum(path[log10_log_T > top - 1])
    before = np.nansum(path[(log10_log_T > top - 2) & (log10_log_T <= top - 1)])
    if dirs is None:
        verdict = "unknown: the trajectory has no snapshots, so theta^'s path is not known"
    elif before == 0:
        verdict = (f"unknown: no saved motion of theta^ in the decade before the last "
                   f"(last decade: {last:.3g}); run longer or save more points")
    elif last < 0.5 * before:
        verdict = (f"converging: theta^ moved {last:.3g} over the last decade of log T, "
                   f"{last / before:.2g} times the {before:.3g} of the decade before")
    else:
        verdict = (f"not converged: theta^ moved {last:.3g} over the last decade of log T, "
                   f"{last / before:.2g} times the {before:.3g} of the decade before (a "
                   f"converging direction's path shrinks geometrically per decade); no limit "
                   f"direction is claimed")
    return {"rows": rows, "polished": polished, "path_last_decade": float(last),
            "path_previous_decade": float(before), "verdict": verdict,
            "max_normalized_margin_seen": float(np.nanmax(gamma))}


def format_report(report: dict, max_rows: int = 12) -> str:
    """The report as a markdown table (at most ``max_rows`` rows, evenly thinned)."""
    rows = report["rows"]
    n = len(rows["log_T"])
    pick = np.unique(np.linspace(0, n - 1, min(n, max_rows)).round().astype(int))
    head = "| " + " | ".join(_REPORT_COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(_REPORT_COLUMNS)]
    for i in pick:
        lines.append("| " + " | ".join(f"{rows[k][i]:.4g}" for k in _REPORT_COLUMNS) + " |")
    p = report["polished"]
    if p is not None:
        lines.append("")
        lines.append(f"polished KKT point: normalized margin {p.normalized_margin:.10g} "
                     f"(max seen on the trajectory {report['max_normalized_margin_seen']:.10g}), "
                     f"eps {p.eps:.3g}, delta {p.delta:.3g}, {p.n_active} active constraints, "
                     f"angle to its start {p.distance:.3g} rad; polish: {p.message}")
    lines.append(f"direction: {report['verdict']}")
    return "\n".join(lines)


def plot_report(report: dict, path) -> None:
    """eps, delta, 1 - beta, the margin gap and the path length against log T (log-log)."""
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    rows = report["rows"]
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for k, label in [("kkt_eps", "ε (KKT)"), ("kkt_delta", "δ (KKT)"),
                     ("one_minus_beta", "1 − β"), ("margin_gap", "γ̄* − γ̄"),
                     ("path_length", "‖Δθ̂‖ per saved step")]:
        v = np.asarray(rows[k], float)
        ok = np.isfinite(v) & (v > 0)
        if ok.any():
            ax.loglog(rows["log_T"][ok], v[ok], ".-", label=label)
    ax.set_xlabel("log T")
    ax.set_title("convergence to a KKT point of (P)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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
