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

Clarke selection: autodiff's (see ``homoflow.models``): ReLU'(0) = 0, leaky ReLU'(0) =
slope, max-pool's cotangent goes to one maximal element of each window.
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

# status codes of the log-polar loop
OK, NONFINITE, NOT_RADIAL, STEP_UNDERFLOW, MAX_STEPS, NOT_SEPARATED = 0, 1, 2, 3, 4, 5
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


def _per_point_neg_log_loss(problem: Problem, params):
    """u_n = f(q~_n): log L = LSE(-u)."""
    return problem.loss.f(problem.margin_terms(params)[1])


def _field(problem, unravel, x, tau) -> PolarPoint:
    """The direction field at (x, tau) with the Jacobian G of the per-point log losses."""
    v = jnp.exp(tau) * x
    u, pullback = jax.vjp(lambda z: _per_point_neg_log_loss(problem, unravel(z)), v)
    G = jax.vmap(pullback)(jnp.eye(u.shape[0], dtype=u.dtype))[0]
    log_loss = logsumexp(-u)
    w = jax.nn.softmax(-u)
    g = w @ G
    s = x @ g
    return PolarPoint(g / s - x, G, w, g, s, log_loss, tau - log_loss - jnp.log(s))


def _field_only(problem, unravel, x, tau) -> jax.Array:
    log_loss_grad = jax.grad(lambda z: problem.log_loss(unravel(z)))(jnp.exp(tau) * x)
    g = -log_loss_grad
    return g / (x @ g) - x


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


def _ros2_step(problem, unravel, st: PolarState, rtol, atol, h_max):
    """One attempted ROS2 step of size st.h; returns the next state."""
    x, tau, h, pt = st.x, st.tau, st.h, st.point
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
    k2 = solve(_field_only(problem, unravel, x_stage, tau + h) - 2.0 * k1
               - _ROS2_GAMMA * h * F_tau)
    x_new = x + h * (1.5 * k1 + 0.5 * k2)
    x_new = x_new / jnp.linalg.norm(x_new)
    err = jnp.sqrt(jnp.mean((0.5 * h * (k1 + k2) / (atol + rtol * jnp.abs(x))) ** 2))
    new_pt = _field(problem, unravel, x_new, tau + h)

    finite = jnp.all(jnp.isfinite(x_new)) & jnp.isfinite(new_pt.phi) & jnp.isfinite(err)
    accepted = finite & (err <= 1.0) & (new_pt.s > 0)
    factor = jnp.clip(0.9 * jnp.where(finite & (err > 0), err, 1e-10) ** -0.5, 0.2, 4.0)
    h_next = jnp.minimum(jnp.where(finite, h * factor, 0.25 * h), h_max)
    log_t_new = jnp.logaddexp(st.log_t, _log_integral_exp_linear(pt.phi, new_pt.phi, h))
    status = jnp.where(finite & (err <= 1.0) & (new_pt.s <= 0), NOT_RADIAL, OK)
    status = jnp.where(h_next < 1e-14, jnp.where(finite, STEP_UNDERFLOW, NONFINITE), status)
    pick = lambda a, b: jax.tree_util.tree_map(lambda u, v: jnp.where(accepted, u, v), a, b)
    return PolarState(
        x=jnp.where(accepted, x_new, x), tau=jnp.where(accepted, tau + h, tau),
        log_t=jnp.where(accepted, log_t_new, st.log_t), h=h_next, point=pick(new_pt, pt),
        steps=st.steps + accepted, rejected=st.rejected + (~accepted), status=status,
        energy=st.energy + jnp.where(accepted, jnp.sum((x_new - x) ** 2) / h, 0.0))


def _polar_loop(problem: Problem, unravel, st: PolarState, log_t_stop, tau_stop, log_loss_stop,
                max_steps, rtol, atol, h_max) -> PolarState:
    """ROS2 steps until a stop condition or a failure (pure; jit and vmap freely)."""
    def cond(s):
        return ((s.status == OK) & (s.log_t < log_t_stop) & (s.tau < tau_stop)
                & (s.point.log_loss > log_loss_stop) & (s.steps < max_steps))

    return jax.lax.while_loop(cond, lambda s: _ros2_step(problem, unravel, s, rtol, atol, h_max),
                              st)


