"""Optimizer geometry: steepest descent in any l_p norm, margins in the matching norm, the
fast margin maximizers of linear models, and the sharpness of the loss.

Steepest descent w.r.t. a norm ||.|| steps along d(g) = argmax_{||d|| <= ||g||_*} <g, d>
(Gunasekar, Lee, Soudry & Srebro, ICML 2018, Section 3); for l_p with 1/p + 1/q = 1,

    d(g) = sign(g) |g|^{q-1} / ||g||_q^{q-2}      (||d||_p = ||g||_q, <g, d> = ||g||_q^2),

p = 2 is gradient descent, p = inf sign descent ||g||_1 sign(g), p = 1 greedy coordinate
descent ||g||_inf sign(g_i) e_i on the largest |g_i|. d is positively 1-homogeneous in g,
so d(grad L) = L d(grad log L) and the engine's log-domain step
``theta <- theta - exp(log eta + log L) d(grad log L)`` is exact at any L. On linear models
the direction converges to the ||.||-max-margin classifier (Gunasekar et al. 2018); on
homogeneous networks the smoothed margin l^{-1}(L) / ||theta||^L increases and limits are
generalized KKT points (Tsilivis, Vardi & Kempe, ICLR 2025).

The norm enters as ``inv_p = 1/p`` in [0, 1] (inv_p = 0 is p = inf), a traced number, so
one compiled program serves every p and a sweep vmaps over it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from .diagnostics import div_exp
from .problem import Problem

if TYPE_CHECKING:  # optax is imported where used: it costs ~0.2 s of every CLI start
    import optax


def check_p(p) -> float:
    """p as a float in [1, inf] (``"inf"`` and ``math.inf`` accepted); ValueError otherwise."""
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise ValueError(f"p must be a number in [1, inf], got {p!r}") from None
    if not p >= 1:  # also rejects NaN
        raise ValueError(f"p must be a number in [1, inf] (an l_p norm), got {p}")
    return p


def inv_p(p) -> float:
    """1/p (0 for p = inf), the form in which the norm lives in traced state."""
    p = check_p(p)
    return 0.0 if math.isinf(p) else 1.0 / p


def _flat_log_norm(x, ip):
    """log ||x||_p of a flat vector with 1/p = ``ip`` (p = inf at ip = 0), scale-free:
    log m + (1/p) log sum (|x|/m)^p with m = max |x|; -inf for x = 0."""
    a = jnp.abs(x)
    m = jnp.max(a)
    ip = jnp.asarray(ip, a.dtype)
    safe_m = jnp.where(m > 0, m, 1.0)
    r = a / safe_m
    # p = inf (ip = 0): (|x|/m)^inf is 1 at the maxima and 0 elsewhere (said explicitly:
    # pow(1, inf) is not 1 on every backend, and x / x need not be 1 where XLA divides
    # by multiplying with a reciprocal)
    at_max = (a == m).astype(r.dtype)
    s = jnp.sum(jnp.where(ip > 0, r ** (1.0 / jnp.where(ip > 0, ip, 1.0)), at_max))
    return jnp.where(m > 0, jnp.log(safe_m) + ip * jnp.log(s), -jnp.inf)


def log_norm(tree, ip) -> jax.Array:
    """log ||theta||_p of a parameter pytree taken as one vector (1/p = ``ip``)."""
    return _flat_log_norm(ravel_pytree(tree)[0], ip)


def steepest_direction(grad, ip):
    """d(g) = sign(g) |g|^{q-1} / ||g||_q^{q-2} for the l_p norm with 1/p = ``ip``, on a
    pytree taken as one vector (Gunasekar et al. 2018, Section 3): ||d||_p = ||g||_q and
    <g, d> = ||g||_q^2. ip = 1/2 returns g; ip = 0 (p = inf) ||g||_1 sign(g); ip = 1 (p = 1)
    ||g||_inf sign(g_i) e_i at the first largest |g_i| (greedy coordinate descent).
    Computed as ||g||_q sign(g) (|g| / ||g||_q)^{q-1}, so no power over- or underflows."""
    g, unravel = ravel_pytree(grad)
    ip = jnp.asarray(ip, g.dtype)
    iq = 1.0 - ip                      # 1/q
    q_minus_1 = ip / jnp.where(iq > 0, iq, 1.0)
    log_gq = _flat_log_norm(g, iq)
    ratio = jnp.exp(jnp.log(jnp.abs(g)) - log_gq)  # |g| / ||g||_q, never forming 1/||g||_q
    general = jnp.sign(g) * jnp.exp(log_gq) * ratio ** q_minus_1
    i = jnp.argmax(jnp.abs(g))
    coordinate = jnp.zeros_like(g).at[i].set(g[i])  # ||g||_inf sign(g_i) = g_i
    d = jnp.where(iq > 0, general, coordinate)
    return unravel(jnp.where(jnp.isfinite(log_gq), d, 0.0))


class LpMargins(NamedTuple):
    """Margins in the l_p norm (``lp_margins``)."""
    log_norm: jax.Array                # log ||theta||_p (the whole parameter vector)
    normalized: jax.Array              # gamma_bar_p = q_min / ||theta||_p^L
    smoothed: jax.Array                # gamma_tilde_p = l^{-1}(L) / ||theta||_p^L
    layer_normalized: jax.Array        # q_min / prod_i ||theta_i||_p^{k_i}
    layer_smoothed: jax.Array          # l^{-1}(L) / prod_i ||theta_i||_p^{k_i}


def lp_margins(problem: Problem, params, ip) -> LpMargins:
    """gamma_bar_p = q_min / ||theta||_p^L and its smoothed version l^{-1}(L) / ||theta||_p^L
    (the paper's eq. (2) and Definition A.3 with the l_p norm in place of l_2, as in
    Gunasekar et al. 2018 and Tsilivis et al. 2025), and the multi-homogeneous forms with
    prod_i ||theta_i||_p^{k_i} (eqs. (4), (5)). Computed in the log domain:
    exp(log q_min - L log ||theta||_p), never q_min * exp(-L log rho). Pure; jit and vmap."""
    q, q_loss, _ = problem.margin_terms(params)
    log_loss = problem.loss.log_loss(q_loss)
    q_min = jnp.min(q)
    inv = problem.loss.inverse(log_loss)
    log_all = log_norm(params, ip)
    log_layers = sum(k * log_norm(group, ip)
                     for k, group in zip(problem.model.layer_orders, params))
    L = problem.order
    return LpMargins(log_all, div_exp(q_min, L * log_all), div_exp(inv, L * log_all),
                     div_exp(q_min, log_layers), div_exp(inv, log_layers))


def lp_columns(problem: Problem, params, ip) -> dict:
    """The Trajectory columns of ``lp_margins`` (``margin_norm`` runs)."""
    m = lp_margins(problem, params, ip)
    return {"log_norm_p": m.log_norm, "normalized_margin_p": m.normalized,
            "smoothed_margin_p": m.smoothed, "layer_normalized_margin_p": m.layer_normalized,
            "layer_smoothed_margin_p": m.layer_smoothed}


lp_columns_jit = jax.jit(lp_columns)


# --- sharpness ----------------------------------------------------------------------------

def _lanczos_top(matvec, v0, iters: int):
    """Largest eigenvalue of a symmetric operator by ``iters`` Lanczos steps with full
    reorthogonalization (exact once iters >= the dimension)."""
    n = v0.shape[0]
    V = jnp.zeros((iters + 1, n), v0.dtype).at[0].set(v0 / jnp.linalg.norm(v0))
    alpha = jnp.zeros(iters, v0.dtype)
    beta = jnp.zeros(iters, v0.dtype)

    def body(j, carry):
        V, alpha, beta = carry
        w = matvec(V[j])
        a = jnp.vdot(V[j], w)
        # full reorthogonalization against every earlier vector (twice is enough)
        mask = (jnp.arange(iters + 1) <= j)[:, None]
        for _ in range(2):
            w = w - (V * mask).T @ ((V * mask) @ w)
        b = jnp.linalg.norm(w)
        ok = b > 1e-13 * jnp.maximum(jnp.abs(a), 1.0)
        V = V.at[j + 1].set(jnp.where(ok, w / jnp.where(ok, b, 1.0), 0.0))
        return V, alpha.at[j].set(a), beta.at[j].set(jnp.where(ok, b, 0.0))

    V, alpha, beta = jax.lax.fori_loop(0, iters, body, (V, alpha, beta))
    # a breakdown (beta = 0) decouples the tridiagonal matrix: its eigenvalues stay exact
    T = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    return jnp.linalg.eigvalsh(T)[-1]


class Sharpness(NamedTuple):
    log_loss: jax.Array
    log_curvature: jax.Array   # log lambda_max(hess log L + g g^T), g = grad log L
    sharpness: jax.Array       # lambda_max(hess L) = L * e^{log_curvature} (0 when it underflows)


def sharpness(problem: Problem, params, iters: int = 32, key=None) -> Sharpness:
    """The top eigenvalue of the Hessian of L (the edge-of-stability quantity: GD with a
    constant step eta is locally stable where it is < 2/eta; Cohen et al., ICLR 2021; Wu,
    Bartlett, Telgarsky & Yu, COLT 2024), by Lanczos on Hessian-vector products.

    In the log domain: hess L = L (hess log L + g g^T) with g = grad log L, so the
    operator is that of log L plus a rank-one term, and L multiplies only at the end;
    ``log_curvature`` stays finite at L = 10^-10^6. Exact (to rounding) once
    ``iters`` >= the number of parameters; ``iters`` is static, ``problem`` a pytree argument,
    so the jitted ``sharpness_jit`` compiles once per model and size."""
    flat, unravel = ravel_pytree(params)
    f = lambda z: problem.log_loss(unravel(z))
    log_loss, g = jax.value_and_grad(f)(flat)

    def matvec(v):
        return jax.jvp(jax.grad(f), (flat,), (v,))[1] + g * jnp.vdot(g, v)

    key = jax.random.PRNGKey(0) if key is None else key
    v0 = jax.random.normal(key, flat.shape, flat.dtype)
    top = _lanczos_top(matvec, v0, min(int(iters), flat.shape[0]))
    log_curv = jnp.log(jnp.maximum(top, 0.0))
    return Sharpness(log_loss, log_curv, jnp.exp(log_loss + log_curv))


sharpness_jit = jax.jit(sharpness, static_argnames="iters")


# --- fast margin maximizers of linear models, as optax transformations ---------------------

class DualAccelerationState(NamedTuple):
    momentum: optax.Updates   # g_{t-1}
    count: jax.Array          # t


def dual_acceleration() -> optax.GradientTransformation:
    """Ji, Srebro & Telgarsky (ICML 2021), Algorithm 1 with theta_t = 1, beta_t = t/(t+1):

        g_t = beta_t (g_{t-1} + grad log L(w_t)),   w_{t+1} = w_t - (g_t + grad log L(w_t)),

    where grad log L(w) = -Z^T q(w) and q(w) = softmax(-Z w) is their dual variable
    (exponential loss). Their main result: the l2 margin gap is O(log n log t / t^2).
    Feed it the gradient of log L (``schedules.optax_optimizer(..., objective="log_loss")``)."""
    import optax

    def init(params):
        return DualAccelerationState(jax.tree_util.tree_map(jnp.zeros_like, params),
                                     jnp.zeros((), jnp.int64))

    def update(grads, state, params=None):
        t = state.count.astype(jnp.float64)
        beta = t / (t + 1.0)
        g = jax.tree_util.tree_map(lambda m, x: beta * (m + x), state.momentum, grads)
        updates = jax.tree_util.tree_map(lambda m, x: -(m + x), g, grads)
        return updates, DualAccelerationState(g, state.count + 1)

    return optax.GradientTransformation(init, update)


class RescalingState(NamedTuple):
    count: jax.Array


def progressive_rescaling(lr: float = 0.5, radius0: float = 1.0, growth: float = 2.0,
                          period: int = 5) -> optax.GradientTransformation:
    """Progressive rescaling gradient descent (PRGD; Wang, Min & Wu, ICML 2024): projected
    normalized gradient steps on the sphere of radius R_k = radius0 growth^k, the radius
    raised every ``period`` steps:

        w_{t+1/2} = w_t - lr grad L(w_t) / ||grad L(w_t)||,
        w_{t+1} = R_k w_{t+1/2} / ||w_{t+1/2}||,

    so the norm grows exponentially while the angular step lr / R_k shrinks at the same
    rate; their main theorem: the margin gap decays exponentially in t (on data with a
    non-degenerate support, their assumption). Feed it grad log L
    (``objective="log_loss"``): the normalized direction is the same as grad L's."""
    for name, v in (("lr", lr), ("radius0", radius0)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v}")
    if not (math.isfinite(growth) and growth >= 1):
        raise ValueError(f"growth must be a finite number >= 1, got {growth}")
    if int(period) < 1:
        raise ValueError(f"period must be an integer >= 1, got {period}")
    log_r0, log_growth, period = math.log(radius0), math.log(growth), int(period)
    import optax

    def init(params):
        return RescalingState(jnp.zeros((), jnp.int64))

    def update(grads, state, params):
        g, _ = ravel_pytree(grads)
        w, unravel = ravel_pytree(params)
        log_R = log_r0 + log_growth * (state.count // period).astype(jnp.float64)
        g_norm = jnp.linalg.norm(g)
        half = w - lr * g / jnp.where(g_norm > 0, g_norm, 1.0)
        new = jnp.exp(log_R) * half / jnp.linalg.norm(half)
        return unravel(new - w), RescalingState(state.count + 1)

    return optax.GradientTransformation(init, update)
