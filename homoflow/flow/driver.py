"""The flow's drivers: ``flow`` (one run, saved rows, wall budget, progress) and
``flow_batch`` (a vmapped batch of initializations in one jitted call). Both run phase 1
(``phase1``) to t0 and then phase 2 (``ros2`` on the ``polar`` field) and name their
columns in one place (``audit._solver_columns``)."""

from __future__ import annotations

import functools
import math
import time
import warnings
from functools import partial

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from tqdm.auto import tqdm

from ..diagnostics import diagnostics
from ..kkt import kkt_columns
from ..problem import Problem
from ..trajectory import RunStopped, Trajectory, package_versions
from .audit import _polar_summary, _Recorder, _solver_columns
from .phase1 import _LOG_LOSS_MAX, Phase1Config, _phase1, _phase1_jit
from .polar import (MAX_STEPS, NONFINITE, NOT_RADIAL, NOT_SEPARATED, OK, PHASE1_FAILED,
                    STEP_UNDERFLOW, _STATUS, _polar_start, _polar_start_jit, _ravel)
from .ros2 import PolarConfig, _advance, _polar_loop
from .sliding import _sliding_model

_CHUNK = 2000  # phase-2 steps between checks of flow's wall budget


def _one_blas_thread(fn):
    """Run ``fn`` with the BLAS/LAPACK thread pools (OpenBLAS behind jaxlib's CPU linear
    algebra) limited to one thread, restored afterwards. Phase 2 factors small matrices
    every step (N x N LU, K x K Cholesky); OpenBLAS's threads on them only contend: on a
    shared 2-core machine a 256 x 256 Cholesky took 0.66 s with the default pool and 1.9 ms
    with one thread (threadpoolctl; a no-op where it is not installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with threadpool_limits(limits=1, user_api="blas"):
            return fn(*args, **kwargs)
    return wrapped


def _f64(v):
    # the stop values and counts _advance takes are strongly typed, so that every call
    # (python floats, numpy scalars) hits the same compiled program
    return jnp.asarray(v, jnp.float64)


def _i64(v):
    return jnp.asarray(v, jnp.int64)


def _compile(problem, flat0, unravel, p1_cfg, cfg, grid, sliding, phase1: bool):
    """Compile (or find in jit's cache) phase 1, the polar start, the ROS2 loop and Lemma
    5.1's check for these shapes: phase 1 ahead of time, the others by a call that does no
    work (zero steps)."""
    if phase1:
        _phase1_jit.lower(problem, flat0, unravel=unravel, cfg=p1_cfg, save_t=grid).compile()
    st = _polar_start_jit(problem, unravel, flat0, _f64(0.0), sliding)
    _advance(problem, st, _f64(0.0), _f64(0.0), _f64(0.0), _i64(0), unravel=unravel,
             config=cfg)
    jax.block_until_ready(_polar_summary(problem, st, unravel))


def _loss_floor(problem: Problem, unravel, ts, ys) -> dict:
    """Whether phase 1 ended on a loss floor (non-separable data) rather than a slow
    descent: over the last decade of t the flow's loss falls like 1/t on separable data
    (Theorem A.5: log L drops by about log 10 per decade of t once it separates), while on
    data it cannot separate L converges to min L > l(b_f) and log L stops moving. ``at_floor``:
    log L fell by less than 1e-3 over the last decade of t (or the last saved tenth of the
    solve), with |grad log L| and log L's fall reported as the evidence."""
    t_end, y_end = float(ts[-1]), jnp.asarray(ys[-1])
    log_loss, grad = jax.value_and_grad(lambda z: problem.log_loss(unravel(z)))(y_end)
    log_loss, gnorm = float(log_loss), float(jnp.linalg.norm(grad))
    earlier = np.nonzero(ts <= t_end / 10)[0]
    j = earlier[-1] if len(earlier) else 0
    t_ref = float(ts[j])
    fall = float(problem.log_loss(unravel(jnp.asarray(ys[j])))) - log_loss
    at_floor = bool(len(ts) > 1 and t_ref < t_end and fall < 1e-3)
    return {"log_loss": log_loss, "grad_log_loss_norm": gnorm, "t_ref": t_ref,
            "log_loss_fall": fall, "at_floor": at_floor,
            "evidence": (f"log L fell by only {fall:.3g} from t = {t_ref:.3g} to {t_end:.3g} "
                         f"and |grad log L| = {gnorm:.3g}: the loss is at its floor"
                         if at_floor else
                         f"log L was still falling ({fall:.3g} since t = {t_ref:.3g}), "
                         f"|grad log L| = {gnorm:.3g}")}


@_one_blas_thread
def flow(problem: Problem, params0, *, log_t_max: float | None = 20.0,
         tau_max: float | None = None, log_loss_min: float | None = None,
         n_saves: int = 200, save_t=None, t0_limit: float = 1e6, rtol: float = 1e-6,
         atol: float = 1e-9, polar_rtol: float = 1e-6, polar_atol: float = 1e-6,
         stiff_ref: float = 1e5, u_tol: float | None = None, filter_error: bool = False,
         h_max: float = 0.01,
         max_steps: int = 1_000_000,
         max_wall_s: float | None = None, sliding: bool = True, progress: bool = True,
         snapshots: bool = True, kkt: bool = True, config: dict | None = None,
         on_record=None) -> Trajectory:
    """Simulate gradient flow from ``params0`` and record diagnostics.

    Stops at the first of: log t >= ``log_t_max``, tau = log rho >= ``tau_max``,
    log L <= ``log_loss_min``, or (checked at saved points of phase 2) ``max_wall_s``
    seconds of wall time (status "wall_budget"), counted from the end of compilation: the
    run first compiles its programs on the real shapes (``meta["compile_time_s"]``; near 0
    when the same model was flowed before), and ``meta["wall_time_s"]`` is the rest.
    ``h_max`` caps the step in tau: the direction lags the flow by O(h^2) (on a linear model
    1 - beta plateaus near 4e-8 (h_max / 0.02)^4: 2.4e-5, 4e-8, 1.7e-10 at h_max = 0.1,
    0.02, 0.005), and a decade of log t takes about 1.15 / (L h_max) steps at most on a kink-free model.
    ``polar_rtol``/``polar_atol`` are phase 2's tolerances on theta_hat until the soft-min's
    sharpness e^{L tau} reaches ``stiff_ref`` (log t ~ 1e4 on the default problem); from
    there they shrink like e^{-L tau}: the stiff directions turn a position error d into a
    velocity error ~ e^{L tau} d, and Lemma C.9's slack shrinks as the soft-min sharpens
    (``stiff_ref=math.inf`` keeps them fixed). ``u_tol`` (experimental, default off) also
    bounds each step's error in the per-point log losses as the soft-min weights feel it
    (``PolarConfig``), the fast-slow treatment meant to replace that shrinking.

    Phase 1 saves at ``save_t`` (default: 40 log-spaced times in (0, t0_limit]) until t0;
    phase 2 saves at the first accepted step at or past each of ``n_saves`` log-spaced
    values of log t between log t0 and ``log_t_max`` (or of tau when only ``tau_max`` is
    given). Columns are those of ``descent`` (``log_T`` is log t, ``step``
    counts accepted solver steps; tau is ``log_rho``) plus ``phase``, ``rejected``, ``wall_s``,
    ``path_energy`` (phase 2: sum of ||Delta theta_hat||^2 / Delta tau over accepted steps,
    the simulated path's int (beta^-2 - 1) d tau since t0, for Lemma C.9's check;
    ``speed_integral``: the same integral by the end-corrected trapezoid rule on
    |d theta_hat / d tau|^2 over the solver's steps, an error-controlled part of the solve),
    and (with ``kkt``) ``kkt_eps``/``kkt_delta`` of ``kkt.kkt_residual``.

    ``sliding`` (default True) makes phase 2 follow the minimum-norm Clarke velocity on a
    model with declared kinks (see ``homoflow.flow.sliding``); phase-2 rows then also carry
    ``flow_beta`` (beta of the velocity followed), ``sliding`` (kinks in the sliding set),
    and Lemma 5.1's sides along that velocity, ``dlog_smoothed_dtau`` and ``speed2``
    (||d theta_hat / d tau||^2).

    ``on_record(step, params, row)`` is called after each recorded row (as in ``descent``;
    ``step`` counts accepted solver steps of both phases, phase-1 rows come once phase 1 has
    finished): if it returns True the run ends there, completed
    (``meta["stopped_by_hook"]`` is that step). ``progress`` shows a bar in log10(log t)
    (in tau when only ``tau_max`` is given), updated every few thousand steps.

    Data that never separate stop at ``t0_limit`` with status "not_separated" and a
    warning. A solver failure (diffrax's result code in phase 1; step-size underflow,
    non-finite values or <theta_hat, -grad L> <= 0 in phase 2) raises ``RunStopped``
    carrying every point saved so far.
    """
    if log_t_max is None and tau_max is None and log_loss_min is None:
        raise ValueError("give at least one of log_t_max, tau_max, log_loss_min")
    p1_cfg = Phase1Config(rtol=rtol, atol=atol, t0_limit=t0_limit, max_steps=max_steps)
    cfg = PolarConfig(rtol=polar_rtol, atol=polar_atol, h_max=h_max, stiff_ref=stiff_ref,
                      u_tol=u_tol, filter_error=filter_error)
    compile_start = time.perf_counter()
    params0 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params0)
    flat0, unravel = _ravel(params0)
    rec = _Recorder(problem, snapshots, kkt, unravel, on_record)
    meta = {"engine": "flow", "model": problem.model.name, "order": problem.order,
            "layer_orders": list(problem.model.layer_orders), "loss": problem.loss.name,
            "n": problem.n, "log_threshold": problem.loss.log_threshold,
            "config": config or {}, "versions": package_versions(),
            "stop": {"log_t_max": log_t_max, "tau_max": tau_max, "log_loss_min": log_loss_min},
            "solver": {"phase1": "Tsit5 + PIDController", "phase2": "ROS2 W-method (rank-N)",
                       "sliding": sliding and _sliding_model(problem), "rtol": rtol,
                       "atol": atol, "polar_rtol": polar_rtol, "stiff_ref": stiff_ref,
                       "polar_atol": polar_atol, "u_tol": u_tol,
                       "filter_error": filter_error}}
    lt_max = math.inf if log_t_max is None else float(log_t_max)
    tau_stop = math.inf if tau_max is None else float(tau_max)
    ll_stop = -math.inf if log_loss_min is None else float(log_loss_min)

    log_loss0 = float(problem.log_loss(params0))
    grid = np.asarray(save_t if save_t is not None else
                      np.geomspace(t0_limit * 1e-8, t0_limit, 40), np.float64)
    # compile every program the run uses, on its real shapes, before the wall budget starts
    # (a no-op the second time: jit's cache holds them)
    _compile(problem, flat0, unravel, p1_cfg, cfg, grid, sliding,
             phase1=problem.loss.log_threshold <= log_loss0 <= _LOG_LOSS_MAX)
    rec(params0, -math.inf, 1, 0, 0, 0.0)  # compiles the diagnostics (and KKT)
    start = time.perf_counter()
    meta["compile_time_s"] = start - compile_start

    def stopped_by_hook(where):
        meta.update(status="completed", stopped_by_hook=rec.stopped_at,
                    wall_time_s=time.perf_counter() - start,
                    message=f"{where} (on_record ended the run at step {rec.stopped_at})")
        return Trajectory.from_rows(rec.rows, rec.snaps, meta)

    if rec.stopped_at is not None:
        return stopped_by_hook("stopped at t = 0")

    def phase1_failed(t_end, cause):
        meta.update(status="phase1_failed", wall_time_s=time.perf_counter() - start,
                    message=f"the original-time solve failed at t = {t_end:g}: {cause}")
        return RunStopped(meta["message"], Trajectory.from_rows(rec.rows, rec.snaps, meta),
                          meta["phase1"]["steps"], "phase1_failed")

    if log_loss0 < problem.loss.log_threshold:
        t0, flat_t0, p1 = 0.0, flat0, {"steps": 0, "rejected": 0}
    elif not log_loss0 <= _LOG_LOSS_MAX:
        meta["phase1"] = {"steps": 0, "rejected": 0}
        raise phase1_failed(0.0, f"log L(theta_0) = {log_loss0:.6g}: the field "
                                 f"exp(log L) grad log L overflows float64 (above log L = "
                                 f"{_LOG_LOSS_MAX:g}); start from a smaller loss")
    else:
        sol = _phase1_jit(problem, flat0, unravel=unravel, cfg=p1_cfg, save_t=grid)
        p1 = {"steps": int(sol.stats["num_accepted_steps"]),
              "rejected": int(sol.stats["num_rejected_steps"]), "result": str(sol.result)}
        meta["phase1"] = p1
        ts, ys = np.asarray(sol.ts), np.asarray(sol.ys)
        # saves past the end of the solve (event or failure) are inf; the last finite
        # entry is the state at the end (SaveAt(t1=True)); t = 0 is recorded already
        done = np.isfinite(ts) & np.all(np.isfinite(ys), axis=1) & (ts > 0)
        ts, ys = ts[done], ys[done]
        for t, y in zip(ts, ys):
            if rec(unravel(jnp.asarray(y)), math.log(t), 1, p1["steps"], p1["rejected"],
                   time.perf_counter() - start):
                return stopped_by_hook(f"stopped in phase 1 at t = {t:g}")
        if p1["steps"] == 0 or len(ts) == 0:
            raise phase1_failed(float(ts[-1]) if len(ts) else 0.0,
                                f"no step was accepted ({p1['rejected']} rejected; diffrax "
                                f"result: {sol.result!r})")
        t_end = float(ts[-1])
        flat_t0 = jnp.asarray(ys[-1])
        floor = _loss_floor(problem, unravel, ts, ys)
        if sol.result == diffrax.RESULTS.successful or (
                sol.result == diffrax.RESULTS.max_steps_reached and floor["at_floor"]):
            # reached t0_limit, or ran out of steps on a loss that stopped falling, without
            # separating
            short = ("" if not math.isfinite(lt_max) or lt_max <= math.log(t_end) else
                     f"; phase 1 {'ended at its time cap t0_limit' if sol.result == diffrax.RESULTS.successful else 'ran out of steps'} "
                     f"at log t = {math.log(t_end):.4g}, short of the requested log t = "
                     f"{lt_max:g}" + ("" if floor["at_floor"] else
                                      " (raise t0_limit to look further)"))
            meta.update(status="not_separated", t0=None, wall_time_s=time.perf_counter() - start,
                        phase1_floor=floor,
                        message=f"the loss never fell below the separability threshold "
                                f"l(b_f) = exp({problem.loss.log_threshold:.6g}) by t = {t_end:g} "
                                f"(log L = {floor['log_loss']:.6g}; {floor['evidence']}): the "
                                f"data were not separated, so no margin claim applies{short}")
            warnings.warn(meta["message"], stacklevel=2)
            return Trajectory.from_rows(rec.rows, rec.snaps, meta)
        if sol.result != diffrax.RESULTS.event_occurred:
            raise phase1_failed(t_end, f"diffrax result {sol.result!r} after {p1['steps']} "
                                       f"accepted and {p1['rejected']} rejected steps")
        t0 = t_end
    meta["t0"] = t0
    meta["log_loss_t0"] = float(problem.log_loss(unravel(flat_t0)))

    # ---- phase 2: log-polar time
    log_t0 = math.log(t0) if t0 > 0 else -math.inf  # separated at t = 0: t grows from 0
    st = _polar_start_jit(problem, unravel, flat_t0, _f64(log_t0), sliding)
    tau0 = st.tau
    if not float(st.point.s) > 0:
        raise ValueError(f"<theta_hat, -grad L> = {float(st.point.s):.3g} <= 0 at t0 = {t0:g}; "
                         f"impossible for a homogeneous model past t0: check the model's order")
    advance = partial(_advance, unravel=unravel, config=cfg)
    if log_t_max is not None:
        lo = max(log_t0, 1e-3)
        marks = np.geomspace(max(lo, 1e-3), max(lt_max, lo * 1.0001), n_saves)[1:]
        key = "log_t"
    else:
        marks = np.linspace(float(tau0), tau_stop if np.isfinite(tau_stop) else float(tau0) + 10,
                            n_saves)[1:]
        key = "tau"
    # the bar's unit is a decade of log t (or a unit of tau)
    if key == "log_t":
        origin = math.log10(max(log_t0, 1e-3))
        position = lambda st: max(math.log10(max(float(st.log_t), 1e-300)) - origin, 0.0)
        total = math.log10(max(lt_max, 1e-3)) - origin
    else:
        position = lambda st: float(st.tau - tau0)
        total = float(marks[-1] - tau0)
    bar = tqdm(total=round(total, 3), disable=not progress, unit="decade" if key == "log_t"
               else "tau", leave=False, mininterval=0.5,
               bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} {unit} [{elapsed}{postfix}]")

    def show(st):
        bar.n = round(min(position(st), bar.total), 3)
        bar.set_postfix(log_t=f"{float(st.log_t):.4g}", steps=int(st.steps), refresh=True)
    status, last_steps, out_of_time, pace = OK, -1, False, 0.0
    for mark in marks:
        lt_stop = min(mark, lt_max) if key == "log_t" else lt_max
        ta_stop = min(mark, tau_stop) if key == "tau" else tau_stop
        while True:  # in chunks of steps, so that the wall budget is checked in between
            # a chunk is at most _CHUNK steps and about a tenth of the budget at the last
            # chunk's pace (a slow model, e.g. a CNN at ~1 s a step, would overrun by
            # _CHUNK steps)
            chunk = _CHUNK
            if max_wall_s is not None and pace > 0:
                chunk = int(min(_CHUNK, max(10, 0.1 * max_wall_s / pace)))
            cap = min(max_steps, int(st.steps) + chunk)
            attempts0, t_chunk = int(st.steps) + int(st.rejected), time.perf_counter()
            st = advance(problem, st, _f64(lt_stop), _f64(ta_stop), _f64(ll_stop), _i64(cap))
            done = int(st.steps) + int(st.rejected) - attempts0
            if done > 0:
                pace = (time.perf_counter() - t_chunk) / done
            status = int(st.status)
            show(st)
            if status != OK or int(st.steps) < cap or cap >= max_steps or (
                    max_wall_s is not None and time.perf_counter() - start >= max_wall_s):
                break
        if status == OK and int(st.steps) >= max_steps:
            status = MAX_STEPS
        if int(st.steps) == last_steps and status == OK:
            continue  # this mark was passed by the last step already
        last_steps = int(st.steps)
        hook = rec(unravel(jnp.exp(st.tau) * st.x), float(st.log_t), 2,
                   p1["steps"] + int(st.steps), p1["rejected"] + int(st.rejected),
                   time.perf_counter() - start, float(st.energy), st)
        if hook and status == OK:
            break
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
    if rec.stopped_at is not None:
        return stopped_by_hook(f"reached log t = {float(st.log_t):.6g}, "
                               f"tau = {float(st.tau):.6g}")
    meta.update(status="wall_budget" if out_of_time else "completed",
                message=f"reached log t = {float(st.log_t):.6g}, tau = {float(st.tau):.6g}"
                + (f" when the wall budget of {max_wall_s:g} s ran out" if out_of_time else ""))
    return Trajectory.from_rows(rec.rows, rec.snaps, meta)