def _polar_start(problem: Problem, unravel, flat_t0, log_t0) -> PolarState:
    rho = jnp.linalg.norm(flat_t0)
    x0, tau0 = flat_t0 / rho, jnp.log(rho)
    return PolarState(x0, tau0, jnp.asarray(log_t0, jnp.float64), jnp.asarray(1e-3),
                      _field(problem, unravel, x0, tau0), jnp.asarray(0), jnp.asarray(0),
                      jnp.asarray(OK), jnp.asarray(0.0))


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


@partial(jax.jit, static_argnames=("unravel", "rtol", "atol", "h_max"))
def _advance(problem: Problem, st: PolarState, log_t_stop, tau_stop, log_loss_stop, max_steps,
             *, unravel, rtol, atol, h_max) -> PolarState:
    return _polar_loop(problem, unravel, st, log_t_stop, tau_stop, log_loss_stop, max_steps,
                       rtol, atol, h_max)


_diagnostics_jit = jax.jit(diagnostics)


class _Recorder:
    """Diagnostics (the one shared function) at saved points, plus solver statistics."""

    def __init__(self, problem: Problem, snapshots: bool, kkt: bool):
        self.problem, self.snapshots, self.kkt = problem, snapshots, kkt
        self.rows, self.snaps = [], []
        self._diag = _diagnostics_jit

    def __call__(self, params, log_t, phase, steps, rejected, wall, energy=math.nan):
        d = self._diag(self.problem, params)
        row = d.columns()
        row["path_energy"] = energy
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


