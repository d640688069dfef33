"""Gradient flow d theta/dt = -grad L(theta), in original time and then in log-polar time.

Phase 1 (original time): an adaptive diffrax solve (Tsit5 + PID) of the flow, stopped by a
``diffrax.Event`` at t0, the first time L falls below the separability threshold l(b_f).

Phase 2 (log-polar time, DESIGN §3): with theta = rho theta_hat and tau = log rho, the exact
change of variables

    d theta_hat / d tau = g / <theta_hat, g> - theta_hat,      g = -grad log L(e^tau theta_hat)
    d log t / d tau     = exp(tau - log L - log <theta_hat, g> - log t)

(g may be any positive multiple of -grad L; -grad log L never underflows). As tau grows the
soft-min weights w = softmax(-u), u_n = f(q~_n) the per-point negative log losses, sharpen
and the system turns stiff: the Jacobian of the direction field is dominated by
-(e^tau / s) P G^T (diag w - w w^T) G, with G = d u / d theta the N x P Jacobian,
s = <theta_hat, g> and P = I - g theta_hat^T / s. homoflow integrates phase 2 with ROS2, a
two-stage, second-order Rosenbrock W-method (Verwer et al. 1999) with an embedded
first-order error estimate, whose W = I - gamma h J uses exactly that rank-N part of the
Jacobian: every solve is a Woodbury solve with an N x N LU factorization, O(P N^2) per step
instead of O(P^3). The direction is projected back onto the unit sphere after each step;
log t is accumulated by exact integration of exp(phi) for phi linear on each step.

Clarke selection. Phase 1 and models without a declared kink use autodiff's element (see
``homoflow.models``): ReLU'(0) = 0, leaky ReLU'(0) = 1 (``where(x >= 0, ...)``), max-pool's
cotangent goes to one maximal element of each window. With that fixed selection a flow that
should slide along an activation boundary z_nj = x_n . w_j = 0 chatters across it, and
every step size pays for it. For networks whose first layer declares its kinks
(``Model.kink``: bias-free (leaky) ReLU MLPs) phase 2 follows the *minimum-norm* element of
the Clarke (chain-rule) set instead, which is the velocity of the gradient flow's
solutions (for a conservative field D, d/dt L = <v, theta'> for every v in D forces
theta' = -the minimum-norm element). It is found per neuron as a box QP whose active
constraints are the sliding set S: the flow moves on {z_S = 0} with the field projected
onto its tangent space, kinks enter S when reached with a feasible multiplier and leave
when it hits a bound (``_events``); steps end where a kink is reached. The ``flow_beta``
column is beta of that velocity, the one Lemma C.9 speaks of; ``beta`` stays autodiff's.

Error control (``_ros2_step``). Besides ROS2's embedded estimate, a step's error counts every
move onto a captured kink, a kink held in S past the point where its multiplier left its
bounds, a kink crossed inside the step (the field jumps there), and the disagreement
between two values of Lemma C.9's integral int |F|^2 d tau on the step: the end-corrected
trapezoid (with d|F|^2/d tau from a JVP) and the chord |Delta theta_hat|^2 / h. C.9's slack is
L (r - 1)(1 + |F|^2), r - 1 = (soft-min entropy) / log(1/L) for the exponential loss, so it
falls to ~1e-3 of the integral as the loss falls and the integral must be solved for, not
sampled. Past e^{L tau} = ``stiff_ref`` the tolerances shrink like e^{-L tau}.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jax.flatten_util import ravel_pytree
from jax.scipy.special import logsumexp
from tqdm.auto import tqdm

from .descent import RunStopped, descent
from .diagnostics import diagnostics
from .kkt import kkt_columns
from .problem import Problem
from .schedules import constant
from .trajectory import Trajectory, package_versions

_ROS2_GAMMA = 1.0 + 1.0 / math.sqrt(2.0)
_CHUNK = 2000  # phase-2 steps between checks of flow's wall budget

# status codes of the log-polar loop
OK, NONFINITE, NOT_RADIAL, STEP_UNDERFLOW, MAX_STEPS, NOT_SEPARATED = range(6)
_STATUS = {OK: "completed", NONFINITE: "nonfinite", NOT_RADIAL: "nonpositive_radial_velocity",
           STEP_UNDERFLOW: "step_size_underflow", MAX_STEPS: "max_steps"}


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


class Sliding(NamedTuple):
    """The sliding set S (kinks z_nj = x_n . w_j = 0 the flow moves along), per neuron j:
    R_j, the orthogonal projector onto span{x_n : (n, j) in S}, and M_j^+, the
    pseudo-inverse of M_j = sum_{(n, j) in S} x_n x_n^T; and ``slope`` (N, m), the
    activation derivative used at each kink: lo on S, the bound a kink left S by while it is
    still within rounding of z = 0 (where autodiff would pick a side by the sign of a
    rounding error), NaN (autodiff's) elsewhere."""
    R: jax.Array      # (m, d, d)
    Minv: jax.Array   # (m, d, d)
    slope: jax.Array  # (N, m)


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


def _apply_first(problem: Problem, params, offset, slope):
    """The model's outputs with the first layer's kinks given ``slope`` (NaN: autodiff's)
    and ``offset`` (``models.Kinks``); deeper kinks keep autodiff's derivative."""
    kinks = problem.model.kinks
    rest = (jnp.nan,) * (kinks.layers - 1)
    return kinks.apply(params, problem.X, (slope,) + rest, (offset,) + (0.0,) * len(rest))


def _sliding_model(problem: Problem) -> bool:
    """Whether phase 2 can slide on the model's kinks: a bias-free dense first layer."""
    kinks = problem.model.kinks
    return kinks is not None and kinks.first_dense


def _per_point_neg_log_loss(problem: Problem, unravel, v, sl=None):
    """u_n = f(q~_n) at flat parameters v: log L = LSE(-u). With a sliding state, the
    kinks' derivatives are ``sl.slope`` where it is set."""
    if sl is None:
        return problem.loss.f(problem.margin_terms(unravel(v))[1])
    out = _apply_first(problem, unravel(v), 0.0, sl.slope)
    return problem.loss.f(problem.margin_terms_of(out)[1])


def _first_layer(x, d, m):
    """The first layer's weight W (d, m): the first leaf of the flattened parameters."""
    return x[:d * m].reshape(d, m)


def _kink_z(problem: Problem, x):
    """z = X W (N, m): first-layer pre-activations at flat parameters x (linear in x)."""
    Xf = problem.X.reshape(problem.n, -1)
    return Xf @ _first_layer(x, Xf.shape[1], problem.model.config["widths"][1])


def _sliding(problem: Problem, mask, slope) -> Sliding:
    """Per-neuron projectors for the sliding set ``mask`` (N, m): O(N m d^2 + m d^3)."""
    Xf = problem.X.reshape(problem.n, -1)
    M = jnp.einsum("nj,na,nb->jab", mask.astype(Xf.dtype), Xf, Xf)
    lam, V = jnp.linalg.eigh(M)
    keep = lam > 1e-10 * jnp.max(jnp.sum(Xf * Xf, axis=1))
    R = jnp.einsum("jak,jk,jbk->jab", V, keep.astype(Xf.dtype), V)
    Minv = jnp.einsum("jak,jk,jbk->jab", V, jnp.where(keep, 1.0 / jnp.where(keep, lam, 1.0),
                                                       0.0), V)
    return Sliding(R, Minv, slope)


def _project(sl: Sliding, v):
    """Orthogonal projection of flat v onto the tangent space {z_S(v) = 0} of the sliding
    set (only the first layer's columns w_j move)."""
    m, d = sl.R.shape[0], sl.R.shape[1]
    W = _first_layer(v, d, m)
    W = W - jnp.einsum("jab,bj->aj", sl.R, W)
    return jnp.concatenate([W.ravel(), v[d * m:]])


def _field(problem, unravel, x, tau, sl=None) -> PolarPoint:
    """The direction field at (x, tau) with the Jacobian G of the per-point log losses.
    With a sliding set, G's rows (hence g) are projected onto its tangent space: g is then
    the minimum-norm Clarke element (see ``_events``)."""
    v = jnp.exp(tau) * x
    u, pullback = jax.vjp(lambda z: _per_point_neg_log_loss(problem, unravel, z, sl), v)
    G = jax.vmap(pullback)(jnp.eye(u.shape[0], dtype=u.dtype))[0]
    if sl is not None:
        G = jax.vmap(_project, (None, 0))(sl, G)
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
        g = _project(sl, g)
    return g / (x @ g) - x


def _events(problem: Problem, unravel, mask, sl: Sliding, x, tau, cand, near, hold_unit):
    """Update the sliding set at x (DESIGN §3, "event handling"): the attracting kinks of
    ``cand`` that are ``near`` enter, every kink of S whose multiplier is infeasible
    leaves, and x is projected onto the new set.

    The flow's velocity is the minimum-norm element of the chain-rule (Clarke) set
    {g_lo + sum_nj (sigma_nj - lo) e_nj x_n (in w_j) : sigma_nj in [lo, hi]} (g_lo: the
    gradient with derivative lo at the kinks; e_nj = d(-log L)/d(output of kink nj)); for
    each neuron j this is a box QP. Its solution with sigma inside [lo, hi] on the sliding
    set S is the projection of g_lo's w_j onto the complement of span{x_n : (n, j) in S}
    (multipliers mu = (sigma - lo) e, mu_nj = -x_n^T M_j^+ g_j), so the flow slides along
    z_S = 0: an attracting kink, both sides push towards it. A kink leaves S when its
    multiplier leaves [lo, hi]: the flow then moves to the side whose derivative is that
    bound. z is linear in theta, so the projection onto z_S = 0 is exact; x is then
    renormalized.

    A member leaves only once its sigma is out of bounds by more than
    min(1e-2, hold_unit / |e|) (hysteresis; ``hold_unit`` / |e| is the excess at which
    holding it through a step of h_max would cost 0.1 error units): a kink whose multiplier
    grazes its bound would otherwise be released and recaptured step after step.

    Returns (mask, sliding, x projected and renormalized, the feasible candidates, e, and
    by how much each member of ``mask`` has its sigma = mu / e outside [0, hi - lo]).
    """
    kink = problem.model.kinks
    mask_t = mask | cand
    slope_t = jnp.where(mask_t, kink.lo, sl.slope)
    sl_t = jax.lax.cond(jnp.any(cand), lambda: _sliding(problem, mask_t, slope_t),
                        lambda: sl._replace(slope=slope_t))

    def nll(v, o):
        out = _apply_first(problem, unravel(v), o, slope_t)
        return -problem.loss.log_loss(problem.margin_terms_of(out)[1])

    # g_lo uses the derivative lo at every kink of S (the sign of z = +-1e-17 after a
    # projection is rounding, so autodiff's own choice would be either side's)
    v = jnp.exp(tau) * x
    g_lo, e = jax.grad(nll, argnums=(0, 1))(v, jnp.zeros(mask.shape, x.dtype))
    m, d = sl_t.R.shape[0], sl_t.R.shape[1]
    Xf = problem.X.reshape(problem.n, -1)
    mu = -(Xf @ jnp.einsum("jab,bj->aj", sl_t.Minv, _first_layer(g_lo, d, m)))
    bound = (kink.hi - kink.lo) * e
    # a candidate can only attract if e (hi - lo) < 0 (else both sides push away from it
    # or through it): with a feasible multiplier it would be an unstable sliding mode
    ok = ((mu >= jnp.minimum(0.0, bound)) & (mu <= jnp.maximum(0.0, bound))
          & (mask | (bound < 0)))
    # of S, only the kink of each neuron whose multiplier is farthest outside its bounds
    # leaves per update: the multipliers of a neuron's kinks are coupled (releasing one
    # moves the others), so releasing every violator at once releases kinks that only
    # violated because of another, which then cross back: churn
    sigma = mu / jnp.where(e == 0, 1.0, e)
    excess = jnp.where(e == 0, jnp.inf,
                       jnp.maximum(sigma - (kink.hi - kink.lo), -sigma))
    over = jnp.where(mask, jnp.maximum(excess, 0.0), 0.0)   # how far S's members are out
    hold = jnp.minimum(1e-2, hold_unit / jnp.maximum(jnp.abs(e), 1e-300))
    excess = jnp.where(mask & ~ok & (excess > hold), excess, -1.0)
    released = (excess >= 0) & (excess == jnp.max(excess, axis=0, keepdims=True))
    mask_n = mask_t & (ok | (mask & ~released)) & (mask | near)
    # a kink leaving S keeps the bound its multiplier passed while it is at z = 0
    above = (e != 0) & (sigma > kink.hi - kink.lo)
    slope_n = jnp.where(mask_n, kink.lo,
                        jnp.where(released, jnp.where(above, kink.hi, kink.lo),
                                  jnp.where(cand, sl.slope, slope_t)))
    sl_n = jax.lax.cond(jnp.any(mask_n != mask_t), lambda: _sliding(problem, mask_n, slope_n),
                        lambda: sl_t._replace(slope=slope_n))
    x_p = _project(sl_n, x)
    return mask_n, sl_n, x_p / jnp.linalg.norm(x_p), cand & ok, e, over


def _woodbury(pt: PolarPoint, x, tau, h):
    """A solver for W k = r, W = I + c P G^T M G, c = gamma h e^tau / s, M = diag w - w w^T,
    P v = v - g <x, v> / s (Sherman-Morrison-Woodbury with an N x N LU factorization)."""
    c = _ROS2_GAMMA * h * jnp.exp(tau) / pt.s
    G, w = pt.G, pt.w
    Gg, Gx = G @ pt.g, G @ x
    B = G @ G.T - jnp.outer(Gg, Gx) / pt.s                    # G P G^T
    MB = w[:, None] * B - jnp.outer(w, w @ B)                  # M B
    lu = jax.scipy.linalg.lu_factor(jnp.eye(w.shape[0]) + c * MB)

    def solve(r):
        Gr = G @ r
        y = jax.scipy.linalg.lu_solve(lu, w * Gr - w * (w @ Gr))
        z = G.T @ y
        return r - c * (z - pt.g * (x @ z) / pt.s)

    return solve


def _log_integral_exp_linear(phi1, phi2, h):
    """log of int_0^h exp(phi1 + (phi2 - phi1) u / h) du, stable for any phi2 - phi1."""
    d = phi2 - phi1
    ad = jnp.abs(d)
    safe = jnp.where(ad > 1e-8, ad, 1.0)
    # log((e^d - 1) / d) = max(d, 0) + log((1 - e^{-|d|}) / |d|)
    core = jnp.where(ad > 1e-8, jnp.log(-jnp.expm1(-safe)) - jnp.log(safe), -0.5 * ad)
    return phi1 + jnp.log(h) + jnp.maximum(d, 0.0) + core


def _ros2_step(problem, unravel, st: PolarState, rtol, atol, h_max, stiff_ref=math.inf):
    """One attempted ROS2 step of size at most st.h; returns the next state.

    With kinks (``st.slide``), the kinks the current velocity reaches within the step are
    tested first (``_events``): attracting ones within the error tolerance of x join the
    sliding set and x moves onto them; for farther ones the step is cut to end where the
    first is reached (event location by the linear prediction), so that a step never
    crosses a kink it should slide on: a crossing inside a step is a jump in the field,
    an O(h) error. Kinks still crossed during the step are tested at its end. Every move
    onto a kink counts as error, and so do a kink crossed inside the step (a rejected step
    retries with the step that ends just past it), a member of S held past its release and
    the C.9 quadrature's disagreement with the step's chord (see the module docstring).
    """
    x0, tau, h, pt0, sl0 = st.x, st.tau, st.h, st.point, st.slide
    # the stiff directions turn a position error d into a velocity error ~ e^{L tau} d (the
    # soft-min's sharpness): past e^{L tau} = stiff_ref the tolerances shrink like e^{-L tau}
    # so that F, hence beta and Lemma C.9's integrand, stay as accurate as before
    scale = (atol + rtol * jnp.abs(x0)) * jnp.minimum(
        1.0, stiff_ref * jnp.exp(-problem.order * tau))
    x, pt, sl, mask, jump, h_eff = x0, pt0, sl0, st.mask, 0.0, h
    if sl0 is not None:
        Xf = problem.X.reshape(problem.n, -1)
        m, d = sl0.R.shape[0], Xf.shape[1]
        z = _kink_z(problem, x0)
        zdot = _kink_z(problem, pt0.F)  # z is linear in theta: dz/dtau = z(F)
        t_hit = jnp.where(z * zdot < 0, -z / jnp.where(zdot == 0, 1.0, zdot),
                          jnp.where(z == 0, 0.0, jnp.inf))
        cand = ~mask & (t_hit <= h)
        xn2 = jnp.sum(Xf * Xf, axis=1)
        # a kink that left S keeps its bound's slope only while z is rounding-sized
        sl0 = sl0._replace(slope=jnp.where(mask | (jnp.abs(z) <= 1e-12 * jnp.sqrt(xn2)[:, None]),
                                           sl0.slope, jnp.nan))
        # RMS (in error units) of the move onto z_nj = 0: (z / |x_n|^2) x_n in column j
        spread = (Xf * Xf) @ (1.0 / _first_layer(scale, d, m) ** 2)        # (N, m)
        move = jnp.abs(z) / xn2[:, None] * jnp.sqrt(spread / x0.shape[0])
        # ... and its kick to the per-point log losses u (what the soft-min weights feel,
        # e^{L tau} times the margins' change): |du_m| <= e^tau |z| / |x_n| max_m |G_m,j|
        G_col = jnp.sqrt(jnp.max(jnp.sum(
            pt0.G[:, :d * m].reshape(-1, d, m) ** 2, axis=1), axis=0))       # (m,)
        kick = jnp.exp(tau) * jnp.abs(z) / jnp.sqrt(xn2)[:, None] * G_col[None, :]
        near = (move <= 1e-3) & (kick <= 1e-3)
        kink = problem.model.kinks
        jump_unit = (kink.hi - kink.lo) / pt0.s * jnp.sqrt(spread / x0.shape[0])
        hold_unit = 0.2 / (h_max * jump_unit)
        mask, sl, x, feasible, e, _ = _events(problem, unravel, mask, sl0, x0, tau, cand,
                                              near, hold_unit)
        # the step ends where the first kink it would cross is reached (linear prediction),
        # unless crossing it inside the step costs little: the field jumps there by
        # (hi - lo) e_nj x_n / s in column j, an error of about h |jump| (error units); a
        # kink reached in the first 1% of the step is crossed at once
        f_jump = jump_unit * jnp.abs(e)
        cut = (cand & ~(mask & ~st.mask) & (h * f_jump > 0.1) & (t_hit > 0.01 * h)
               & ~(feasible & near))
        h_eff = jnp.minimum(h, jnp.min(jnp.where(cut, t_hit, jnp.inf)))
        moved = jnp.any(mask != st.mask)
        pt = jax.lax.cond(moved, lambda: _field(problem, unravel, x, tau, sl), lambda: pt0)
        jump = jnp.sqrt(jnp.mean(((x - x0) / scale) ** 2))
    h_cut = h_eff < h
    h = h_eff
    solve = _woodbury(pt, x, tau, h)
    # tau is a state variable of the autonomized system; its column of the Jacobian,
    # dF/dtau = -(e^tau / s) P G^T M G x, is the same rank-N (Gauss-Newton) part
    Mu = pt.w * (pt.G @ x)
    Mu = Mu - pt.w * jnp.sum(Mu)
    z = pt.G.T @ Mu
    F_tau = -(jnp.exp(tau) / pt.s) * (z - pt.g * (x @ z) / pt.s)
    k1 = solve(pt.F + _ROS2_GAMMA * h * F_tau)
    x_stage = x + h * k1
    x_stage = x_stage / jnp.linalg.norm(x_stage)
    k2 = solve(_field_only(problem, unravel, x_stage, tau + h, sl) - 2.0 * k1
               - _ROS2_GAMMA * h * F_tau)
    x_new = x + h * (1.5 * k1 + 0.5 * k2)
    x_new = x_new / jnp.linalg.norm(x_new)
    err = jnp.sqrt(jnp.mean((0.5 * h * (k1 + k2) / scale) ** 2))
    x_step, sl_step, mask_step = x_new, sl, mask
    h_land = h
    if sl0 is not None:
        z_a, z_b = _kink_z(problem, x), _kink_z(problem, x_new)
        cross = ~mask & (z_a * z_b < 0)
        mask, sl, x_proj, _, e_end, over = _events(problem, unravel, mask, sl, x_new, tau + h,
                                                    cross, cross, hold_unit)
        jump = jnp.maximum(jump, jnp.sqrt(jnp.mean(((x_proj - x_new) / scale) ** 2)))
        # a kink whose multiplier left its bounds during the step was held past its release:
        # the velocity it forced differs from the flow's by over * (hi - lo) |e| x_n / s,
        # growing from 0, an error of about h / 2 times that (error units). Steps are cut
        # until releases are located to within the tolerance
        jump = jnp.maximum(jump, 0.5 * h * jnp.max(over * jump_unit * jnp.abs(e_end)))
        # a kink crossed inside the step (not captured) is a jump in the field: the part of
        # the step after it integrated the other side's field, an error of about
        # h * after * |jump| (after: the fraction of the step past the crossing, z linear)
        after = jnp.abs(z_b) / jnp.where(cross, jnp.abs(z_a) + jnp.abs(z_b), 1.0)
        e_cross = jnp.where(cross & ~mask, h * after * jump_unit * jnp.abs(e_end), 0.0)
        jump = jnp.maximum(jump, jnp.max(e_cross))
        # if the crossing decides the step, retry with the step that ends just past it
        worst = jnp.argmax(e_cross.ravel())
        h_land = jnp.where(jnp.max(e_cross) > 1.0, h * (1.0 - 0.98 * after.ravel()[worst]), h)
        # a capture at the end of the step must not kick the soft-min weights either
        du = jnp.exp(tau + h) * (pt.G @ (x_proj - x_new))
        jump = jnp.maximum(jump, jnp.max(jnp.abs(du)) / 1e-3)
        x_new = x_proj
    err = jnp.maximum(err, jump)
    new_pt = _field(problem, unravel, x_new, tau + h, sl)
    # the trapezoid rule for int |F|^2 uses the field of the step's own sliding set at both
    # ends: an event at the end of the step changes the velocity from there on, not before
    F_end, dF2_end = new_pt.F, new_pt.dF2
    if sl0 is not None:
        def own_set():
            F = _field_only(problem, unravel, x_step, tau + h, sl_step)
            return F, _speed_rate(problem, unravel, x_step, tau + h, F, sl_step)
        F_end, dF2_end = jax.lax.cond(jnp.any(mask != mask_step), own_set,
                                      lambda: (F_end, dF2_end))

    # Lemma C.9's integral int |F|^2 d tau is part of the solution. On the step it is the
    # trapezoid rule with its end correction (Euler-Maclaurin; fourth order where the speed
    # is smooth), h (f0 + f1) / 2 - h^2 (f1' - f0') / 12, which must agree with the step's
    # chord |x_new - x|^2 / h (a lower bound of the path's own integral) to within the
    # largest of: 2% of their mean (else the speed jumped within the step); 1e-3 of what a
    # step of h_max at this speed adds (a jump in the field at the very start of a step, a
    # kink crossed there, is accepted once the step is short enough for it not to matter);
    # a tenth of the step's own C.9 slack, (1/L) Delta log gamma_tilde minus the integral
    # (where the slack dwarfs the integral, a linear model with 1 - beta ~ 1e-12, the
    # integral needs no more accuracy than that); the chord's rounding (~ 2 |F| eps sqrt(P))
    f2 = 0.5 * (pt.F @ pt.F + F_end @ F_end)
    trap = h * f2 - h * h * (dF2_end - pt.dF2) / 12.0
    chord = jnp.sum((x_step - x) ** 2) / h
    c9_rhs = (_log_smoothed_of(problem, new_pt.log_loss, tau + h)
              - _log_smoothed_of(problem, pt.log_loss, tau)) / problem.order
    c9_rhs = jnp.where(jnp.isfinite(c9_rhs), c9_rhs, 0.0)  # at t0, L = l(b_f): gamma~ = 0
    err = jnp.maximum(err, jnp.abs(trap - chord) / (
        1e-2 * (trap + chord) + 1e-3 * h_max * f2
        + 0.1 * jnp.maximum(c9_rhs - jnp.maximum(trap, chord), 0.0)
        + 2.2e-16 * math.sqrt(x0.shape[0]) * 10.0 * jnp.sqrt(f2) + 1e-300))
    finite = jnp.all(jnp.isfinite(x_new)) & jnp.isfinite(new_pt.phi) & jnp.isfinite(err)
    accepted = finite & (err <= 1.0) & (new_pt.s > 0)
    factor = jnp.clip(0.9 * jnp.where(finite & (err > 0), err, 1e-10) ** -0.5, 0.2, 4.0)
    h_next = jnp.where(finite, h * factor, 0.25 * h)
    h_next = jnp.where(finite & (err > 1.0) & (h_land < h), jnp.maximum(h_land, 0.2 * h), h_next)
    # a step cut short at a kink says nothing against the step it was cut from
    h_next = jnp.minimum(jnp.where(h_cut & accepted, jnp.maximum(h_next, st.h), h_next), h_max)
    log_t_new = jnp.logaddexp(st.log_t, _log_integral_exp_linear(pt.phi, new_pt.phi, h))
    status = jnp.where(finite & (err <= 1.0) & (new_pt.s <= 0), NOT_RADIAL, OK)
    status = jnp.where(h_next < 1e-14, jnp.where(finite, STEP_UNDERFLOW, NONFINITE), status)
    pick = lambda a, b: jax.tree_util.tree_map(lambda u, v: jnp.where(accepted, u, v), a, b)
    return PolarState(
        x=jnp.where(accepted, x_new, x0), tau=jnp.where(accepted, tau + h, tau),
        log_t=jnp.where(accepted, log_t_new, st.log_t), h=h_next, point=pick(new_pt, pt0),
        steps=st.steps + accepted, rejected=st.rejected + (~accepted), status=status,
        energy=st.energy + jnp.where(accepted, jnp.sum((x_new - x0) ** 2) / h, 0.0),
        speed_int=st.speed_int + jnp.where(accepted, trap, 0.0),
        mask=pick(mask, st.mask), slide=pick(sl, st.slide))


def _polar_loop(problem: Problem, unravel, st: PolarState, log_t_stop, tau_stop, log_loss_stop,
                max_steps, rtol, atol, h_max, stiff_ref=math.inf) -> PolarState:
    """ROS2 steps until a stop condition or a failure (pure; jit and vmap freely)."""
    def cond(s):
        return ((s.status == OK) & (s.log_t < log_t_stop) & (s.tau < tau_stop)
                & (s.point.log_loss > log_loss_stop) & (s.steps < max_steps))

    return jax.lax.while_loop(
        cond, lambda s: _ros2_step(problem, unravel, s, rtol, atol, h_max, stiff_ref), st)


def _polar_start(problem: Problem, unravel, flat_t0, log_t0, sliding: bool = False) -> PolarState:
    rho = jnp.linalg.norm(flat_t0)
    x0, tau0 = flat_t0 / rho, jnp.log(rho)
    mask = sl = None
    if sliding and _sliding_model(problem):
        mask = jnp.zeros(_kink_z(problem, x0).shape, bool)
        sl = _sliding(problem, mask, jnp.full(mask.shape, jnp.nan, x0.dtype))
    return PolarState(x0, tau0, jnp.asarray(log_t0, jnp.float64), jnp.asarray(1e-3),
                      _field(problem, unravel, x0, tau0, sl), jnp.asarray(0), jnp.asarray(0),
                      jnp.asarray(OK), jnp.asarray(0.0), jnp.asarray(0.0), mask, sl)


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


@partial(jax.jit, static_argnames=("unravel", "rtol", "atol", "h_max", "stiff_ref"))
def _advance(problem: Problem, st: PolarState, log_t_stop, tau_stop, log_loss_stop, max_steps,
             *, unravel, rtol, atol, h_max, stiff_ref=math.inf) -> PolarState:
    return _polar_loop(problem, unravel, st, log_t_stop, tau_stop, log_loss_stop, max_steps,
                       rtol, atol, h_max, stiff_ref)


_diagnostics_jit = jax.jit(diagnostics)


def _log_smoothed_of(problem: Problem, log_loss, tau):
    """log gamma_tilde = log l^{-1}(L) - L tau, from log L and tau = log rho."""
    return jnp.log(problem.loss.inverse(log_loss)) - problem.order * tau


def _log_smoothed(problem: Problem, unravel, x, tau, sl=None):
    """log gamma_tilde at theta = e^tau x (with the sliding state's kink derivatives)."""
    log_loss = logsumexp(-_per_point_neg_log_loss(problem, unravel, jnp.exp(tau) * x, sl))
    return _log_smoothed_of(problem, log_loss, tau)


@partial(jax.jit, static_argnames=("unravel",))
def _lemma_5_1(problem: Problem, x, tau, F, sl=None, *, unravel):
    """(d log gamma_tilde / d tau, ||d theta_hat / d tau||^2) along the velocity F the flow
    follows: Lemma 5.1 in tau says the first is >= L times the second. The JVP along F is
    the directional derivative: at a kink the flow slides on, F is tangent (the kink's
    derivative multiplies dz/dtau = 0); a kink that just left keeps the derivative of the
    side F moves to (``Sliding.slope``)."""
    _, rate = jax.jvp(lambda x, tau: _log_smoothed(problem, unravel, x, tau, sl), (x, tau),
                      (F, jnp.ones_like(tau)))
    return rate, F @ F


class _Recorder:
    """Diagnostics (the one shared function) at saved points, plus solver statistics."""

    def __init__(self, problem: Problem, snapshots: bool, kkt: bool, unravel=None):
        self.problem, self.snapshots, self.kkt, self.unravel = problem, snapshots, kkt, unravel
        self.rows, self.snaps = [], []
        self._diag = _diagnostics_jit

    def __call__(self, params, log_t, phase, steps, rejected, wall, energy=math.nan,
                 state: PolarState | None = None):
        d = self._diag(self.problem, params)
        row = d.columns()
        row["path_energy"] = energy
        # beta of the velocity the flow follows (phase 2: the minimum-norm Clarke element
        # when kinks slide; otherwise the autodiff gradient, the ``beta`` column), and
        # Lemma 5.1's two sides along that velocity
        row.update(flow_beta=row["beta"], sliding=0, dlog_smoothed_dtau=math.nan,
                   speed2=math.nan, speed_integral=math.nan)
        if state is not None:
            rate, speed2 = _lemma_5_1(self.problem, state.x, state.tau, state.point.F,
                                      state.slide, unravel=self.unravel)
            row.update(flow_beta=float(state.point.s / jnp.linalg.norm(state.point.g)),
                       sliding=0 if state.mask is None else int(jnp.sum(state.mask)),
                       dlog_smoothed_dtau=float(rate), speed2=float(speed2),
                       speed_integral=float(state.speed_int))
        if self.kkt:
            row.update({k: float(v) for k, v in kkt_columns(self.problem, params).items()})
        row.update(step=int(steps), attempts=int(steps + rejected), log_T=float(log_t),
                   log_lr=math.nan, separated=bool(d.log_loss < self.problem.loss.log_threshold),
                   phase=phase, rejected=int(rejected), wall_s=wall)
        self.rows.append(row)
        if self.snapshots:
            self.snaps.append(jax.device_get(params))


def _phase1_field(t, y, args):
    problem, unravel = args
    log_loss, grad = jax.value_and_grad(lambda z: problem.log_loss(unravel(z)))(y)
    return -jnp.exp(log_loss) * grad


def _phase1_separated(t, y, args, **kwargs):
    problem, unravel = args
    return problem.log_loss(unravel(y)) - problem.loss.log_threshold


def _phase1(problem, flat0, unravel, t_limit, save_t, rtol, atol, max_steps):
    """Original-time flow until L < l(b_f) (a diffrax Event) or t_limit. The field and the
    event are module-level functions of ``args`` so diffrax's compiled solve is reused."""
    saveat = (diffrax.SaveAt(t1=True) if save_t is None else
              diffrax.SaveAt(ts=jnp.asarray(save_t, jnp.float64), t1=True))
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_phase1_field), diffrax.Tsit5(), t0=0.0, t1=float(t_limit), dt0=None,
        y0=flat0, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=saveat,
        event=diffrax.Event(_phase1_separated,
                            root_finder=optx.Newton(rtol=1e-12, atol=1e-12)),
        args=(problem, unravel), max_steps=max_steps, throw=False)
    return sol


