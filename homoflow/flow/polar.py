"""The log-polar flow: its field, its state, and the exact rates it is checked against.

Phase 2 (log-polar time, DESIGN §3): with theta = rho theta_hat and tau = log rho, the exact
change of variables

    d theta_hat / d tau = g / <theta_hat, g> - theta_hat,      g = -grad log L(e^tau theta_hat)
    d log t / d tau     = exp(tau - log L - log <theta_hat, g> - log t)

(g may be any positive multiple of -grad L; -grad log L never underflows). As tau grows the
soft-min weights w = softmax(-u), u_n = f(q~_n) the per-point negative log losses, sharpen
and the system turns stiff: the Jacobian of the direction field is dominated by
-(e^tau / s) P G^T (diag w - w w^T) G, with G = d u / d theta the N x P Jacobian,
s = <theta_hat, g> and P = I - g theta_hat^T / s (what ``ros2`` solves with). Lemma 5.1 in
tau reads d log gamma_tilde / d tau >= L |d theta_hat / d tau|^2; ``_log_smoothed`` is the
left side's function, ``_speed_rate`` the JVP of |F|^2 that Lemma C.9's quadrature uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from ..problem import Problem
from .sliding import _apply_slopes, _project, _sliding_model, _start, _tangent

# status codes of the log-polar loop
OK, NONFINITE, NOT_RADIAL, STEP_UNDERFLOW, MAX_STEPS, NOT_SEPARATED, PHASE1_FAILED = range(7)
_STATUS = {OK: "completed", NONFINITE: "nonfinite", NOT_RADIAL: "nonpositive_radial_velocity",
           STEP_UNDERFLOW: "step_size_underflow", MAX_STEPS: "max_steps",
           NOT_SEPARATED: "not_separated", PHASE1_FAILED: "phase1_failed"}


class PolarPoint(NamedTuple):
    """The log-polar vector field and what the solver needs, at (theta_hat, tau)."""
    F: jax.Array          # d theta_hat / d tau
    G: jax.Array          # d u / d theta, (N, P)
    w: jax.Array          # softmax(-u)
    g: jax.Array          # -grad log L
    s: jax.Array          # <theta_hat, g>
    log_loss: jax.Array
    phi: jax.Array        # log dt/dtau
    dF2: Any = 0.0        # d |F|^2 / d tau along the flow (for the C.9 quadrature)



class PolarState(NamedTuple):
    x: jax.Array          # theta_hat, flattened
    tau: jax.Array
    log_t: jax.Array
    h: jax.Array          # next step size in tau
    point: PolarPoint     # the field at (x, tau)
    steps: jax.Array      # accepted steps
    rejected: jax.Array
    status: jax.Array
    # sum over accepted steps of ||x_new - x||^2 / h: the simulated path's own estimate of
    # int ||d theta_hat / d tau||^2 d tau = int (beta^-2 - 1) d tau (Lemma C.9), measured
    # from its chords rather than from the autodiff gradient at the saved states
    energy: jax.Array
    # sum over accepted steps of h (f0 + f1) / 2 - h^2 (f1' - f0') / 12, f = |F|^2: the same
    # integral by the end-corrected trapezoid rule on the field the flow follows
    # (|F|^2 = beta^-2 - 1, beta of that velocity), whose error the step controls
    speed_int: jax.Array = 0.0
    mask: Any = None      # (N, m) bool: the sliding set; None without kinks
    slide: Any = None     # Sliding for ``mask``



def _per_point_neg_log_loss(problem: Problem, unravel, v, sl=None):
    """u_n = f(q~_n) at flat parameters v: log L = LSE(-u). With a sliding state, the
    kinks' derivatives are ``sl.slope`` where it is set."""
    if sl is None:
        return problem.loss.f(problem.margin_terms(unravel(v))[1])
    out = _apply_slopes(problem, unravel(v), 0.0, sl)
    return problem.loss.f(problem.margin_terms_of(out)[1])



