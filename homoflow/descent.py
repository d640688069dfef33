"""Gradient descent and mini-batch SGD in one jitted loop, in the log domain.

The inner loop is a ``lax.while_loop`` over iterations (a full-batch step, or one SGD
epoch) with a traced trip count, so one compiled program serves every chunk length; the
Python side only loops over chunks, to record diagnostics on a log-spaced grid, update the
progress bar and stop cleanly. L, T = sum eta and eta are carried as logs: a step is
``theta <- theta - exp(log eta + log L) grad log L``.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .diagnostics import diagnostics, global_norm, tree_dot
from .geometry import inv_p, lp_columns_jit, sharpness_jit
from .kkt import kkt_columns
from .problem import Problem
from .schedules import Policy, T0Info, constant, optax_log_lr
from .trajectory import RunStopped, Trajectory, package_versions

# status codes of the loop
OK, NONFINITE_PARAMS, NONFINITE_LOSS, DIVERGED, STALLED = 0, 1, 2, 3, 4
_STATUS = {OK: "completed", NONFINITE_PARAMS: "nonfinite_params",
           NONFINITE_LOSS: "nonfinite_loss", DIVERGED: "diverged", STALLED: "stalled"}


class DescentState(NamedTuple):
    params: Any
    log_loss: jax.Array        # full-batch log L at params
    grad: Any                  # grad log L at params (full-batch GD; () otherwise)
    min_log_loss: jax.Array    # smallest log L seen (for divergence detection)
    step: jax.Array            # accepted iterations
    attempts: jax.Array        # all attempts, failed ones included
    fails: jax.Array           # consecutive failed attempts (retrying policies)
    log_T: jax.Array           # log sum eta
    log_lr: jax.Array          # log eta of the last accepted iteration
    policy_state: Any
    opt_state: Any
    t0: T0Info
    t0_step: jax.Array         # -1 until the run crosses log l(b_f)
    key: jax.Array
    status: jax.Array
    bad_step: jax.Array        # iteration at which status became non-zero


def _tree_axpy(a, x, y):
    return jax.tree_util.tree_map(lambda xi, yi: a * xi + yi, x, y)


def _sgd_epoch(problem: Problem, params, log_scale, key, batch_size: int, direction=None):
    """One epoch of mini-batch SGD: each step subtracts exp(log_scale + log L^_B) grad log L^_B,
    L^_B = (N/B) sum_{n in B} l(q_n) the batch estimate of the full loss (``direction``
    maps the gradient to a steepest-descent direction, ``geometry.steepest_direction``)."""
    n_batches = problem.n // batch_size
    perm = jax.random.permutation(key, problem.n)[: n_batches * batch_size]
    log_ratio = math.log(problem.n / batch_size)

    def one(p, idx):
        log_lb, g = jax.value_and_grad(lambda z: problem.subset(idx).log_loss(z))(p)
        g = g if direction is None else direction(g)
        return _tree_axpy(-jnp.exp(log_scale + log_lb + log_ratio), g, p), None

    params, _ = jax.lax.scan(one, params, perm.reshape(n_batches, batch_size))
    return params, n_batches


def _propose(problem, policy: Policy, batch_size, s: DescentState, key):
    """The candidate parameters of one attempt: (params, log eta, updates made, opt state)."""
    if policy.optimizer is not None:
        log_loss, g = jax.value_and_grad(problem.log_loss)(s.params)
        if policy.objective == "loss":
            g = jax.tree_util.tree_map(lambda x: jnp.exp(log_loss) * x, g)
        updates, opt_state = policy.optimizer.update(g, s.opt_state, s.params)
        return (jax.tree_util.tree_map(jnp.add, s.params, updates), optax_log_lr(s.opt_state),
                1, opt_state)
    log_lr = policy.log_lr(s.policy_state, s.log_loss, s.t0, problem.order)
    # steepest descent (``schedules.steepest``): d(grad L) = L d(grad log L), d 1-homogeneous
    direction = None if policy.direction is None else \
        (lambda g: policy.direction(s.policy_state, g))
    if batch_size is None:
        g = s.grad if direction is None else direction(s.grad)
        return _tree_axpy(-jnp.exp(log_lr + s.log_loss), g, s.params), log_lr, 1, s.opt_state
    params, n_updates = _sgd_epoch(problem, s.params, log_lr, key, batch_size, direction)
    return params, log_lr, n_updates, s.opt_state


def _verdict(policy: Policy, divergence_log_factor, s: DescentState, new_log_loss, params_ok):
    """(accepted, consecutive failures, status) of an attempt."""
    loss_ok = jnp.isfinite(new_log_loss)
    if policy.retry:  # the loss-based scheduler: accept decreases, back off otherwise
        accepted = params_ok & loss_ok & (new_log_loss < s.log_loss)
        fails = jnp.where(accepted, 0, s.fails + 1)
        return accepted, fails, jnp.where(fails > policy.max_retries, STALLED, OK)
    status = jnp.where(~params_ok, NONFINITE_PARAMS, jnp.where(~loss_ok, NONFINITE_LOSS, OK))
    blew_up = new_log_loss > s.min_log_loss + divergence_log_factor
    status = jnp.where((status == OK) & blew_up, DIVERGED, status)
    return status == OK, s.fails, status


def _attempt(problem, policy: Policy, batch_size, divergence_log_factor, log_t0_threshold,
             s: DescentState, update_t0: bool = True):
    """One attempt at an iteration; returns the next state.

    ``update_t0=False`` leaves ``t0`` for the caller to fill in at the crossing (t0_step is
    set as usual): under ``vmap`` the ``lax.cond`` below turns into a select that would
    evaluate phi(L(t0)) at every step, so ``homoflow.sweep`` evaluates it once per crossing.
    """
    # only SGD draws random batches; threefry costs ~1 us, so GD leaves the key alone
    key, sub = jax.random.split(s.key) if batch_size is not None else (s.key, s.key)
    new_params, log_lr, n_updates, opt_state = _propose(problem, policy, batch_size, s, sub)
    carry_grad = batch_size is None and policy.optimizer is None
    if carry_grad and policy.retry:
        # forward pass now; the backward pass only if the step is accepted (below)
        new_log_loss, pullback = jax.vjp(problem.log_loss, new_params)
    elif carry_grad:  # nearly every step is accepted: one fused forward-backward pass
        new_log_loss, new_grad = jax.value_and_grad(problem.log_loss)(new_params)
    else:
        new_log_loss = problem.log_loss(new_params)

    # one reduction serves both checks: ||theta||^2 is finite iff every entry is (and
    # rho has not overflowed), and it gives rho(t0) at the crossing
    sq_norm = tree_dot(new_params, new_params)
    accepted, fails, status = _verdict(policy, divergence_log_factor, s, new_log_loss,
                                       jnp.isfinite(sq_norm))
    pick = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(accepted, a, b), new, old)

    # the gradient at the new point is reused by the next step
    if carry_grad and policy.retry:
        new_grad = jax.lax.cond(accepted, lambda: pullback(jnp.ones_like(new_log_loss))[0],
                                lambda: s.grad)
    elif carry_grad:
        new_grad = pick(new_grad, s.grad)
    else:
        new_grad = ()
    step = s.step + accepted
    crossed = accepted & (s.t0_step < 0) & (new_log_loss < log_t0_threshold)
    return DescentState(
        params=pick(new_params, s.params),
        log_loss=jnp.where(accepted, new_log_loss, s.log_loss),
        grad=new_grad,
        min_log_loss=jnp.where(accepted, jnp.minimum(s.min_log_loss, new_log_loss), s.min_log_loss),
        step=step,
        attempts=s.attempts + 1,
        fails=fails,
        log_T=jnp.where(accepted, jnp.logaddexp(s.log_T, log_lr + math.log(n_updates)), s.log_T),
        log_lr=jnp.where(accepted, log_lr, s.log_lr),
        policy_state=policy.update(s.policy_state, accepted),
        opt_state=pick(opt_state, s.opt_state),
        # phi(L(t0)) costs a 4096-point integral: evaluated once, at the crossing (lax.cond
        # also measured faster here than selecting with jnp.where)
        t0=jax.lax.cond(crossed, lambda: T0Info.at(new_log_loss, 0.5 * jnp.log(sq_norm),
                                                   problem.order),
                        lambda: s.t0) if update_t0 else s.t0,
        t0_step=jnp.where(crossed, step, s.t0_step),
        key=key,
        status=status,
        bad_step=jnp.where(status != OK, s.step + 1, s.bad_step),
    )


def initial_state(problem: Problem, params0, policy: Policy, policy_state, key,
                  batch_size: int | None, log_t0: float) -> DescentState:
    """The loop state at iteration 0 (pure: ``homoflow.sweep`` vmaps it over parameters,
    policy states and keys). t0 is iteration 0 if log L(params0) < ``log_t0`` already."""
    log_loss0, grad0 = jax.value_and_grad(problem.log_loss)(params0)
    if batch_size is not None or policy.optimizer is not None:
        grad0 = ()
    nan = jnp.full_like(log_loss0, jnp.nan)
    past = log_loss0 < log_t0
    at = lambda: T0Info.at(log_loss0, jnp.log(global_norm(params0)), problem.order)
    if isinstance(past, jax.core.Tracer):  # traced (the sweep): a cond
        t0 = jax.lax.cond(past, at, lambda: T0Info(nan, nan, nan))
    else:  # eager (descent): an eager cond would compile at every call
        t0 = at() if bool(past) else T0Info(nan, nan, nan)
    return DescentState(
        params=params0, log_loss=log_loss0, grad=grad0, min_log_loss=log_loss0,
        step=jnp.asarray(0), attempts=jnp.asarray(0), fails=jnp.asarray(0),
        log_T=jnp.asarray(-jnp.inf), log_lr=nan, policy_state=policy_state,
        opt_state=policy.optimizer.init(params0) if policy.optimizer is not None else (),
        t0=t0, t0_step=jnp.where(past, 0, -1), key=key,
        status=jnp.asarray(OK), bad_step=jnp.asarray(-1))


@functools.lru_cache(maxsize=64)
def _make_advance(policy, batch_size, divergence_log_factor, log_t0_threshold):
    @jax.jit
    def advance(problem, state, n_iterations):
        target = state.step + n_iterations

        def cond(s):
            return (s.step < target) & (s.status == OK)

        def body(s):
            return _attempt(problem, policy, batch_size, divergence_log_factor,
                            log_t0_threshold, s)

        return jax.lax.while_loop(cond, body, state)

    return advance


def record_grid(steps: int, n_points: int = 200) -> np.ndarray:
    """Iterations at which diagnostics are recorded: 0, then log-spaced up to ``steps``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = np.unique(np.round(np.geomspace(1, steps, n_points)).astype(np.int64))
    return np.concatenate([[0], grid])