def _check_stiff_ref(stiff_ref):
    if not stiff_ref > 0:
        raise ValueError(f"stiff_ref must be > 0 (math.inf keeps phase 2's tolerances fixed), "
                         f"got {stiff_ref!r}")


def flow(problem: Problem, params0, *, log_t_max: float | None = 20.0,
         tau_max: float | None = None, log_loss_min: float | None = None,
         n_saves: int = 200, save_t=None, t0_limit: float = 1e6, rtol: float = 1e-6,
         atol: float = 1e-9, polar_rtol: float = 1e-6, polar_atol: float = 1e-6,
         stiff_ref: float = 1e5, h_max: float = 0.01, max_steps: int = 1_000_000,
         max_wall_s: float | None = None, sliding: bool = True, progress: bool = True,
         snapshots: bool = True, kkt: bool = True, config: dict | None = None) -> Trajectory:
    """Simulate gradient flow from ``params0`` and record diagnostics.

    Stops at the first of: log t >= ``log_t_max``, tau = log rho >= ``tau_max``,
    log L <= ``log_loss_min``, or (checked at saved points of phase 2) ``max_wall_s``
    seconds of wall time (status "wall_budget"). ``h_max`` caps the step in tau: the
    direction lags the flow by O(h^2) (on a linear model 1 - beta plateaus near
    4e-8 (h_max / 0.02)^4: 2.4e-5, 4e-8, 1.7e-10 at h_max = 0.1, 0.02, 0.005), and a
    decade of log t takes about 1.15 / (L h_max) steps at most on a kink-free model.
    ``polar_rtol``/``polar_atol`` are phase 2's tolerances on theta_hat until the soft-min's
    sharpness e^{L tau} reaches ``stiff_ref`` (log t ~ 1e4 on the default problem); from
    there they shrink like e^{-L tau}: the stiff directions turn a position error d into a
    velocity error ~ e^{L tau} d, and Lemma C.9's slack shrinks as the soft-min sharpens
    (``stiff_ref=math.inf`` keeps them fixed).

    Phase 1 saves at ``save_t`` (default: 40 log-spaced times in (0, t0_limit]) until t0;
    phase 2 saves at the first accepted step at or past each of ``n_saves`` log-spaced values of log t between log t0 and ``log_t_max`` (or of tau when
    only ``tau_max`` is given). Columns are those of ``descent`` (``log_T`` is log t, ``step``
    counts accepted solver steps; tau is ``log_rho``) plus ``phase``, ``rejected``, ``wall_s``,
    ``path_energy`` (phase 2: sum of ||Delta theta_hat||^2 / Delta tau over accepted steps,
    the simulated path's int (beta^-2 - 1) d tau since t0, for Lemma C.9's check;
    ``speed_integral``: the same integral by the end-corrected trapezoid rule on
    |d theta_hat / d tau|^2 over the solver's steps, an error-controlled part of the solve),
    and (with ``kkt``) ``kkt_eps``/``kkt_delta`` of ``kkt.kkt_residual``.

    ``sliding`` (default True) makes phase 2 follow the minimum-norm Clarke velocity on a
    model with declared kinks (see the module docstring); phase-2 rows then also carry
    ``flow_beta`` (beta of the velocity followed), ``sliding`` (kinks in the sliding set),
    and Lemma 5.1's sides along that velocity, ``dlog_smoothed_dtau`` and ``speed2``
    (||d theta_hat / d tau||^2).

    Data that never separate stop at ``t0_limit`` with status "not_separated" and a
    warning. A solver failure (diffrax's result code in phase 1; step-size underflow,
    non-finite values or <theta_hat, -grad L> <= 0 in phase 2) raises ``RunStopped``
    carrying every point saved so far.
    """
    if log_t_max is None and tau_max is None and log_loss_min is None:
        raise ValueError("give at least one of log_t_max, tau_max, log_loss_min")
    _check_stiff_ref(stiff_ref)
    start = time.perf_counter()
    params0 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params0)
    flat0, unravel = _ravel(params0)
    rec = _Recorder(problem, snapshots, kkt, unravel)
    meta = {"engine": "flow", "model": problem.model.name, "order": problem.order,
            "layer_orders": list(problem.model.layer_orders), "loss": problem.loss.name,
            "n": problem.n, "log_threshold": problem.loss.log_threshold,
            "config": config or {}, "versions": package_versions(),
            "stop": {"log_t_max": log_t_max, "tau_max": tau_max, "log_loss_min": log_loss_min},
            "solver": {"phase1": "Tsit5 + PIDController", "phase2": "ROS2 W-method (rank-N)",
                       "sliding": sliding and _sliding_model(problem), "rtol": rtol,
                       "atol": atol, "polar_rtol": polar_rtol, "stiff_ref": stiff_ref,
                       "polar_atol": polar_atol}}
    lt_max = math.inf if log_t_max is None else float(log_t_max)
    tau_stop = math.inf if tau_max is None else float(tau_max)
    ll_stop = -math.inf if log_loss_min is None else float(log_loss_min)

    rec(params0, -math.inf, 1, 0, 0, 0.0)
    log_loss0 = float(problem.log_loss(params0))
    if log_loss0 < problem.loss.log_threshold:
        t0, flat_t0, p1 = 0.0, flat0, {"steps": 0, "rejected": 0}
    else:
        grid = np.asarray(save_t if save_t is not None else
                          np.geomspace(t0_limit * 1e-8, t0_limit, 40), np.float64)
        sol = _phase1(problem, flat0, unravel, t0_limit, grid, rtol, atol, max_steps)
        p1 = {"steps": int(sol.stats["num_accepted_steps"]),
              "rejected": int(sol.stats["num_rejected_steps"]), "result": str(sol.result)}
        ts, ys = np.asarray(sol.ts), np.asarray(sol.ys)
        # saves past the end of the solve (event or failure) are inf; the last finite
        # entry is the state at the end (SaveAt(t1=True))
        done = np.isfinite(ts) & np.all(np.isfinite(ys), axis=1)
        ts, ys = ts[done], ys[done]
        t_end = float(ts[-1])
        for t, y in zip(ts, ys):
            rec(unravel(jnp.asarray(y)), math.log(t), 1, p1["steps"], p1["rejected"],
                time.perf_counter() - start)
        flat_t0 = jnp.asarray(ys[-1])
        meta["phase1"] = p1
        if sol.result == diffrax.RESULTS.successful:  # reached t0_limit without separating
            meta.update(status="not_separated", t0=None, wall_time_s=time.perf_counter() - start,
                        message=f"the loss never fell below the separability threshold "
                                f"l(b_f) = exp({problem.loss.log_threshold:.6g}) by t = {t_end:g} "
                                f"(log L = {float(problem.log_loss(unravel(flat_t0))):.6g}): the "
                                f"data were not separated, so no margin claim applies")
            warnings.warn(meta["message"], stacklevel=2)
            return Trajectory.from_rows(rec.rows, rec.snaps, meta)
        if sol.result != diffrax.RESULTS.event_occurred:
            meta.update(status="phase1_failed", wall_time_s=time.perf_counter() - start,
                        message=f"the original-time solve failed at t = {t_end:g}: diffrax "
                                f"result {sol.result!r}")
            raise RunStopped(meta["message"], Trajectory.from_rows(rec.rows, rec.snaps, meta),
                             p1["steps"], "phase1_failed")
        t0 = t_end
    meta["t0"] = t0
    meta["log_loss_t0"] = float(problem.log_loss(unravel(flat_t0)))

    # ---- phase 2: log-polar time
    log_t0 = math.log(t0) if t0 > 0 else -math.inf  # separated at t = 0: t grows from 0
    st = _polar_start(problem, unravel, flat_t0, log_t0, sliding)
    tau0 = st.tau
    if not float(st.point.s) > 0:
        raise ValueError(f"<theta_hat, -grad L> = {float(st.point.s):.3g} <= 0 at t0 = {t0:g}; "
                         f"impossible for a homogeneous model past t0: check the model's order")
    advance = partial(_advance, unravel=unravel, rtol=polar_rtol, atol=polar_atol, h_max=h_max,
                      stiff_ref=float(stiff_ref))
    if log_t_max is not None:
        lo = max(log_t0, 1e-3)
        marks = np.geomspace(max(lo, 1e-3), max(lt_max, lo * 1.0001), n_saves)[1:]
        key = "log_t"
    else:
        marks = np.linspace(float(tau0), tau_stop if np.isfinite(tau_stop) else float(tau0) + 10,
                            n_saves)[1:]
        key = "tau"
    bar = tqdm(total=len(marks), disable=not progress, unit="save", leave=False, mininterval=0.5)
    status, last_steps, out_of_time = OK, -1, False
    for mark in marks:
        lt_stop = min(mark, lt_max) if key == "log_t" else lt_max
        ta_stop = min(mark, tau_stop) if key == "tau" else tau_stop
        while True:  # in chunks of steps, so that the wall budget is checked in between
            cap = min(max_steps, int(st.steps) + _CHUNK)
            st = advance(problem, st, jnp.asarray(lt_stop), jnp.asarray(ta_stop),
                         jnp.asarray(ll_stop), jnp.asarray(cap))
            status = int(st.status)
            if status != OK or int(st.steps) < cap or cap >= max_steps or (
                    max_wall_s is not None and time.perf_counter() - start >= max_wall_s):
                break
        if status == OK and int(st.steps) >= max_steps:
            status = MAX_STEPS
        bar.update(1)
        if int(st.steps) == last_steps and status == OK:
            continue  # this mark was passed by the last step already
        last_steps = int(st.steps)
        rec(unravel(jnp.exp(st.tau) * st.x), float(st.log_t), 2,
            p1["steps"] + int(st.steps), p1["rejected"] + int(st.rejected),
            time.perf_counter() - start, float(st.energy), st)
        bar.set_postfix(log_t=f"{float(st.log_t):.4g}", steps=int(st.steps))
        if (status != OK or float(st.log_t) >= lt_max or float(st.tau) >= tau_stop
                or float(st.point.log_loss) <= ll_stop):
            break
        if max_wall_s is not None and time.perf_counter() - start >= max_wall_s:
            out_of_time = True
            break
    bar.close()
    meta["phase2"] = {"steps": int(st.steps), "rejected": int(st.rejected)}
    meta["wall_time_s"] = time.perf_counter() - start
    if status != OK:
        what = {NONFINITE: "a non-finite value", NOT_RADIAL: "<theta_hat, -grad L> <= 0",
                STEP_UNDERFLOW: "the step size underflowed (< 1e-14 in tau)",
                MAX_STEPS: f"the step budget max_steps = {max_steps} ran out"}[status]
        meta.update(status=_STATUS[status],
                    message=f"the log-polar solve stopped at log t = {float(st.log_t):.6g} "
                            f"(tau = {float(st.tau):.6g}): {what}")
        raise RunStopped(meta["message"], Trajectory.from_rows(rec.rows, rec.snaps, meta),
                         int(st.steps), _STATUS[status])
    meta.update(status="wall_budget" if out_of_time else "completed",
                message=f"reached log t = {float(st.log_t):.6g}, tau = {float(st.tau):.6g}"
                + (f" when the wall budget of {max_wall_s:g} s ran out" if out_of_time else ""))
    return Trajectory.from_rows(rec.rows, rec.snaps, meta)


