"""Sliding on the kinks of every layer: (leaky) ReLU MLPs of any depth and the CNN's ReLUs.

``sliding`` handles a model whose only kinked layer is a bias-free dense first layer (the
two-layer MLP): there a kink z_nj = x_n . w_j is linear in theta and the sliding set's
tangent space is a per-neuron projector. Here every site declared by ``Model.kinks`` (one
activation input: kinked layer, data point, unit) may join the sliding set S, and z_s(theta)
is nonlinear for a site past the first layer. What carries over (DESIGN §3):

* The chain-rule set at theta is {g(sigma) : sigma in [lo, hi]^S} with g(sigma) the
  backprop gradient of -log L with derivative sigma_s at each site of S. Every term in which
  sigma_s appears carries the factor grad z_s (the total derivative of the site's
  pre-activation, taken with the derivatives of the earlier sites of S; on {z_S = 0} those
  differ from lo only by multiples of the earlier sites' gradients), so
  g(sigma) lies in g_lo + span{grad z_s : s in S} and its projection onto the tangent space
  T = span{grad z_s}^perp of the manifold {z_S = 0} is the same for every sigma. The flow
  slides along {z_S = 0} with velocity P_T g_lo when some sigma in the box reaches it; that
  is then the minimum-norm element of the (convex hull of the) chain-rule set restricted to
  T-consistent motions, the velocity of the flow's solutions.
* The multipliers: P_T g_lo = g_lo + sum_s mu_s grad z_s with mu = -(J J^T)^+ J g_lo
  (J: the rows grad z_s, s in S). For a site whose activation output has cotangent e_s
  and no other site of S on its paths, mu_s = (sigma_s - lo) e_s exactly; where sites of S
  are chained (a deeper site of the same point downstream of a shallower one), e_s is
  taken with lo at the deeper sites, so sigma_s = lo + mu_s / e_s is the first-order
  reading of the multiplier and the entry/release test is that approximation's. A
  kink enters S when reached with sigma in [lo, hi] and leaves when sigma leaves it, with
  the hysteresis and one-release-per-update rule of ``sliding._events`` (one release per
  update over all sites: sites of different points share weights, so every pair is coupled).
* {z_S = 0} is curved: the tangent projector is taken at the current point (its rows are
  recomputed at every field evaluation, so the stage and the JVP of the C.9 quadrature see
  the curvature) and the state is pulled back onto the manifold by two Gauss-Newton steps
  x <- x - J^T (J J^T)^+ z_S(x) after every event update, then renormalized (z is
  positively homogeneous, so renormalizing keeps z_S = 0).

Costs: the rows grad z_s are single-point backward passes (a site depends on its own data
point only), K of them per field evaluation, K = the capacity of S (static, ``CAPACITY``);
the Gram matrix J J^T is factored by Cholesky (K x K) with rows normalized and a 1e-12
ridge (rank-deficient sets, e.g. more sites than parameters, project onto the span). A site
reached when S is full does not enter (it is crossed, its jump costed as for any crossing).
The per-site sizes the error control needs (|grad z_s|, its norm in error units) are
estimated for all sites at once from ``_PROBES`` Rademacher probes (JVPs of the full batch):
an unbiased estimate of the squared norms, within a factor ~2 at 8 probes; they only decide
whether a move onto a kink is small enough to make at once and whether a crossing is cheap
enough to integrate through, and every accepted step's own kink error is measured, not
estimated (``sliding._settle``).

Out of scope: ties of max-pooling (a kink of the max whose Clarke set is a simplex of
window elements, not an interval; autodiff's element is used there, as ``models.cnn``
declares) and kinks of biased layers other than the first (not homogeneous).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ..problem import Problem

# sites S can hold at once. A full set is not free: a kink reached with a feasible
# multiplier and no room is crossed (its jump costed), and the flow chatters across it.
# Measured on the depth-3 MLP 10-50-50-1 (P = 3050, 10^4 sites) just after t0, phase-2
# rtol = atol = 1e-4: with K = 64 the set stayed at 56-64 and 65% of the steps were cut at
# a kink; with K = 128 or 256 it settled at 85-88 and 13-24% were cut, the mean step twice
# as long, but a step cost 2-5 times more (the Gram matrix Rn Rn^T is K^2 P, and the field's
# JVP for the C.9 quadrature differentiates it), so per unit of tau K = 64 was the faster
CAPACITY = 64
_PROBES = 8      # Rademacher probes for the per-site gradient norms
_RIDGE = 1e-12   # on the Gram matrix of the normalized rows


class DeepSliding(NamedTuple):
    """The sliding set of the general (every-layer) mode: ``idx`` (K,) flat indices of its
    sites in (N, sites per point) order, padded with N * sites (K: the capacity), and
    ``slope`` (N, sites per point), the derivative used at each site: lo on S, the bound a
    site left S by while still within rounding of 0, NaN (autodiff's) elsewhere."""
    idx: jax.Array
    slope: jax.Array


class Tangent(NamedTuple):
    """The tangent projector of {z_S = 0} at a point: normalized rows ``Rn`` (K, P), their
    norms ``r``, and the Cholesky factor of Rn Rn^T + ridge (padding rows: identity)."""
    Rn: jax.Array
    r: jax.Array
    chol: jax.Array


def _split(problem: Problem, params, flat):
    """(N, sites) -> one array per kinked layer, shaped like its pre-activations."""
    shapes = [z.shape for z in jax.eval_shape(problem.model.kinks.pre, params, problem.X)]
    out, i = [], 0
    for shape in shapes:
        k = 1
        for a in shape[1:]:
            k *= a
        out.append(flat[:, i:i + k].reshape(shape))
        i += k
    return tuple(out)


def sites(problem: Problem, unravel, x, X=None):
    """Pre-activations of every kinked layer at flat parameters x, as (N, sites per point)."""
    X = problem.X if X is None else X
    zs = problem.model.kinks.pre(unravel(x), X)
    return jnp.concatenate([z.reshape(z.shape[0], -1) for z in zs], axis=1)


def apply(problem: Problem, params, offset, slope):
    """The model's outputs with derivative ``slope`` (N, sites; NaN: autodiff's) at every
    site and ``offset`` (scalar or (N, sites)) added to every activation output."""
    kinks = problem.model.kinks
    slopes = _split(problem, params, slope)
    if jnp.ndim(offset) == 0:
        offsets = (offset,) * kinks.layers
    else:
        offsets = _split(problem, params, offset)
    return kinks.apply(params, problem.X, slopes, offsets)


def start(problem: Problem, unravel, x0, capacity: int = CAPACITY):
    """The empty sliding set at x0: (mask (N, sites), DeepSliding)."""
    z = sites(problem, unravel, x0)
    k = min(capacity, z.size)
    mask = jnp.zeros(z.shape, bool)
    return mask, DeepSliding(jnp.full((k,), z.size, jnp.int64),
                             jnp.full(z.shape, jnp.nan, x0.dtype))


def _index(mask, k):
    return jnp.nonzero(mask.ravel(), size=k, fill_value=mask.size)[0].astype(jnp.int64)


def _rows(problem: Problem, unravel, idx, v):
    """grad z_s at flat v for the sites ``idx`` (padding rows 0): one single-point backward
    pass each. Returns (rows (K, P), z_S (K,), valid (K,))."""
    N, per = problem.n, None
    X = problem.X
    per = sites(problem, unravel, v, X[:1]).shape[1]
    valid = idx < N * per
    i = jnp.where(valid, idx, 0)
    n, loc = i // per, i % per

    def one(n, loc):
        def zs(y):
            return sites(problem, unravel, y, jax.lax.dynamic_slice_in_dim(X, n, 1))[0, loc]
        return jax.value_and_grad(zs)(v)

    zS, R = jax.vmap(one)(n, loc)
    return R * valid[:, None], zS * valid, valid


def tangent(problem: Problem, unravel, sl: DeepSliding, x) -> Tangent:
    """The tangent projector of the sliding set at x (any positive multiple of theta)."""
    R, _, valid = _rows(problem, unravel, sl.idx, x)
    return _factor(R, valid)


def _factor(R, valid):
    r = jnp.sqrt(jnp.sum(R * R, axis=1))
    ok = valid & (r > 0)
    Rn = R / jnp.where(ok, r, 1.0)[:, None]
    Gm = Rn @ Rn.T + jnp.diag(jnp.where(ok, _RIDGE, 1.0))
    return Tangent(Rn, jnp.where(ok, r, 1.0), jnp.linalg.cholesky(Gm))


def _coef(tg: Tangent, v):
    """c with P_T v = v - Rn^T c."""
    return jax.scipy.linalg.cho_solve((tg.chol, True), tg.Rn @ v)


def project(tg: Tangent, v):
    """Orthogonal projection of flat v onto the tangent space."""
    return v - tg.Rn.T @ _coef(tg, v)


def _onto(problem: Problem, unravel, idx, x, iters: int = 2):
    """x pulled onto {z_S = 0} (Gauss-Newton: x <- x - J^T (J J^T)^+ z_S) and renormalized."""
    for _ in range(iters):
        R, zS, valid = _rows(problem, unravel, idx, x)
        tg = _factor(R, valid)
        c = jax.scipy.linalg.cho_solve((tg.chol, True), zS / tg.r)
        x = x - tg.Rn.T @ c
        x = x / jnp.linalg.norm(x)
    return x


def gradient_and_cotangents(problem: Problem, unravel, apply, slope, x, tau):
    """(v, g, e) at v = e^tau x: g the gradient of -log L with derivative ``slope`` at the
    sites ``apply`` takes (``_apply_first``, ``deep.apply``), e = d(-log L)/d(offset) the
    cotangent at every site. One home for both sliding modes (``sliding._events`` too)."""
    def nll(v, o):
        out = apply(problem, unravel(v), o, slope)
        return -problem.loss.log_loss(problem.margin_terms_of(out)[1])

    v = jnp.exp(tau) * x
    return (v,) + tuple(jax.grad(nll, argnums=(0, 1))(v, jnp.zeros(slope.shape, x.dtype)))


def update_set(kink, mask, mask_t, cand, near, mu, e, hold_unit, slope_old, slope_t,
               per_axis=None):
    """The sliding set after an update, for both sliding modes (``sliding._events``, ``events``).

    A site with multiplier mu can be held if mu lies between 0 and (hi - lo) e (sigma =
    mu / e in [0, hi - lo]); a candidate only if, besides, e (hi - lo) < 0 (else both sides
    push away from it or through it: an unstable sliding mode). Of the members outside
    their bounds by more than min(1e-2, hold_unit / |e|) (hysteresis), the farthest one
    leaves: over all sites (``per_axis=None``) or per slice along ``per_axis`` (per neuron
    for the first layer). A released site keeps the bound its multiplier passed while it
    sits at z = 0. Returns (new mask, new slopes, ok, how far each member is out)."""
    bound = (kink.hi - kink.lo) * e
    ok = ((mu >= jnp.minimum(0.0, bound)) & (mu <= jnp.maximum(0.0, bound))
          & (mask | (bound < 0)))
    sigma = mu / jnp.where(e == 0, 1.0, e)
    excess = jnp.where(e == 0, jnp.inf, jnp.maximum(sigma - (kink.hi - kink.lo), -sigma))
    over = jnp.where(mask, jnp.maximum(excess, 0.0), 0.0)
    hold = jnp.minimum(1e-2, hold_unit / jnp.maximum(jnp.abs(e), 1e-300))
    excess = jnp.where(mask & ~ok & (excess > hold), excess, -1.0)
    top = (jnp.max(excess) if per_axis is None
           else jnp.max(excess, axis=per_axis, keepdims=True))
    released = (excess >= 0) & (excess == top)
    mask_n = mask_t & (ok | (mask & ~released)) & (mask | near)
    above = (e != 0) & (sigma > kink.hi - kink.lo)
    slope_n = jnp.where(mask_n, kink.lo,
                        jnp.where(released, jnp.where(above, kink.hi, kink.lo),
                                  jnp.where(cand, slope_old, slope_t)))
    return mask_n, slope_n, ok, over


def events(problem: Problem, unravel, mask, sl: DeepSliding, x, tau, cand, near, hold_unit):
    """``sliding._events`` for every layer's sites (same returns)."""
    kink = problem.model.kinks
    k = sl.idx.shape[0]
    # S holds at most k sites: candidates beyond the room left are not admitted
    room = k - jnp.sum(mask)
    cand = cand & (jnp.cumsum(cand.ravel()) <= room).reshape(cand.shape)
    mask_t = mask | cand
    slope_t = jnp.where(mask_t, kink.lo, sl.slope)
    idx_t = _index(mask_t, k)

    v, g_lo, e = gradient_and_cotangents(problem, unravel, apply, slope_t, x, tau)
    R, _, valid = _rows(problem, unravel, idx_t, v)
    tg = _factor(R, valid)
    mu_rows = -_coef(tg, g_lo) / tg.r
    mu = jnp.zeros(mask.size, x.dtype).at[idx_t].set(jnp.where(valid, mu_rows, 0.0),
                                                       mode="drop").reshape(mask.shape)
    # one release per update over all sites (every pair of sites is coupled)
    mask_n, slope_n, ok, over = update_set(kink, mask, mask_t, cand, near, mu, e, hold_unit,
                                           sl.slope, slope_t)
    idx_n = _index(mask_n, k)
    x_p = jax.lax.cond(jnp.any(mask_n), lambda: _onto(problem, unravel, idx_n, x),
                       lambda: x / jnp.linalg.norm(x))
    return mask_n, DeepSliding(idx_n, slope_n), x_p, cand & ok, e, over


def norms(problem: Problem, unravel, x, scale):
    """Per-site estimates of |grad z_s|^2 and of |grad z_s / scale|^2 (error units) at x,
    from ``_PROBES`` Rademacher probes (E (a . xi)^2 = |a|^2)."""
    xi = jax.random.rademacher(jax.random.PRNGKey(0), (_PROBES, x.shape[0]), x.dtype)

    def jv(d):
        return jax.jvp(lambda y: sites(problem, unravel, y), (x,), (d,))[1]

    b = jnp.mean(jax.vmap(jv)(xi) ** 2, axis=0)
    a = jnp.mean(jax.vmap(jv)(xi / scale) ** 2, axis=0)
    return b, a


def hit_times(z, zdot):
    """When each site's pre-activation z reaches 0 at the rate zdot (linear prediction):
    0 where z = 0, inf where it moves away or stands still."""
    return jnp.where(z * zdot < 0, -z / jnp.where(zdot == 0, 1.0, zdot),
                     jnp.where(z == 0, 0.0, jnp.inf))


def capture(problem: Problem, unravel, st, scale, h_max):
    """The first half of ``sliding._capture`` for every layer's sites: (mask, slide, x,
    feasible, e) after ``events``, and the candidates, near, hit times, jump and hold units
    from which ``sliding._capture`` cuts the step."""
    x0, tau, h, pt0, sl0, mask = st.x, st.tau, st.h, st.point, st.slide, st.mask
    P = x0.shape[0]
    z, zdot = jax.jvp(lambda y: sites(problem, unravel, y), (x0,), (pt0.F,))
    t_hit = hit_times(z, zdot)
    cand = ~mask & (t_hit <= h)
    b, a = norms(problem, unravel, x0, scale)
    b = jnp.maximum(b, 1e-300)
    sl0 = sl0._replace(slope=jnp.where(mask | (jnp.abs(z) <= 1e-12 * jnp.sqrt(b)),
                                       sl0.slope, jnp.nan))
    # the move onto z_s = 0 (error units, RMS) and a bound on its kick to the velocity
    # through the soft-min weights (``sliding._settle``): sum_m w_m |du_m| <=
    # e^tau |z| / |grad z| sum_m w_m |G_m|
    move = jnp.abs(z) / b * jnp.sqrt(a / P)
    G_w = pt0.w @ jnp.sqrt(jnp.sum(pt0.G ** 2, axis=1))
    kick = jnp.exp(tau) * jnp.abs(z) / jnp.sqrt(b) * G_w
    near = (move <= 1e-3) & (kick <= 1e-3)
    kink = problem.model.kinks
    jump_unit = (kink.hi - kink.lo) / pt0.s * jnp.sqrt(a / P)
    hold_unit = 0.2 / (h_max * jump_unit)
    return events(problem, unravel, mask, sl0, x0, tau, cand, near, hold_unit)[:5] + (
        cand, near, t_hit, jump_unit, hold_unit)