def _field(problem, unravel, x, tau, sl=None) -> PolarPoint:
    """The direction field at (x, tau) with the Jacobian G of the per-point log losses.
    With a sliding set, G's rows (hence g) are projected onto its tangent space: g is then
    the minimum-norm Clarke element (see ``_events``)."""
    v = jnp.exp(tau) * x
    u, pullback = jax.vjp(lambda z: _per_point_neg_log_loss(problem, unravel, z, sl), v)
    G = jax.vmap(pullback)(jnp.eye(u.shape[0], dtype=u.dtype))[0]
    if sl is not None:
        pj = _tangent(problem, unravel, sl, x)
        G = jax.vmap(_project, (None, 0))(pj, G)
    log_loss = logsumexp(-u)
    w = jax.nn.softmax(-u)
    g = w @ G
    s = x @ g
    F = g / s - x
    return PolarPoint(F, G, w, g, s, log_loss, tau - log_loss - jnp.log(s),
                      _speed_rate(problem, unravel, x, tau, F, sl))


def _speed_rate(problem, unravel, x, tau, F, sl=None):
    """d |F|^2 / d tau along the flow at (x, tau): a JVP of the field in (F, 1)."""
    _, dF = jax.jvp(lambda x, tau: _field_only(problem, unravel, x, tau, sl), (x, tau),
                    (F, jnp.ones_like(tau)))
    return 2.0 * F @ dF


def _field_only(problem, unravel, x, tau, sl=None) -> jax.Array:
    g = -jax.grad(lambda z: logsumexp(-_per_point_neg_log_loss(problem, unravel, z, sl)))(
        jnp.exp(tau) * x)
    if sl is not None:
        g = _project(_tangent(problem, unravel, sl, x), g)
    return g / (x @ g) - x



def _log_smoothed_of(problem: Problem, log_loss, tau):
    """log gamma_tilde = log l^{-1}(L) - L tau, from log L and tau = log rho."""
    return jnp.log(problem.loss.inverse(log_loss)) - problem.order * tau


def _log_smoothed(problem: Problem, unravel, x, tau, sl=None):
    """log gamma_tilde at theta = e^tau x (with the sliding state's kink derivatives)."""
    log_loss = logsumexp(-_per_point_neg_log_loss(problem, unravel, jnp.exp(tau) * x, sl))
    return _log_smoothed_of(problem, log_loss, tau)


def _polar_start(problem: Problem, unravel, flat_t0, log_t0, sliding: bool = False) -> PolarState:
    rho = jnp.linalg.norm(flat_t0)
    x0, tau0 = flat_t0 / rho, jnp.log(rho)
    mask = sl = None
    if sliding and _sliding_model(problem):
        mask, sl = _start(problem, unravel, x0)
    # strongly typed scalars: the state _advance returns must have the avals it was given,
    # or its second call compiles the solver again
    f64 = lambda v: jnp.asarray(v, jnp.float64)
    i64 = lambda v: jnp.asarray(v, jnp.int64)
    return PolarState(x0, tau0, f64(log_t0), f64(1e-3), _field(problem, unravel, x0, tau0, sl),
                      i64(0), i64(0), i64(OK), f64(0.0), f64(0.0), mask, sl)


# one compiled program per model shape (and sliding flag): eager, _polar_start's field
# (vmapped VJPs, a JVP) compiled dozens of small programs op by op
_polar_start_jit = jax.jit(_polar_start, static_argnames=("unravel", "sliding"))


@dataclass(frozen=True)
class _Unravel:
    """Flat vector -> params pytree, hashable and equal across calls for the same structure
    (``ravel_pytree`` returns a fresh closure each time), so that it can be a static jit
    argument and every flow on the same model reuses the compiled programs."""
    treedef: Any
    shapes: tuple

    def __call__(self, flat):
        leaves, i = [], 0
        for shape in self.shapes:
            n = math.prod(shape)
            leaves.append(flat[i:i + n].reshape(shape))
            i += n
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _ravel(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    flat = jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])
    return flat, _Unravel(treedef, tuple(tuple(leaf.shape) for leaf in leaves))