def flow_batch(problem: Problem, params0, *, log_t_max: float = 20.0, n_saves: int = 50,
               t0_limit: float = 1e6, rtol: float = 1e-6, atol: float = 1e-9,
               polar_rtol: float = 1e-6, polar_atol: float = 1e-6, stiff_ref: float = 1e5,
               h_max: float = 0.01,
               max_steps: int = 100_000, sliding: bool = True) -> list[Trajectory]:
    """Gradient flow from a batch of initial parameters (leading axis) in one jitted,
    vmapped call: phase 1 (diffrax, with its Event) and phase 2 (ROS2 in log-polar time)
    are pure functions of one initial point, and ``jax.vmap`` batches them.

    Saves the state at t0 and at the first step at or past each of ``n_saves`` log-spaced
    values of log t in [1, log_t_max], shared by all seeds. Returns one Trajectory per
    seed (columns as ``flow``; ``meta["status"]`` per seed). On kink-free models a vmapped
    call gives the same numbers as separate calls (the test checks 1e-10). With sliding
    kinks, batched kernels round differently in the last bits and the solver's discrete
    decisions (which kink enters or leaves the sliding set at which step) can differ, so
    batched and separate runs agree only to the solve's accuracy (measured: normalized
    margins to ~1e-4 at log t = 100 on a width-20 ReLU net).
    """
    _check_stiff_ref(stiff_ref)
    leaves = jax.tree_util.tree_leaves(params0)
    batch = leaves[0].shape[0]
    first = jax.tree_util.tree_map(lambda p: jnp.asarray(p[0], jnp.float64), params0)
    _, unravel = _ravel(first)
    flat0 = jax.vmap(lambda p: ravel_pytree(p)[0])(
        jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params0))
    marks = jnp.geomspace(1.0, max(float(log_t_max), 1.0 + 1e-9), n_saves)
    threshold = problem.loss.log_threshold

    def one(flat):
        sol = _phase1(problem, flat, unravel, t0_limit, None, rtol, atol, max_steps)
        already = problem.log_loss(unravel(flat)) < threshold
        separated = already | (sol.result == diffrax.RESULTS.event_occurred)
        t0 = jnp.where(already, 0.0, sol.ts[-1])
        flat_t0 = jnp.where(already, flat, sol.ys[-1])
        st = _polar_start(problem, unravel, flat_t0, jnp.log(t0), sliding)
        st = st._replace(status=jnp.where(separated, st.status, NOT_SEPARATED))

        def save(st, mark):
            st = _polar_loop(problem, unravel, st, mark, jnp.inf, -jnp.inf, max_steps,
                             polar_rtol, polar_atol, h_max, stiff_ref)
            rate, speed2 = _lemma_5_1(problem, st.x, st.tau, st.point.F, st.slide,
                                      unravel=unravel)
            n_sliding = 0 if st.mask is None else jnp.sum(st.mask)
            return st, (jnp.exp(st.tau) * st.x, st.log_t, st.steps, st.rejected, st.status,
                        st.energy, st.point.s / jnp.linalg.norm(st.point.g), n_sliding, rate,
                        speed2, st.speed_int)

        _, saved = jax.lax.scan(save, st, marks)
        return t0, flat_t0, sol.stats["num_accepted_steps"], saved

    t0, flat_t0, p1_steps, saved = jax.jit(jax.vmap(one))(flat0)
    diag = jax.jit(jax.vmap(diagnostics, (None, 0)))
    kkt_batch = jax.jit(jax.vmap(kkt_columns, (None, 0)))
    out = []
    for b in range(batch):
        thetas = np.concatenate([np.asarray(flat_t0[b])[None], np.asarray(saved[0][b])])
        log_t = np.concatenate([[math.log(float(t0[b])) if t0[b] > 0 else -math.inf],
                                np.asarray(saved[1][b])])
        steps = np.concatenate([[0], np.asarray(saved[2][b])])
        rejected = np.concatenate([[0], np.asarray(saved[3][b])])
        energy = np.concatenate([[0.0], np.asarray(saved[5][b])])
        keep = np.concatenate([[True], np.diff(steps) > 0])  # drop marks passed in one step
        params = jax.vmap(unravel)(jnp.asarray(thetas[keep]))
        d = diag(problem, params)
        columns = d.columns()
        columns.update({k: np.asarray(v) for k, v in kkt_batch(problem, params).items()})
        columns.update(step=steps[keep], attempts=steps[keep] + rejected[keep],
                       log_T=log_t[keep], log_lr=np.full(keep.sum(), math.nan),
                       separated=columns["log_loss"] < threshold, phase=np.full(keep.sum(), 2),
                       rejected=rejected[keep], path_energy=energy[keep])
        # the t0 record (first) has no polar state: its velocity is the autodiff one
        for k, j, first in (("flow_beta", 6, columns["beta"][0]), ("sliding", 7, 0),
                            ("dlog_smoothed_dtau", 8, math.nan), ("speed2", 9, math.nan),
                            ("speed_integral", 10, 0.0)):
            columns[k] = np.concatenate([[first], np.asarray(saved[j][b])])[keep]
        status = int(np.asarray(saved[4][b])[-1])
        meta = {"engine": "flow_batch", "model": problem.model.name, "order": problem.order,
                "loss": problem.loss.name, "n": problem.n, "seed_index": b,
                "t0": float(t0[b]), "phase1": {"steps": int(p1_steps[b])},
                "status": "not_separated" if status == NOT_SEPARATED else _STATUS[status],
                "versions": package_versions()}
        out.append(Trajectory(columns, jax.device_get(params), meta))
    return out