_record = jax.jit(diagnostics)


def descent(problem: Problem, params0, policy: Policy, steps: int, *,
            batch_size: int | None = None, key=None, n_records: int = 200,
            chunk: int = 2000, divergence_factor: float = 1e4, progress: bool = True,
            support_decades: float = 3.0, snapshots: bool = True,
            t0_log_loss: float | None = None, config: dict | None = None,
            record_at=None, on_record=None, kkt: bool = True, margin_norm=None,
            sharpness: bool = False, resume: Trajectory | None = None) -> Trajectory:
    """Run gradient descent (or SGD with ``batch_size``) for ``steps`` iterations.

    An iteration is one step of full-batch GD, or one epoch of SGD. Diagnostics are
    recorded at ``record_grid(steps, n_records)``. Non-retrying policies stop with
    ``RunStopped`` when the state turns non-finite or the loss exceeds
    ``divergence_factor`` times its smallest value so far; the loss-based policy backs off
    instead, and stops only after ``max_retries`` consecutive failures. ``RunStopped``
    carries the trajectory recorded so far, ending with the last good state. A run that
    never gets below the separability threshold l(b_f) completes with status
    "not_separated" and a warning: no margin claims hold for it.

    t0 is the first iterate with log L < ``t0_log_loss`` (default log l(b_f)); gamma_hat and
    the H(L) bound are built on L(t0) (Appendix E). Any t0 after separation is valid for
    Theorem E.2, and a later one (e.g. ``t0_log_loss=-5``) gives a far less pessimistic
    C_eta than L(t0) ~ 1, where gamma_hat(t0) ~ exp(-2 / log(1/L(t0))).

    ``record_at`` (increasing iterations in 1..steps) replaces the log-spaced grid, e.g.
    ``range(1, steps + 1)`` records every epoch. ``on_record(step, params, row)`` is called
    after each recorded row, with the parameters of that iteration: a hook for quantities
    the engine does not know (test accuracy, checkpoints) that needs no snapshots. If it
    returns True the run ends there, completed (``meta["stopped_by_hook"]`` is the step).

    With ``kkt`` every record also holds ``kkt_eps`` and ``kkt_delta``
    (``kkt.kkt_residual``: an NNLS on the smallest 256 constraints, a few ms per record).

    ``margin_norm=p`` (p in [1, inf]) adds the margins in the l_p norm
    (``geometry.lp_columns``: ``normalized_margin_p``, ``smoothed_margin_p``, their layer
    forms and ``log_norm_p``), the quantities l_p steepest descent maximizes.
    ``sharpness=True`` adds ``sharpness`` (top eigenvalue of hess L) and
    ``log_curvature`` (``geometry.sharpness``: Lanczos on Hessian-vector products).

    ``resume=traj`` continues a run that an ``on_record`` hook ended (e.g. an interrupted
    ``homoflow run``): ``traj.state`` is its loop state at its last row, and the arguments
    must be those of the original call. The result equals the uninterrupted run's bit for
    bit (the record grid and the chunks depend only on the step). The returned
    trajectory's ``state`` is the loop state at its last row.
    """
    if batch_size is not None:
        if not 1 <= int(batch_size) <= problem.n:
            raise ValueError(f"batch_size must be in 1..N = {problem.n}, got {batch_size}")
        batch_size = int(batch_size)
    log_t0 = problem.loss.log_threshold if t0_log_loss is None else float(t0_log_loss)
    if log_t0 > problem.loss.log_threshold:
        raise ValueError(f"t0_log_loss = {t0_log_loss} is above the separability threshold "
                         f"log l(b_f) = {problem.loss.log_threshold:.6g}")
    if not divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor}")
    ip = None if margin_norm is None else inv_p(margin_norm)
    key = jax.random.PRNGKey(0) if key is None else key
    params0 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params0)
    state = initial_state(problem, params0, policy, policy.init(), key, batch_size, log_t0)
    if not jnp.isfinite(state.log_loss):
        raise ValueError(f"the initial loss is not finite (log L = {float(state.log_loss)})")
    rows, snaps = [], []
    if resume is not None:
        state = _resumed_state(state, resume)
        if snapshots and resume.snapshots is None:
            raise ValueError("resume: the saved run has no snapshots; resume it with "
                             "snapshots=False, as it was run")
        rows, snaps = resume.rows(), resume.snapshot_list() if snapshots else []

    advance = _make_advance(policy, batch_size, math.log(divergence_factor), log_t0)
    start = time.perf_counter()

    def record(s: DescentState):
        d = _record(problem, s.params, s.t0.log_loss, support_decades)
        row = d.columns()
        row.update(step=int(s.step), attempts=int(s.attempts), log_T=float(s.log_T),
                   log_lr=float(s.log_lr),
                   separated=bool(d.log_loss < problem.loss.log_threshold))
        if kkt:
            row.update({k: float(v) for k, v in kkt_columns(problem, s.params).items()})
        if ip is not None:
            row.update({k: float(v) for k, v in lp_columns_jit(problem, s.params, ip).items()})
        if sharpness:
            sh = sharpness_jit(problem, s.params)
            row.update(sharpness=float(sh.sharpness), log_curvature=float(sh.log_curvature))
        rows.append(row)
        stop = on_record is not None and bool(on_record(int(s.step), s.params, row))
        if snapshots:
            snaps.append(jax.device_get(s.params))
        return stop

    hook_stop = None
    if resume is None:
        record(state)
    grid = record_grid(steps, n_records) if record_at is None else _checked_grid(record_at, steps)
    grid = grid[grid > int(state.step)]
    bar = tqdm(total=steps, initial=int(state.step), disable=not progress, unit="it",
               leave=False, mininterval=0.5, desc="compiling…")
    compiling = True
    for target in grid:
        while int(state.step) < target and int(state.status) == OK:
            n = int(min(target - int(state.step), chunk))
            before = int(state.step)
            state = advance(problem, state, jnp.asarray(n))
            if compiling:  # no ETA from a rate that includes compilation
                compiling = False
                bar.set_description_str("")
                bar.reset(total=steps)
                bar.initial = bar.n = bar.last_print_n = before
            bar.update(int(state.step) - before)
            bar.set_postfix(log10_loss=f"{float(state.log_loss) / math.log(10):.4g}")
        if int(state.status) != OK:
            break
        if record(state):
            hook_stop = int(state.step)
            break
    bar.close()

    status = _STATUS[int(state.status)]
    meta = {
        "engine": "descent", "policy": policy.name, "policy_config": policy.config,
        "batch_size": batch_size, "steps": steps, "config": config or {},
        "t0_step": int(state.t0_step) if int(state.t0_step) >= 0 else None,
        "log_loss_t0": float(state.t0.log_loss) if int(state.t0_step) >= 0 else None,
        "log_threshold": problem.loss.log_threshold, "t0_log_loss": log_t0,
        "model": problem.model.name,
        "order": problem.order, "layer_orders": list(problem.model.layer_orders),
        "loss": problem.loss.name, "n": problem.n, "versions": package_versions(),
        "margin_norm": None if margin_norm is None else float(margin_norm),
        "key": np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                          else key).tolist(),
    }
    if status != "completed":
        if not rows or rows[-1]["step"] != int(state.step):
            record(state)  # the last good state: nothing computed is lost
        meta["wall_time_s"] = time.perf_counter() - start
        message = _stop_message(int(state.status), int(state.bad_step), state, policy,
                                divergence_factor)
        meta.update(status=status, message=message, stopped_at_step=int(state.bad_step))
        raise RunStopped(message, Trajectory.from_rows(rows, snaps, meta), int(state.bad_step),
                         status)
    if float(state.min_log_loss) >= problem.loss.log_threshold:
        status = "not_separated"
        message = (f"the loss never fell below the separability threshold l(b_f) = "
                   f"exp({problem.loss.log_threshold:.6g}) in {steps} iterations "
                   f"(final log L = {float(state.log_loss):.6g}): the data were not separated, "
                   f"so no margin claim applies to this run")
        warnings.warn(message, stacklevel=2)
    else:
        done = steps if hook_stop is None else hook_stop
        message = f"completed {done} iterations; t0 at iteration {meta['t0_step']}"
        if hook_stop is not None:
            message += " (on_record ended the run)"
            meta["stopped_by_hook"] = hook_stop
        if meta["t0_step"] is None:
            message += f" (log L never fell below t0_log_loss = {log_t0:.6g})"
    meta.update(status=status, message=message, wall_time_s=time.perf_counter() - start)
    traj = Trajectory.from_rows(rows, snaps, meta)
    traj.state = state
    return traj


