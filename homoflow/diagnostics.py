"""Every quantity the theorems speak of, from one pure, jittable, vmappable function.

``diagnostics(problem, params, log_loss_t0)`` is the only place these numbers are
computed; engines, sweeps and plots call it, so a column means the same thing everywhere.
Gradients are taken of log L, never of L, so they stay finite at L = 10^-10^6.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .problem import Problem

# grid of the numerical part of Appendix E.2's integral I (see ``log_phi``)
_PHI_GRID = 4096


class Diagnostics(NamedTuple):
    log_loss: jax.Array           # log L (natural log)
    margins: jax.Array            # q_n, shape (N,)
    q_min: jax.Array
    rho: jax.Array                # ||theta||_2
    log_rho: jax.Array
    rho_layers: jax.Array         # ||w_i||_2 per parameter group, shape (m,)
    normalized_margin: jax.Array  # gamma_bar = q_min / rho^L, eq. (2)
    layer_normalized_margin: jax.Array    # q_min / prod rho_i^{k_i}, eq. (4)
    smoothed_margin: jax.Array    # gamma_tilde = l^{-1}(L) / rho^L, Definition A.3 / F.1
    layer_smoothed_margin: jax.Array      # l^{-1}(L) / prod rho_i^{k_i}, eq. (5)
    descent_margin: jax.Array     # gamma_hat of Appendix E.2 (exp. loss, L <= L(t0); else NaN)
    beta: jax.Array               # cos(theta, -grad L)
    nu_over_loss: jax.Array       # nu / L with nu of Theorem B.4 (Appendix F for C classes)
    n_support: jax.Array          # #{n : q_n < q_min + log 10^k}
    separated: jax.Array          # log L < log l(b_f): the margin claims apply (Lemma 5.1)
    grad_norm_log_loss: jax.Array  # ||grad log L||

    def columns(self) -> dict:
        """The Trajectory columns among these fields, as numpy arrays (all but the
        gradient norm, which the engines use internally)."""
        return {k: np.asarray(v) for k, v in self._asdict().items()
                if k != "grad_norm_log_loss"}


def is_separated(problem: Problem, log_loss):
    """log L < log l(b_f), the separability threshold past which q_min > 0 is guaranteed and
    every margin claim of the paper applies: the one definition engines and sweeps use."""
    return log_loss < problem.loss.log_threshold


def div_exp(x, log_den):
    """x / e^{log_den} as sign(x) exp(log|x| - log_den): never forms e^{log_den}, so the
    ratio is exact where the denominator alone would overflow (rho^L > e^709) or the factor
    e^{-log_den} would flush to zero (q_min exp(-L log rho) = 0 once rho^L > e^745)."""
    return jnp.sign(x) * jnp.exp(jnp.log(jnp.abs(x)) - log_den)


def _scaled_norm(xs) -> jax.Array:
    """sqrt(sum x^2) over arrays ``xs``, scaled by 2^-e with 2^e ~ max |x| (exact: ldexp
    only shifts exponents), so it is finite for every finite input; the plain sum of
    squares overflows once an entry exceeds ~1e154. (Dividing by max |x| instead fails
    under jit: XLA multiplies by 1/max |x|, subnormal and flushed to 0 beyond 4.5e307.)"""
    m = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in xs]))
    e = jnp.frexp(m)[1]
    return jnp.ldexp(jnp.sqrt(sum(jnp.sum(jnp.ldexp(x, -e) ** 2) for x in xs)), e)


def _group_norms(params) -> jax.Array:
    return jnp.stack([_scaled_norm(jax.tree_util.tree_leaves(g)) for g in params])


def tree_dot(a, b) -> jax.Array:
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                               jax.tree_util.tree_leaves(b)))


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(tree_dot(tree, tree))


# ---------------------------------------------------------------------------------------
# Appendix E: the descent margin gamma_hat and the step-size bound H(L), in s = log(1/L)


def log_kappa(s, L: float):
    """log kappa(x) at x = e^{-s} (Appendix E.1)."""
    a = 2.0 - 2.0 / L
    smooth = -s + a * jnp.log(s)
    if L <= 1:
        return smooth
    log_kappa_max = a * (math.log(a) - 1.0)
    return jnp.where(s >= a, smooth, log_kappa_max)


def _log_r(s, s0, L: float):
    """h(s) = log r(e^{-s}), r(w) = (1 + 2(1 + lambda(w)) mu(w)) / (w log(1/w))."""
    mu = s0 / (2.0 * s)
    lam = jnp.exp(-math.log(L) - s + (1.0 - 2.0 / L) * jnp.log(s) - log_kappa(s, L))
    return s + jnp.log1p(2.0 * (1.0 + lam) * mu) - jnp.log(s)


def _tail(u, s0, L: float):
    """Eq. (19): I(u) = -s0 (1/u + 1/(2 L u^2)), exact where sup_w r(w) = r(e^{-u})."""
    return -s0 * (1.0 / u + 1.0 / (2.0 * L * u * u))


def log_phi(s, s0, L: float):
    """phi(L) = log log(1/L) + I(L) of Appendix E.2, as a function of s = log(1/L) >= s0.

    In s, I = int_s^inf (1/sigma - e^{-sigma} R(sigma)) dsigma with R the running maximum of
    r from s0 on. Beyond S (where r is increasing and above all its earlier values) the
    integral has the closed form (19); on [s0, S] it is a trapezoid sum on a geometric grid
    of 4096 points, accumulated downward from S, so I is continuous and increasing in s
    (monotone gamma_hat is preserved exactly). Relative error of I on [s0, S]: ~1e-6.
    Returns NaN for s < s0 (gamma_hat is defined only after t0).
    """
    s0 = jnp.asarray(s0, jnp.float64)
    S = jnp.maximum(s0, 2.0) + 60.0 + 3.0 * jnp.maximum(0.0, -jnp.log(s0))
    grid = s0 * jnp.exp(jnp.linspace(0.0, 1.0, _PHI_GRID) * jnp.log(S / s0))
    running = jax.lax.cummax(_log_r(grid, s0, L))
    integrand = 1.0 / grid - jnp.exp(running - grid)
    pieces = 0.5 * (integrand[1:] + integrand[:-1]) * jnp.diff(grid)
    above = jnp.concatenate([jnp.cumsum(pieces[::-1])[::-1], jnp.zeros(1)])  # int_{grid_i}^S
    inner = _tail(S, s0, L) + jnp.interp(s, grid, above)
    I = jnp.where(s > S, _tail(jnp.maximum(s, 1.0), s0, L), inner)
    return jnp.where(s >= s0, jnp.log(s) + I, jnp.nan)


def log_h_bound(s, s0, log_c_eta, L: float):
    """log H(L) = log mu(L) - log C_eta - log kappa(L) (Appendix E.1), with s = log(1/L)."""
    return jnp.log(s0 / (2.0 * s)) - log_c_eta - log_kappa(s, L)


# ---------------------------------------------------------------------------------------


def diagnostics(problem: Problem, params, log_loss_t0=jnp.nan,
                support_decades: float = 3.0, gradient: bool = True) -> Diagnostics:
    """All margin quantities at ``params`` (pure; jit and vmap over snapshots freely).

    ``log_loss_t0`` is log L(t0), the loss when the run first crossed the separability
    threshold; gamma_hat needs it (Appendix E.2) and is NaN while it is NaN.
    ``gradient=False`` (static) skips the full-batch backward pass: ``beta`` and
    ``grad_norm_log_loss`` are NaN, every other field is unchanged. On a CNN the backward
    pass costs more than the forward one (the paper-CNN records: ~1.4 s of gradient per
    record against ~0.2 s of margins, 4 000 MNIST images).
    """
    L = problem.order
    loss = problem.loss

    def log_loss_and_terms(p):
        q, q_loss, s_bar = problem.margin_terms(p)
        return loss.log_loss(q_loss), (q, q_loss, s_bar)

    if gradient:
        (log_loss, (q, q_loss, s_bar)), grad = jax.value_and_grad(
            log_loss_and_terms, has_aux=True)(params)
    else:
        log_loss, (q, q_loss, s_bar) = log_loss_and_terms(params)
    rho_layers = _group_norms(params)
    rho = _scaled_norm([rho_layers])
    log_rho = jnp.log(rho)
    log_rho_L = L * log_rho
    log_layer = jnp.sum(jnp.asarray(problem.model.layer_orders) * jnp.log(rho_layers))
    q_min = jnp.min(q)
    inv = loss.inverse(log_loss)

    if gradient:
        g_norm = global_norm(grad)
        safe_norm = jnp.where(g_norm > 0, g_norm, 1.0)  # beta = 0 at a stationary point
        beta = jnp.where(g_norm > 0, -tree_dot(params, grad) / rho / safe_norm, 0.0)
    else:
        g_norm = beta = jnp.full_like(log_loss, jnp.nan)

    # nu = sum_n e^{-f(q~_n)} f'(q~_n) s_bar_n (Theorem B.4; Appendix F), divided by L
    nu_over_loss = jnp.sum(jnp.exp(-loss.f(q_loss) - log_loss) * loss.f_prime(q_loss) * s_bar)

    if loss.name == "exponential":
        s = -log_loss
        descent = jnp.exp(log_phi(s, -jnp.asarray(log_loss_t0), L) - log_rho_L)  # log domain
    else:
        descent = jnp.full_like(log_loss, jnp.nan)

    return Diagnostics(
        log_loss=log_loss,
        margins=q,
        q_min=q_min,
        rho=rho,
        log_rho=log_rho,
        rho_layers=rho_layers,
        normalized_margin=div_exp(q_min, log_rho_L),
        layer_normalized_margin=div_exp(q_min, log_layer),
        smoothed_margin=div_exp(inv, log_rho_L),
        layer_smoothed_margin=div_exp(inv, log_layer),
        descent_margin=descent,
        beta=beta,
        nu_over_loss=nu_over_loss,
        n_support=jnp.sum(q < q_min + support_decades * math.log(10.0)),
        separated=is_separated(problem, log_loss),
        grad_norm_log_loss=g_norm,
    )
