"""Phase 2's integrator: ROS2, a Rosenbrock W-method in log-polar time, and its controller.

ROS2 is a two-stage, second-order Rosenbrock W-method (Verwer et al. 1999) with an embedded
first-order error estimate, whose W = I - gamma h J uses exactly the rank-N Gauss-Newton
part of the Jacobian (``polar``'s docstring): every solve is a Woodbury solve with an N x N
LU factorization, O(P N^2) per step instead of O(P^3). The direction is projected back onto
the unit sphere after each step; log t is accumulated by exact integration of exp(phi) for
phi linear on each step.

Error control (``_ros2_step``, configured by ``PolarConfig``). Besides ROS2's embedded
estimate, a step's error counts every move onto a captured kink, a kink held in S past the
point where its multiplier left its bounds, a kink crossed inside the step (the field jumps
there; ``sliding._capture``/``_settle``), and the disagreement between two values of Lemma
C.9's integral int |F|^2 d tau on the step: the end-corrected trapezoid (with d|F|^2/d tau
from a JVP) and the chord |Delta theta_hat|^2 / h. C.9's slack is L (r - 1)(1 + |F|^2),
r - 1 = (soft-min entropy) / log(1/L) for the exponential loss, so it falls to ~1e-3 of the
integral as the loss falls and the integral must be solved for, not sampled. Past
e^{L tau} = ``stiff_ref`` the tolerances shrink like e^{-L tau}.

The fast-slow split (DESIGN §3; ``PolarConfig.u_tol``, experimental, off by default).
With u_n the per-point log losses (u_n = e^{L tau} q_n(x) for the exponential loss),
w = softmax(-u) and G = du/dtheta, the Jacobian of F is dominated by
-(e^tau / s) P G^T M G, M = diag w - w w^T: rank < |support|, eigenvalues
lambda ~ e^{L tau}. The fast variables are the differences of u on the support (the range
of M G), O(1) on the slow manifold; the slow ones are x's motion along ker(M G). An error
d in x reaches the velocity only through the weights: du = e^tau G d, dw = M du,
dF = P G^T dw / s, so |dF| / |F| <~ sum_n w_n |du_n|. Shrinking every coordinate's
tolerance like e^{-L tau} (``stiff_ref``) buys that bound by over-resolving all P - rank
slow directions; the split keeps the position tolerance fixed (``stiff_ref = inf``) and
adds the bound itself, sum_n w_n |e^tau G_n est| <= ``u_tol``, on the step's error
estimate ``est`` (optionally filtered by W^{-1}, ``filter_error``: Shampine's filter damps
a component relaxing at rate lambda by 1 / (1 + gamma h lambda), as the L-stable step
does). Lemma C.9's integrand |F|^2 is then accurate to ~2 u_tol relative, but the
trapezoid's end correction uses d|F|^2/dtau from a JVP, which at a point off the slow
manifold by d carries ~lambda^2 d; in this mode the plain trapezoid is used (error
h^3 f''/12 of the slow dynamics, checked against the chord as before).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from ..problem import Problem
from .polar import (NONFINITE, NOT_RADIAL, OK, STEP_UNDERFLOW, PolarPoint, PolarState,
                    _field, _field_only, _log_smoothed_of, _speed_rate)
from ._checks import _finite_at_least, _tolerances
from .sliding import _capture, _settle

_ROS2_GAMMA = 1.0 + 1.0 / math.sqrt(2.0)


@dataclass(frozen=True)
class PolarConfig:
    """Phase 2's step control, validated when made; hashable, so one compiled solver serves
    every run with equal settings.

    ``rtol``/``atol``: tolerances on theta_hat (per coordinate, atol + rtol |theta_hat_i|)
    until the soft-min's sharpness e^{L tau} reaches ``stiff_ref``; from there they shrink
    like e^{-L tau} (``math.inf`` keeps them fixed). ``h_max``: the largest step in tau.
    """
    rtol: float = 1e-6
    atol: float = 1e-6
    h_max: float = 0.01
    stiff_ref: float = math.inf
    # the fast-slow treatment (experimental): also bound the step's error in the per-point
    # log losses u as the soft-min weights feel it, sum_n w_n |e^tau G_n . err| <= u_tol
    # (the velocity's relative error), so that stiff_ref can stay inf; None: off
    u_tol: float | None = None
    # filter the embedded error estimate through W^{-1} (Shampine's stiff error filter: a
    # component relaxing at rate lambda is damped by 1 / (1 + gamma h lambda), as the
    # step's own solution damps it); False: the raw estimate
    filter_error: bool = False

    def __post_init__(self):
        rtol, atol = _tolerances("polar ", self.rtol, self.atol)
        h_max = _finite_at_least("h_max", self.h_max, 0.0, True)
        try:
            stiff_ref = float(self.stiff_ref)
        except (TypeError, ValueError):
            stiff_ref = math.nan
        if not stiff_ref > 0:
            raise ValueError(f"stiff_ref must be > 0 (math.inf keeps phase 2's tolerances "
                             f"fixed), got {self.stiff_ref!r}")
        if self.u_tol is not None:
            object.__setattr__(self, "u_tol", _finite_at_least("u_tol", self.u_tol, 0.0, True))
        for name, v in (("rtol", rtol), ("atol", atol), ("h_max", h_max),
                        ("stiff_ref", stiff_ref)):
            object.__setattr__(self, name, v)


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


def _ros2_step(problem: Problem, unravel, st: PolarState, cfg: PolarConfig) -> PolarState:
    """One attempted ROS2 step of size at most st.h; returns the next state.

    With kinks (``st.slide``), the kinks the velocity reaches within the step are tested
    first and the step may be cut at the first (``sliding._capture``); kinks still crossed
    during the step are tested at its end (``sliding._settle``). Every move onto a kink
    counts as error, and so do a kink crossed inside the step (a rejected step retries with
    the step that ends just past it), a member of S held past its release and the C.9
    quadrature's disagreement with the step's chord (see the module docstring).
    """
    x0, tau, h, pt0, sl0 = st.x, st.tau, st.h, st.point, st.slide
    # the stiff directions turn a position error d into a velocity error ~ e^{L tau} d (the
    # soft-min's sharpness): past e^{L tau} = stiff_ref the tolerances shrink like e^{-L tau}
    # so that F, hence beta and Lemma C.9's integrand, stay as accurate as before
    scale = (cfg.atol + cfg.rtol * jnp.abs(x0)) * jnp.minimum(
        1.0, cfg.stiff_ref * jnp.exp(-problem.order * tau))
    x, pt, sl, mask, jump, h_eff = x0, pt0, sl0, st.mask, 0.0, h
    if sl0 is not None:
        cap = _capture(problem, unravel, st, scale, cfg.h_max)
        mask, sl, x, h_eff, jump = cap.mask, cap.slide, cap.x, cap.h, cap.jump
        pt = jax.lax.cond(cap.moved, lambda: _field(problem, unravel, x, tau, sl), lambda: pt0)
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
    est = 0.5 * h * (k1 + k2)
    if cfg.filter_error:
        est = solve(est)
    err = jnp.sqrt(jnp.mean((est / scale) ** 2))
    if cfg.u_tol is not None:
        du = jnp.exp(tau) * (pt.G @ est)
        err = jnp.maximum(err, (pt.w @ jnp.abs(du)) / cfg.u_tol)
    x_step, sl_step, mask_step = x_new, sl, mask
    h_land = h
    if sl0 is not None:
        mask, sl, x_new, jump, h_land = _settle(problem, unravel, cap, x, x_new, tau, h,
                                                pt.G, pt.w, scale)
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
    if cfg.u_tol is not None:
        # fast-slow mode: d|F|^2/dtau from the JVP at a point off the slow manifold by the
        # step's position error d carries lambda^2 d (lambda ~ e^{L tau}, the fast rate), so
        # the end correction is dropped: the plain trapezoid, whose error h^3 f''/12 comes
        # from the slow dynamics; |F|^2 itself is accurate to the velocity's u_tol
        trap = h * f2
    chord = jnp.sum((x_step - x) ** 2) / h
    c9_rhs = (_log_smoothed_of(problem, new_pt.log_loss, tau + h)
              - _log_smoothed_of(problem, pt.log_loss, tau)) / problem.order
    c9_rhs = jnp.where(jnp.isfinite(c9_rhs), c9_rhs, 0.0)  # at t0, L = l(b_f): gamma~ = 0
    err = jnp.maximum(err, jnp.abs(trap - chord) / (
        1e-2 * (trap + chord) + 1e-3 * cfg.h_max * f2
        + 0.1 * jnp.maximum(c9_rhs - jnp.maximum(trap, chord), 0.0)
        + 2.2e-16 * math.sqrt(x0.shape[0]) * 10.0 * jnp.sqrt(f2) + 1e-300))
    finite = jnp.all(jnp.isfinite(x_new)) & jnp.isfinite(new_pt.phi) & jnp.isfinite(err)
    accepted = finite & (err <= 1.0) & (new_pt.s > 0)
    factor = jnp.clip(0.9 * jnp.where(finite & (err > 0), err, 1e-10) ** -0.5, 0.2, 4.0)
    h_next = jnp.where(finite, h * factor, 0.25 * h)
    h_next = jnp.where(finite & (err > 1.0) & (h_land < h), jnp.maximum(h_land, 0.2 * h), h_next)
    # a step cut short at a kink says nothing against the step it was cut from
    h_next = jnp.minimum(jnp.where(h_cut & accepted, jnp.maximum(h_next, st.h), h_next),
                         cfg.h_max)
    log_t_new = jnp.logaddexp(st.log_t, _log_integral_exp_linear(pt.phi, new_pt.phi, h))
    status = jnp.where(finite & (err <= 1.0) & (new_pt.s <= 0), NOT_RADIAL, OK)
    status = jnp.where(h_next < 1e-14, jnp.where(finite, STEP_UNDERFLOW, NONFINITE), status)
    pick = lambda a, b: jax.tree_util.tree_map(lambda u, v: jnp.where(accepted, u, v), a, b)
    return PolarState(
        x=jnp.where(accepted, x_new, x0), tau=jnp.where(accepted, tau + h, tau),
        log_t=jnp.where(accepted, log_t_new, st.log_t), h=h_next, point=pick(new_pt, pt0),
        steps=st.steps + accepted, rejected=st.rejected + (~accepted),
        status=status.astype(jnp.int64),
        energy=st.energy + jnp.where(accepted, jnp.sum((x_new - x0) ** 2) / h, 0.0),
        speed_int=st.speed_int + jnp.where(accepted, trap, 0.0),
        mask=pick(mask, st.mask), slide=pick(sl, st.slide))




def _polar_loop(problem: Problem, unravel, st: PolarState, log_t_stop, tau_stop, log_loss_stop,
                max_steps, cfg: PolarConfig) -> PolarState:
    """ROS2 steps until a stop condition or a failure (pure; jit and vmap freely)."""
    def cond(s):
        return ((s.status == OK) & (s.log_t < log_t_stop) & (s.tau < tau_stop)
                & (s.point.log_loss > log_loss_stop) & (s.steps < max_steps))

    return jax.lax.while_loop(cond, lambda s: _ros2_step(problem, unravel, s, cfg), st)


@partial(jax.jit, static_argnames=("unravel", "config"))
def _advance(problem: Problem, st: PolarState, log_t_stop, tau_stop, log_loss_stop, max_steps,
             *, unravel, config: PolarConfig) -> PolarState:
    return _polar_loop(problem, unravel, st, log_t_stop, tau_stop, log_loss_stop, max_steps,
                       config)