# one compiled program per model and shape across flow_batch calls (DESIGN §1)
_diagnostics_batch = jax.jit(jax.vmap(diagnostics, (None, 0)))
_kkt_batch = jax.jit(jax.vmap(kkt_columns, (None, 0)))


@_one_blas_thread
def flow_batch(problem: Problem, params0, *, log_t_max: float = 20.0, n_saves: int = 50,
               t0_limit: float = 1e6, rtol: float = 1e-6, atol: float = 1e-9,
               polar_rtol: float = 1e-6, polar_atol: float = 1e-6, stiff_ref: float = 1e5,
               u_tol: float | None = None, filter_error: bool = False, h_max: float = 0.01,
               max_steps: int = 100_000, sliding: bool = True,
               kkt: bool = True) -> list[Trajectory]:
    """Gradient flow from a batch of initial parameters (leading axis) in one jitted,
    vmapped call: phase 1 (diffrax, with its Event) and phase 2 (ROS2 in log-polar time)
    are pure functions of one initial point, and ``jax.vmap`` batches them.

    Saves the state at t0 and at the first step at or past each of ``n_saves`` log-spaced
    values of log t in [1, log_t_max], shared by all seeds. Returns one Trajectory per
    seed (columns as ``flow``, the KKT columns only with ``kkt``; ``meta["status"]`` per
    seed). On kink-free models a vmapped call gives the same numbers as separate calls
    (the test checks 1e-10). With sliding kinks, batched kernels round differently in the
    last bits and the solver's discrete decisions (which kink enters or leaves the sliding
    set at which step) can differ, so batched and separate runs agree only to the solve's
    accuracy (measured: normalized margins to ~1e-4 at log t = 100 on a width-20 ReLU
    net).
    """
    p1_cfg = Phase1Config(rtol=rtol, atol=atol, t0_limit=t0_limit, max_steps=max_steps)
    cfg = PolarConfig(rtol=polar_rtol, atol=polar_atol, h_max=h_max, stiff_ref=stiff_ref,
                      u_tol=u_tol, filter_error=filter_error)
    leaves = jax.tree_util.tree_leaves(params0)
    batch = leaves[0].shape[0]
    first = jax.tree_util.tree_map(lambda p: jnp.asarray(p[0], jnp.float64), params0)
    _, unravel = _ravel(first)
    flat0 = jax.vmap(lambda p: ravel_pytree(p)[0])(
        jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64), params0))
    marks = jnp.geomspace(1.0, max(float(log_t_max), 1.0 + 1e-9), n_saves)
    threshold = problem.loss.log_threshold

    def one(flat):
        sol = _phase1(problem, flat, unravel, p1_cfg, None)
        log_loss0 = problem.log_loss(unravel(flat))
        already = log_loss0 < threshold
        separated = already | (sol.result == diffrax.RESULTS.event_occurred)
        # phase 1 ends at t0_limit (not separated), at t0, or fails (see ``flow``)
        failed = ~already & ((log_loss0 > _LOG_LOSS_MAX) | (
            ~separated & (sol.result != diffrax.RESULTS.successful))
            | (sol.stats["num_accepted_steps"] == 0))
        t0 = jnp.where(already, 0.0, sol.ts[-1])
        flat_t0 = jnp.where(already, flat, sol.ys[-1])
        st = _polar_start(problem, unravel, flat_t0, jnp.log(t0), sliding)
        st = st._replace(status=jnp.where(failed, PHASE1_FAILED, jnp.where(
            separated, st.status, NOT_SEPARATED)))

        def save(st, mark):
            st = _polar_loop(problem, unravel, st, mark, jnp.inf, -jnp.inf, max_steps, cfg)
            return st, (jnp.exp(st.tau) * st.x, st.log_t, st.steps, st.rejected, st.status,
                        st.energy, _polar_summary(problem, st, unravel))

        _, saved = jax.lax.scan(save, st, marks)
        return t0, flat_t0, sol.stats["num_accepted_steps"], saved

    t0, flat_t0, p1_steps, saved = jax.jit(jax.vmap(one))(flat0)
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
        d = _diagnostics_batch(problem, params)
        columns = d.columns()
        if kkt:
            columns.update({k: np.asarray(v) for k, v in _kkt_batch(problem, params).items()})
        # the t0 record (first) has no polar state: its velocity is the autodiff one
        first = {"flow_beta": columns["beta"][0], "sliding": 0, "dlog_smoothed_dtau": math.nan,
                 "speed2": math.nan, "speed_integral": 0.0}
        polar = {k: np.concatenate([[first[k]], np.asarray(v[b])])[keep]
                 for k, v in saved[6].items()}
        columns.update(_solver_columns(problem, columns["log_loss"], step=steps[keep],
                                       rejected=rejected[keep], log_t=log_t[keep], phase=2,
                                       path_energy=energy[keep], polar=polar))
        status = int(np.asarray(saved[4][b])[-1])
        meta = {"engine": "flow_batch", "model": problem.model.name, "order": problem.order,
                "loss": problem.loss.name, "n": problem.n, "seed_index": b,
                "t0": float(t0[b]), "phase1": {"steps": int(p1_steps[b])},
                "status": _STATUS[status],
                "versions": package_versions()}
        out.append(Trajectory(columns, jax.device_get(params), meta))
    return out


