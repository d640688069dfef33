"""Exponential-tailed losses l(q) = exp(-f(q)), evaluated in the log domain.

Appendix A: a loss is given by f (with f' > 0) and its inverse g = f^{-1} on
[b_f, inf). Everything here works with log L = LSE_n(-f(q_n)) and never forms L, so losses
like 10^-800 (and 10^-10^6) are exact. ``inverse(log_L)`` is l^{-1}(L) = g(log 1/L)
(Definition A.3, Remark A.4, Definition F.1); ``log_threshold`` is log l(b_f), the
separability threshold of (B4).

For C classes the loss is applied to q~_n = -LSE_{j != y_n}(-s_nj), s_nj = Phi_y - Phi_j
(Appendix F): cross-entropy is the logistic loss of q~_n, and the exponential loss becomes
sum_j exp(-s_nj).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

# Appendix K.2 switches to the asymptotic form once every margin exceeds Q = 30.
_LOGISTIC_SWITCH = 30.0


@dataclass(frozen=True, eq=False)
class Loss:
    """l(q) = exp(-f(q)); ``g`` inverts ``f`` (both elementwise, jittable)."""

    name: str
    f: Callable[[jax.Array], jax.Array]
    g: Callable[[jax.Array], jax.Array]
    b_f: float = 0.0
    # (B3.4)'s constants: g'(x) <= K g'(theta x), f'(y) <= K f'(theta y) for x > b_g,
    # theta in [1/2, 1); Lemma C.8's delta needs them (NaN: not known for this loss)
    K: float = math.nan
    b_g: float = math.nan

    def log_loss(self, q: jax.Array) -> jax.Array:
        """log L = LSE_n(-f(q_n)) for per-point (loss) margins q."""
        return logsumexp(-self.f(q))

    def inverse(self, log_L: jax.Array) -> jax.Array:
        """l^{-1}(L) = g(log 1/L), computed from log L without forming L."""
        return self.g(-log_L)

    def f_prime(self, q: jax.Array) -> jax.Array:
        return jax.vmap(jax.grad(self.f))(jnp.ravel(q)).reshape(jnp.shape(q))

    @property
    def log_threshold(self) -> float:
        """log l(b_f): gradient flow is past t0 once log L is below this (assumption (B4))."""
        with jax.ensure_compile_time_eval():  # a Python float, also inside jit
            return float(-self.f(jnp.asarray(self.b_f, jnp.float64)))


def _exp_f(q):
    return q


def exponential() -> Loss:
    """l(q) = e^{-q}: f = g = identity, b_f = 0, threshold l(b_f) = 1 (Remark A.1)."""
    return Loss("exponential", _exp_f, _exp_f, 0.0, K=1.0, b_g=0.0)


def logistic_f(q):
    """f(q) = -log log(1 + e^{-q}), exact for all q (Remark A.2, Appendix K.2).

    For q > 30, log(log1p(z)) with z = e^{-q} is -q + log1p(-z/2 + z^2/3) up to O(z^3).
    """
    big = q > _LOGISTIC_SWITCH
    q_big = jnp.where(big, q, _LOGISTIC_SWITCH + 1.0)
    q_small = jnp.where(big, 0.0, q)
    z = jnp.exp(-q_big)
    tail = -q_big + jnp.log1p(z * (-0.5 + z / 3.0))
    return -jnp.where(big, tail, jnp.log(jax.nn.softplus(-q_small)))


def logistic_g(x):
    """g(x) = -log(exp(e^{-x}) - 1), the inverse of ``logistic_f`` (Remark A.2)."""
    z = jnp.exp(-x)  # inf only when L > e^{e^709}, where g really is -inf in float64
    big = x > 30.0
    # for tiny z: expm1(z) = z (1 + z/2 + z^2/6), so g = x - log1p(z/2 + z^2/6)
    tail = x - jnp.log1p(z * (0.5 + z / 6.0))
    huge = z > 30.0  # expm1 overflows: -log(e^z - 1) = -z - log1p(-e^{-z})
    z_mid = jnp.where(big | huge, 1.0, z)
    mid = -jnp.log(jnp.expm1(z_mid))
    z_huge = jnp.where(huge, z, 31.0)
    return jnp.where(big, tail, jnp.where(huge, -z_huge - jnp.log1p(-jnp.exp(-z_huge)), mid))


# (B3.4) for the logistic loss: f' increases on [0, inf) from f'(0) = 1/(2 log 2) to 1, so
# f'(y)/f'(theta y) <= 2 log 2, and g' = 1/f'(g) decreases, so g'(x)/g'(theta x) <= 1;
# b_g = max(2 f(0), f(0)) = 2 f(0) (tested in test_losses).
_LOGISTIC_K = 2.0 * math.log(2.0)
_LOGISTIC_BG = -2.0 * math.log(math.log(2.0))


def logistic() -> Loss:
    """l(q) = log(1 + e^{-q}), b_f = 0, threshold log 2 (Remark A.2)."""
    return Loss("logistic", logistic_f, logistic_g, 0.0, K=_LOGISTIC_K, b_g=_LOGISTIC_BG)


def cross_entropy() -> Loss:
    """Softmax cross-entropy: the logistic loss of q~_n (Appendix F); threshold log 2."""
    return Loss("cross_entropy", logistic_f, logistic_g, 0.0, K=_LOGISTIC_K, b_g=_LOGISTIC_BG)


def _bisect_inverse(f, b_f: float, iters: int = 200):
    """g = f^{-1} by bracketing and bisection (f increasing on the real line by (B3.2))."""
    def g_scalar(x):
        x = jnp.asarray(x, jnp.float64)
        f_b = f(jnp.asarray(b_f, jnp.float64))
        up = x >= f_b

        def expand(width):
            return 2.0 * width

        def not_bracketed(width):
            edge = jnp.where(up, b_f + width, b_f - width)
            return jnp.where(up, f(edge) < x, f(edge) > x) & (width < 1e300)

        width = jax.lax.while_loop(not_bracketed, expand, jnp.asarray(1.0, jnp.float64))
        lo = jnp.where(up, b_f, b_f - width)
        hi = jnp.where(up, b_f + width, b_f)

        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            below = f(mid) < x
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo, hi = jax.lax.fori_loop(0, iters, halve, (lo, hi))
        return 0.5 * (lo + hi)

    return lambda x: jax.vmap(g_scalar)(jnp.ravel(x)).reshape(jnp.shape(x))


def exp_tailed(f: Callable, g: Callable | None = None, b_f: float = 0.0,
               name: str = "exp_tailed") -> Loss:
    """A general loss l(q) = exp(-f(q)) of Appendix A, assumption (B3).

    ``f`` must be jittable and increasing. ``g`` (its inverse) is computed by bisection to
    float64 precision when not given. ``b_f`` >= 0 is the point after which f'(q) q is
    non-decreasing; the separability threshold is l(b_f).
    """
    if b_f < 0:
        raise ValueError(f"b_f must be >= 0 (assumption (B3.3)), got {b_f}")
    return Loss(name, f, g if g is not None else _bisect_inverse(f, b_f), float(b_f))


LOSSES = {"exponential": exponential, "logistic": logistic, "cross_entropy": cross_entropy}


def get_loss(name: str) -> Loss:
    try:
        return LOSSES[name]()
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}") from None