def flow(problem: Problem, params0, *, log_t_max: float | None = 20.0,
         tau_max: float | None = None, log_loss_min: float | None = None,
         n_saves: int = 200, save_t=None, t0_limit: float = 1e6, rtol: float = 1e-6,
         atol: float = 1e-9, polar_rtol: float = 1e-6, polar_atol: float = 1e-6,
         h_max: float = 0.01, max_steps: int = 1_000_000, max_wall_s: float | None = None,
         progress: bool = True, snapshots: bool = True, kkt: bool = True,
         config: dict | None = None) -> Trajectory:
    """Simulate gradient flow from ``params0`` and record diagnostics.

    Stops at the first of: log t >= ``log_t_max``, tau = log rho >= ``tau_max``,
    log L <= ``log_loss_min``, or (checked at saved points of phase 2) ``max_wall_s``
    seconds of wall time (status "wall_budget"). ``h_max`` caps the step in tau: the
    direction lags the flow by O(h^2) (on a linear model 1 - beta plateaus near
    4e-8 (h_max / 0.02)^4: 2.4e-5, 4e-8, 1.7e-10 at h_max = 0.1, 0.02, 0.005), and a
    decade of log t takes about 1.15 / (L h_max) steps at most on a kink-free model.

    Phase 1 saves at ``save_t`` (default: 40 log-spaced times in (0, t0_limit]) until t0;
    phase 2 saves at the first accepted step at or past each of ``n_saves`` log-spaced values of log t between log t0 and ``log_t_max`` (or of tau when
    only ``tau_max`` is given). Columns are those of ``descent`` (``log_T`` is log t, ``step``
    counts accepted solver steps; tau is ``log_rho``) plus ``phase``, ``rejected``, ``wall_s``,
    ``path_energy`` (phase 2: sum of ||Delta theta_hat||^2 / Delta tau over accepted steps,
    the simulated path's int (beta^-2 - 1) d tau since t0, for Lemma C.9's check),
    and (with ``kkt``) ``kkt_eps``/``kkt_delta`` of ``kkt.kkt_residual``.

    Data that never separate stop at ``t0_limit`` with status "not_separated" and a
    warning. A solver failure (diffrax's result code in phase 1; step-size underflow,
    non-finite values or <theta_hat, -grad L> <= 0 in phase 2) raises ``RunStopped``
    carrying every point saved so far.
    """
    if log_t_max is None and tau_max is None and log_loss_min is None:
        raise ValueError("give at least one of log_t_max, tau_max, log_loss_min")
    start = time.perf_counter()
    params0 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params0)
    flat0, unravel = _ravel(params0)
    rec = _Recorder(problem, snapshots, kkt)
    meta = {"engine": "flow", "model": problem.model.name, "order": problem.order,
            "layer_orders": list(problem.model.layer_orders), "loss": problem.loss.name,
            "n": problem.n, "log_threshold": problem.loss.log_threshold,
            "config": config or {}, "versions": package_versions(),
            "stop": {"log_t_max": log_t_max, "tau_max": tau_max, "log_loss_min": log_loss_min},
            "solver": {"phase1": "Tsit5 + PIDController", "phase2": "ROS2 W-method (rank-N)",
                       "rtol": rtol, "atol": atol, "polar_rtol": polar_rtol,
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
    st = _polar_start(problem, unravel, flat_t0, log_t0)
    tau0 = st.tau
    if not float(st.point.s) > 0:
        raise ValueError(f"<theta_hat, -grad L> = {float(st.point.s):.3g} <= 0 at t0 = {t0:g}; "
                         f"impossible for a homogeneous model past t0: check the model's order")
    advance = partial(_advance, unravel=unravel, rtol=polar_rtol, atol=polar_atol, h_max=h_max)
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
        st = advance(problem, st, jnp.asarray(lt_stop), jnp.asarray(ta_stop),
                     jnp.asarray(ll_stop), jnp.asarray(max_steps))
        status = int(st.status)
        if status == OK and int(st.steps) >= max_steps:
            status = MAX_STEPS
        bar.update(1)
        if int(st.steps) == last_steps and status == OK:
            continue  # this mark was passed by the last step already
        last_steps = int(st.steps)
        rec(unravel(jnp.exp(st.tau) * st.x), float(st.log_t), 2,
            p1["steps"] + int(st.steps), p1["rejected"] + int(st.rejected),
            time.perf_counter() - start, float(st.energy))
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
               polar_rtol: float = 1e-6, polar_atol: float = 1e-6, h_max: float = 0.01,
               max_steps: int = 100_000) -> list[Trajectory]:
    """Gradient flow from a batch of initial parameters (leading axis) in one jitted,
    vmapped call: phase 1 (diffrax, with its Event) and phase 2 (ROS2 in log-polar time)
    are pure functions of one initial point, and ``jax.vmap`` batches them.

    Saves the state at t0 and at the first step at or past each of ``n_saves`` log-spaced
    values of log t in [1, log_t_max], shared by all seeds. Returns one Trajectory per
    seed (columns as ``flow``; ``meta["status"]`` per seed). A vmapped call gives the same
    numbers as separate calls (the test checks 1e-12).
    """
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
        st = _polar_start(problem, unravel, flat_t0, jnp.log(t0))
        st = st._replace(status=jnp.where(separated, st.status, NOT_SEPARATED))

        def save(st, mark):
            st = _polar_loop(problem, unravel, st, mark, jnp.inf, -jnp.inf, max_steps,
                             polar_rtol, polar_atol, h_max)
            return st, (jnp.exp(st.tau) * st.x, st.log_t, st.steps, st.rejected, st.status,
                        st.energy)

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
    L = problem.order

    def log_smoothed(x, tau):
        return jnp.log(problem.loss.inverse(problem.log_loss(unravel(jnp.exp(tau) * x)))) - L * tau

    F = _field_only(problem, unravel, x, tau)
    _, rate = jax.jvp(log_smoothed, (x, tau), (F, jnp.ones_like(tau)))
    g = -jax.grad(lambda z: problem.log_loss(unravel(z)))(flat)
    beta = (x @ g) / jnp.linalg.norm(g)
    return {"dlog_smoothed_dtau": rate, "speed2": F @ F, "beta": beta}


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