def euler(problem: Problem, params0, dt: float, steps: int, **kwargs) -> Trajectory:
    """Fixed-step explicit Euler in original time: exactly gradient descent with step dt
    (``descent`` with ``constant(dt)``), labelled as a flow discretization."""
    traj = descent(problem, params0, constant(dt), steps, **kwargs)
    traj.meta["engine"] = "flow-euler"
    return traj


def polar_rates(problem: Problem, params) -> dict:
    """Exact rates of the log-polar flow at ``params`` (after t0), for Lemma 5.1 / C.9.

    Returns d log gamma_tilde / d tau (a JVP along the flow), ||d theta_hat / d tau||^2 and
    beta. Lemma 5.1 in tau reads d log gamma_tilde / d tau >= L ||d theta_hat / d tau||^2,
    and ||d theta_hat / d tau||^2 = 1 / beta^2 - 1 (DESIGN §3).
    """
    flat, unravel = _ravel(params)
    rho = jnp.linalg.norm(flat)
    x, tau = flat / rho, jnp.log(rho)
    rate, speed2 = _lemma_5_1(problem, x, tau, _field_only(problem, unravel, x, tau),
                              unravel=unravel)
    g = -jax.grad(lambda z: problem.log_loss(unravel(z)))(flat)
    beta = (x @ g) / jnp.linalg.norm(g)
    return {"dlog_smoothed_dtau": rate, "speed2": speed2, "beta": beta}


