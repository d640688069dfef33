"""Sliding along first-layer (leaky) ReLU kinks: phase 2's Clarke velocity (DESIGN §3, §6).

Phase 1 and models without a declared kink use autodiff's element (see
``homoflow.models``): ReLU'(0) = 0, leaky ReLU'(0) = 1 (``where(x >= 0, ...)``), max-pool's
cotangent goes to one maximal element of each window. With that fixed selection a flow that
should slide along an activation boundary z_nj = x_n . w_j = 0 chatters across it, and
every step size pays for it. For networks whose first layer declares its kinks
(``Model.kinks`` with a dense first layer: bias-free (leaky) ReLU MLPs) phase 2 follows the *minimum-norm* element of
the Clarke (chain-rule) set instead, which is the velocity of the gradient flow's
solutions (for a conservative field D, d/dt L = <v, theta'> for every v in D forces
theta' = -the minimum-norm element). It is found per neuron as a box QP whose active
constraints are the sliding set S: the flow moves on {z_S = 0} with the field projected
onto its tangent space, kinks enter S when reached with a feasible multiplier and leave
when it hits a bound (``_events``); steps end where a kink is reached (``_capture``), and
what a step did to the kinks is settled and costed at its end (``_settle``). The
``flow_beta`` column is beta of that velocity, the one Lemma C.9 speaks of; ``beta`` stays
autodiff's.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..problem import Problem
from . import deep


def _apply_first(problem: Problem, params, offset, slope):
    """The model's outputs with the first layer's kinks given ``slope`` (NaN: autodiff's)
    and ``offset`` (``models.Kinks``); deeper kinks keep autodiff's derivative."""
    kinks = problem.model.kinks
    rest = (jnp.nan,) * (kinks.layers - 1)
    return kinks.apply(params, problem.X, (slope,) + rest, (offset,) + (0.0,) * len(rest))


def _sliding_model(problem: Problem) -> bool:
    """Whether phase 2 can slide on the model's kinks: any declared kinks (this module's
    per-neuron mode for a bias-free dense first layer alone, ``deep`` for the rest)."""
    return problem.model.kinks is not None


def _first_only(problem: Problem) -> bool:
    """The per-neuron mode of this module: the only kinked layer is a bias-free dense first
    layer (the two-layer MLP)."""
    kinks = problem.model.kinks
    return kinks is not None and kinks.first_dense and kinks.layers == 1


def _start(problem: Problem, unravel, x0):
    """(mask, sliding state) of the empty sliding set at x0, for either mode."""
    if _first_only(problem):
        mask = jnp.zeros(_kink_z(problem, x0).shape, bool)
        return mask, _sliding(problem, mask, jnp.full(mask.shape, jnp.nan, x0.dtype))
    return deep.start(problem, unravel, x0)


def _apply_slopes(problem: Problem, params, offset, sl):
    """The model's outputs with the sliding state's kink derivatives (either mode)."""
    if isinstance(sl, deep.DeepSliding):
        return deep.apply(problem, params, offset, sl.slope)
    return _apply_first(problem, params, offset, sl.slope)


def _tangent(problem: Problem, unravel, sl, x):
    """What ``_project`` projects with at x: the per-neuron projectors (constant: z is
    linear) or ``deep.Tangent`` (the manifold is curved: its rows at x)."""
    if isinstance(sl, deep.DeepSliding):
        return deep.tangent(problem, unravel, sl, x)
    return sl


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
    set (only the first layer's columns w_j move); a ``deep.Tangent`` projects with its
    rows."""
    if isinstance(sl, deep.Tangent):
        return deep.project(sl, v)
    m, d = sl.R.shape[0], sl.R.shape[1]
    W = _first_layer(v, d, m)
    W = W - jnp.einsum("jab,bj->aj", sl.R, W)
    return jnp.concatenate([W.ravel(), v[d * m:]])



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

    # g_lo uses the derivative lo at every kink of S (the sign of z = +-1e-17 after a
    # projection is rounding, so autodiff's own choice would be either side's)
    _, g_lo, e = deep.gradient_and_cotangents(problem, unravel, _apply_first, slope_t, x, tau)
    m, d = sl_t.R.shape[0], sl_t.R.shape[1]
    Xf = problem.X.reshape(problem.n, -1)
    mu = -(Xf @ jnp.einsum("jab,bj->aj", sl_t.Minv, _first_layer(g_lo, d, m)))
    # of S, only the kink of each neuron whose multiplier is farthest outside its bounds
    # leaves per update: the multipliers of a neuron's kinks are coupled (releasing one
    # moves the others), so releasing every violator at once releases kinks that only
    # violated because of another, which then cross back: churn
    mask_n, slope_n, ok, over = deep.update_set(kink, mask, mask_t, cand, near, mu, e,
                                                hold_unit, sl.slope, slope_t, per_axis=0)
    sl_n = jax.lax.cond(jnp.any(mask_n != mask_t), lambda: _sliding(problem, mask_n, slope_n),
                        lambda: sl_t._replace(slope=slope_n))
    x_p = _project(sl_n, x)
    return mask_n, sl_n, x_p / jnp.linalg.norm(x_p), cand & ok, e, over




class Capture(NamedTuple):
    """What ``_capture`` decided before a step: the sliding set and x after the kinks the
    step would reach were tested, the step size cut at the first kink it must not cross,
    the error (units of the tolerance) of the move onto captured kinks, whether the set
    changed (the field must then be recomputed), and the error units of a kink's jump
    (``jump_unit``, per |e|) and of holding a release (``hold_unit``)."""
    mask: jax.Array
    slide: Sliding
    x: jax.Array
    h: jax.Array
    jump: jax.Array
    moved: jax.Array
    hold_unit: jax.Array
    jump_unit: jax.Array


def _capture(problem: Problem, unravel, st, scale, h_max) -> Capture:
    """Before a step of ``st.h`` from the polar state ``st``: the kinks the current velocity
    reaches within the step are tested (``_events``): attracting ones within the error
    tolerance of x join the sliding set and x moves onto them; for farther ones the step is
    cut to end where the first is reached (event location by the linear prediction), so that
    a step never crosses a kink it should slide on: a crossing inside a step is a jump in
    the field, an O(h) error. ``scale`` is the step's error scale per coordinate."""
    x0, h, mask = st.x, st.h, st.mask
    if isinstance(st.slide, deep.DeepSliding):
        front = deep.capture(problem, unravel, st, scale, h_max)
    else:
        front = _capture_first(problem, unravel, st, scale, h_max)
    mask_n, sl, x, feasible, e, cand, near, t_hit, jump_unit, hold_unit = front
    # the step ends where the first kink it would cross is reached (linear prediction),
    # unless crossing it inside the step costs little: the field jumps there by
    # (hi - lo) e_nj x_n / s in column j, an error of about h |jump| (error units); a
    # kink reached in the first 1% of the step is crossed at once
    f_jump = jump_unit * jnp.abs(e)
    cut = (cand & ~(mask_n & ~mask) & (h * f_jump > 0.1) & (t_hit > 0.01 * h)
           & ~(feasible & near))
    h_eff = jnp.minimum(h, jnp.min(jnp.where(cut, t_hit, jnp.inf)))
    moved = jnp.any(mask_n != mask)
    jump = jnp.sqrt(jnp.mean(((x - x0) / scale) ** 2))
    return Capture(mask_n, sl, x, h_eff, jump, moved, hold_unit, jump_unit)


def _capture_first(problem: Problem, unravel, st, scale, h_max):
    """``_capture``'s first half on a first dense layer's kinks (``deep.capture``'s
    per-neuron twin): the events, and what the step cut needs."""
    x0, tau, h, pt0, sl0, mask = st.x, st.tau, st.h, st.point, st.slide, st.mask
    Xf = problem.X.reshape(problem.n, -1)
    m, d = sl0.R.shape[0], Xf.shape[1]
    z = _kink_z(problem, x0)
    zdot = _kink_z(problem, pt0.F)  # z is linear in theta: dz/dtau = z(F)
    t_hit = deep.hit_times(z, zdot)
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
    return _events(problem, unravel, mask, sl0, x0, tau, cand, near, hold_unit)[:5] + (
        cand, near, t_hit, jump_unit, hold_unit)


def _settle(problem: Problem, unravel, cap: Capture, x, x_new, tau, h, G, w, scale):
    """After a step from x to x_new (tau -> tau + h) on the sliding set ``cap``: kinks
    crossed during the step are tested at its end (and captured when they attract), and the
    step's kink errors are counted (error units): the move onto captured kinks, a member of
    S held past its release, a kink crossed inside the step, and a capture's kick to the
    per-point log losses (``G``: their Jacobian at the step's start, ``w``: the soft-min
    weights there). Returns (mask,
    sliding, x_new projected, the error, the step to retry with when a crossing decided
    it)."""
    mask, sl, jump, jump_unit = cap.mask, cap.slide, cap.jump, cap.jump_unit
    if isinstance(sl, deep.DeepSliding):
        kink_z, ev = (lambda x: deep.sites(problem, unravel, x)), deep.events
    else:
        kink_z, ev = (lambda x: _kink_z(problem, x)), _events
    z_a, z_b = kink_z(x), kink_z(x_new)
    cross = ~mask & (z_a * z_b < 0)
    mask, sl, x_proj, _, e_end, over = ev(problem, unravel, mask, sl, x_new, tau + h,
                                          cross, cross, cap.hold_unit)
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
    # a capture at the end of the step must not kick the soft-min weights either: the
    # velocity's relative error from a kick du of the per-point log losses is about
    # sum_n w_n |du_n| (dw = (diag w - w w^T) du); the first-layer mode bounds max_n |du_n|
    # (stricter: points off the support count too), the deep mode the weighted sum, since
    # with thousands of sites there a kink is captured at the end of nearly every step and
    # the max over every point, not the velocity's error, would decide the step
    du = jnp.abs(jnp.exp(tau + h) * (G @ (x_proj - x_new)))
    kick = jnp.sum(w * du) if isinstance(sl, deep.DeepSliding) else jnp.max(du)
    jump = jnp.maximum(jump, kick / 1e-3)
    return mask, sl, x_proj, jump, h_land