def _resumed_state(template: DescentState, resume: Trajectory) -> DescentState:
    """``resume.state`` (a DescentState, or its leaves as saved by ``Trajectory.save``)
    checked against the state this call would start from: same leaves, shapes, dtypes."""
    if resume.state is None:
        raise ValueError("resume: the trajectory carries no loop state (state.npz); only a "
                         "run that an on_record hook ended can be resumed")
    leaves, treedef = jax.tree_util.tree_flatten(template)
    saved = resume.state if isinstance(resume.state, list) else \
        jax.tree_util.tree_leaves(resume.state)
    if len(saved) != len(leaves) or any(
            np.shape(a) != np.shape(b) or np.asarray(a).dtype != np.asarray(b).dtype
            for a, b in zip(saved, leaves)):
        raise ValueError(f"resume: the saved loop state ({len(saved)} arrays) does not fit "
                         f"this problem and policy ({len(leaves)} arrays): resume with the "
                         f"run's own configuration")
    state = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(a) for a in saved])
    if int(state.step) != int(resume["step"][-1]):
        raise ValueError(f"resume: the loop state is at iteration {int(state.step)} but the "
                         f"last recorded row at {int(resume['step'][-1])}")
    return state


def _checked_grid(record_at, steps: int) -> np.ndarray:
    grid = np.asarray(record_at, np.int64).ravel()
    if grid.size == 0 or grid[0] < 1 or grid[-1] > steps or np.any(np.diff(grid) <= 0):
        raise ValueError(f"record_at must be increasing iterations in 1..steps = {steps}, "
                         f"got {grid[:5].tolist()}...{grid[-3:].tolist()}")
    return np.concatenate([[0], grid])


def _stop_message(code, bad_step, state, policy, divergence_factor):
    at = f"at iteration {bad_step}"
    if code == NONFINITE_PARAMS:
        return f"the parameters became non-finite (NaN/inf) {at}; the step size is too large"
    if code == NONFINITE_LOSS:
        return f"log L became non-finite {at}; the step size is too large"
    if code == DIVERGED:
        return (f"the loss blew up {at}: it rose above {divergence_factor:g} times its smallest "
                f"value so far (log L was {float(state.min_log_loss):.6g}); policy "
                f"{policy.name} {policy.config} makes gradient descent diverge, use a smaller step")
    return (f"the loss-based scheduler failed to decrease the loss in {policy.max_retries} "
            f"consecutive retries {at} (log L = {float(state.log_loss):.6g})")


def euler(problem: Problem, params0, dt: float, steps: int, **kwargs) -> Trajectory:
    """Fixed-step explicit Euler for the gradient flow in original time: exactly gradient
    descent with step dt (``descent`` with ``constant(dt)``), labelled as a flow
    discretization."""
    traj = descent(problem, params0, constant(dt), steps, **kwargs)
    traj.meta["engine"] = "flow-euler"
    return traj