def align(descent_traj: Trajectory, flow_traj: Trajectory) -> dict:
    """Compare a descent run and a flow run at equal T = sum eta (descent) = t (flow).

    For every descent record whose log T lies in the flow's saved range, the flow's
    parameters at that T are those of a saved point with the same log T (to 1e-9), or
    else interpolated linearly in log t between the two neighbouring saved points.
    Returns arrays: log_T, param_distance ||theta_GD - theta_flow||, angle (radians,
    between directions) and margin_gap (gamma_bar_GD - gamma_bar_flow).
    """
    if descent_traj.snapshots is None or flow_traj.snapshots is None:
        raise ValueError("align needs both trajectories recorded with snapshots=True")
    flat_d = np.stack([np.concatenate([np.ravel(a[i]) for a in jax.tree_util.tree_leaves(
        descent_traj.snapshots)]) for i in range(len(descent_traj))])
    flat_f = np.stack([np.concatenate([np.ravel(a[i]) for a in jax.tree_util.tree_leaves(
        flow_traj.snapshots)]) for i in range(len(flow_traj))])
    ld, lf = descent_traj["log_T"], flow_traj["log_T"]
    keep = np.isfinite(lf)
    lf, flat_f, gf = lf[keep], flat_f[keep], flow_traj["normalized_margin"][keep]
    out = {"log_T": [], "param_distance": [], "angle": [], "margin_gap": []}
    for i, t in enumerate(ld):
        if not (np.isfinite(t) and lf[0] <= t <= lf[-1]):
            continue
        j = int(np.searchsorted(lf, t))
        if abs(lf[j] - t) <= 1e-9 * max(1.0, abs(t)):
            theta, gamma = flat_f[j], gf[j]
        else:
            a = (t - lf[j - 1]) / (lf[j] - lf[j - 1])
            theta = (1 - a) * flat_f[j - 1] + a * flat_f[j]
            gamma = (1 - a) * gf[j - 1] + a * gf[j]
        cos = flat_d[i] @ theta / (np.linalg.norm(flat_d[i]) * np.linalg.norm(theta))
        out["log_T"].append(t)
        out["param_distance"].append(np.linalg.norm(flat_d[i] - theta))
        out["angle"].append(float(np.arccos(np.clip(cos, -1.0, 1.0))))
        out["margin_gap"].append(descent_traj["normalized_margin"][i] - gamma)
    return {k: np.asarray(v) for k, v in out.items()}
