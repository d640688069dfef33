"""Gradient descent and mini-batch SGD in one jitted loop, in the log domain.

The inner loop is a ``lax.while_loop`` over iterations (a full-batch step, or one SGD
epoch) with a traced trip count, so one compiled program serves every chunk length; the
Python side only loops over chunks, to record diagnostics on a log-spaced grid, update the
progress bar and stop cleanly. L, T = sum eta and eta are carried as logs: a step is
``theta <- theta - exp(log eta + log L) grad log L``.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from .diagnostics import diagnostics, global_norm, log_phi, tree_dot
from .geometry import inv_p, lp_columns_jit, sharpness_jit
from .kkt import kkt_columns
from .problem import Problem
from .schedules import Policy, T0Info, constant, optax_log_lr
from .trajectory import RunStopped, Trajectory, package_versions

# status codes of the loop (``status_name``); RUNNING means "no reason to stop"
RUNNING, NONFINITE_PARAMS, NONFINITE_LOSS, DIVERGED, STALLED, FROZEN, FLOAT64_EXHAUSTED = range(7)
_NAMES = {RUNNING: "completed", NONFINITE_PARAMS: "nonfinite_params",
          NONFINITE_LOSS: "nonfinite_loss", DIVERGED: "diverged", STALLED: "stalled",
          FROZEN: "frozen", FLOAT64_EXHAUSTED: "float64_exhausted"}
# statuses that end a run with an error (``RunStopped``); the others are honest endings
ERRORS = ("nonfinite_params", "nonfinite_loss", "diverged", "stalled")
# a loss-based stall after an accepted step that lowered log L by at most this many float64
# spacings of log L is float64's limit, not the scheduler's (``_verdict``)
_RESOLUTION_SPACINGS = 1024.0


def status_name(code) -> str:
    """The status string of a loop status code (``DescentState.status``)."""
    return _NAMES[int(code)]


class StepConfig(NamedTuple):
    """Static settings of a descent step (hashable: a jit static argument); build it with
    ``step_config``, which validates them."""
    log_t0: float                          # t0 is the first iterate with log L below this
    batch_size: int | None = None          # None: full-batch GD; else SGD epochs
    log_divergence: float = math.log(1e4)  # stop when log L > its minimum + this


def step_config(problem: Problem, *, batch_size: int | None = None,
                divergence_factor: float = 1e4, t0_log_loss: float | None = None) -> StepConfig:
    """Validated ``StepConfig``: t0 threshold (default log l(b_f)), batch size, divergence."""
    if batch_size is not None:
        if not 1 <= int(batch_size) <= problem.n:
            raise ValueError(f"batch_size must be in 1..N = {problem.n}, got {batch_size}")
        batch_size = int(batch_size)
    log_t0 = problem.loss.log_threshold if t0_log_loss is None else float(t0_log_loss)
    if not log_t0 <= problem.loss.log_threshold:
        raise ValueError(f"t0_log_loss = {t0_log_loss} is above the separability threshold "
                         f"log l(b_f) = {problem.loss.log_threshold:.6g}")
    if not divergence_factor > 1:
        raise ValueError(f"divergence_factor must be > 1, got {divergence_factor}")
    return StepConfig(log_t0, batch_size, math.log(divergence_factor))


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
    t0: T0Info                 # log_phi NaN while pending (``settle_t0``)
    t0_step: jax.Array         # -1 until the run crosses the t0 threshold
    key: jax.Array
    status: jax.Array
    bad_step: jax.Array        # iteration at which status became non-zero
    last_gain: jax.Array       # log L decrease of the last accepted step
    overflowed: jax.Array      # a candidate of the current retry streak was non-finite


def _tree_axpy(a, x, y):
    return jax.tree_util.tree_map(lambda xi, yi: a * xi + yi, x, y)


def _sgd_epoch(problem: Problem, params, log_base, offset, key, batch_size: int,
               direction=None):
    """One epoch of mini-batch SGD: each step subtracts exp(log_base + (log L^_B - offset))
    grad log L^_B, L^_B = (N/B) sum_{n in B} l(q_n) the batch estimate of the full loss
    (``direction`` maps the gradient to a steepest-descent direction,
    ``geometry.steepest_direction``). A policy with a ``log_scale`` passes log alpha and
    offset = log L (the step alpha (L^_B / L) grad log L^_B); the others log eta and 0."""
    n_batches = problem.n // batch_size
    perm = jax.random.permutation(key, problem.n)[: n_batches * batch_size]
    log_ratio = math.log(problem.n / batch_size)

    def one(p, idx):
        log_lb, g = jax.value_and_grad(lambda z: problem.subset(idx).log_loss(z))(p)
        g = g if direction is None else direction(g)
        return _tree_axpy(-jnp.exp(log_base + (log_lb - offset) + log_ratio), g, p), None

    params, _ = jax.lax.scan(one, params, perm.reshape(n_batches, batch_size))
    return params, n_batches


def _radial(problem, s: DescentState, batch_size):
    """<theta_hat, -grad log L> at the current iterate (a jvp where no gradient is carried)."""
    if batch_size is None:
        dot = tree_dot(s.params, s.grad)
    else:
        dot = jax.jvp(problem.log_loss, (s.params,), (s.params,))[1]
    return -dot / global_norm(s.params)


def _propose(problem, policy: Policy, batch_size, s: DescentState, key):
    """The candidate of one attempt: (params, log eta, updates made, opt state, policy state)."""
    if policy.optimizer is not None:
        log_loss, g = jax.value_and_grad(problem.log_loss)(s.params)
        if policy.objective == "loss":
            g = jax.tree_util.tree_map(lambda x: jnp.exp(log_loss) * x, g)
        # optax's own arithmetic mixes dtypes (Adam's bias correction forms decay ** count
        # with an int32 count), which strict promotion refuses: standard promotion for the
        # optimizer's call only; homoflow's own arithmetic stays strict-clean
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = policy.optimizer.update(g, s.opt_state, s.params)
        return (jax.tree_util.tree_map(jnp.add, s.params, updates), optax_log_lr(s.opt_state),
                1, opt_state, s.policy_state)
    pstate = s.policy_state
    if policy.limit is not None and policy.retry and batch_size is not None:
        # a retry's alpha is its streak's first, capped at these same params, divided by
        # r_d: it satisfies the cap already, and the cap's radial derivative (a full-batch
        # jvp, as costly as two forward passes) is computed once per accepted iterate
        # (measured: ~3.3 attempts per epoch on the paper-CNN)
        pstate = jax.lax.cond(s.fails == 0,
                              lambda: policy.limit(pstate, _radial(problem, s, batch_size)),
                              lambda: pstate)
    elif policy.limit is not None:
        pstate = policy.limit(pstate, _radial(problem, s, batch_size))
    log_scale, log_lr = policy.step_logs(pstate, s.log_loss, s.t0, problem.order)
    # steepest descent (``schedules.steepest``): d(grad L) = L d(grad log L), d 1-homogeneous
    direction = None if policy.direction is None else \
        (lambda g: policy.direction(pstate, g))
    if batch_size is None:
        g = s.grad if direction is None else direction(s.grad)
        return _tree_axpy(-jnp.exp(log_scale), g, s.params), log_lr, 1, s.opt_state, pstate
    base, offset = (log_lr, 0.0) if policy.log_scale is None else (log_scale, s.log_loss)
    params, n_updates = _sgd_epoch(problem, s.params, base, offset, key, batch_size, direction)
    return params, log_lr, n_updates, s.opt_state, pstate


def _unchanged(new, old) -> jax.Array:
    """True when every parameter is bitwise equal: the update fell below float64's spacing."""
    leaves = [jnp.all(a == b) for a, b in zip(jax.tree_util.tree_leaves(new),
                                              jax.tree_util.tree_leaves(old))]
    return jnp.all(jnp.stack(leaves))


def _verdict(policy: Policy, config: StepConfig, s: DescentState, new_log_loss, params_ok,
             frozen):
    """(accepted, consecutive failures, status, a candidate of the streak overflowed)."""
    loss_ok = jnp.isfinite(new_log_loss)
    if policy.retry:  # the loss-based scheduler: accept decreases, back off otherwise
        accepted = params_ok & loss_ok & (new_log_loss < s.log_loss)
        fails = jnp.where(accepted, 0, s.fails + 1)
        overflowed = ~accepted & (s.overflowed | ~params_ok | ~loss_ok)
        # a stall after steps that float64 could barely resolve, or after candidates that
        # left its range, is float64's limit, not the scheduler's
        spacing = jnp.abs(jnp.spacing(s.log_loss))
        exhausted = overflowed | (s.last_gain <= _RESOLUTION_SPACINGS * spacing)
        status = jnp.where(fails > policy.max_retries,
                           jnp.where(exhausted, FLOAT64_EXHAUSTED, STALLED), RUNNING)
        return accepted, fails, status, overflowed
    status = jnp.where(~params_ok, NONFINITE_PARAMS, jnp.where(~loss_ok, NONFINITE_LOSS, RUNNING))
    blew_up = new_log_loss > s.min_log_loss + config.log_divergence
    status = jnp.where((status == RUNNING) & blew_up, DIVERGED, status)
    status = jnp.where((status == RUNNING) & frozen, FROZEN, status)
    return status == RUNNING, s.fails, status, s.overflowed


def attempt(problem: Problem, policy: Policy, config: StepConfig,
            s: DescentState) -> DescentState:
    """One attempt at an iteration (pure; jit and vmap freely); returns the next state.

    At the iteration that crosses the t0 threshold it records t0's loss and norm and leaves
    phi(L(t0)) pending (NaN) for ``settle_t0``. ``step`` does both; a vmapped caller can
    instead run ``settle_t0`` under one ``lax.cond`` for the whole batch (phi costs a
    4096-point integral, which vmap of a cond would evaluate at every step).
    """
    batch_size = config.batch_size
    # only SGD draws random batches; threefry costs ~1 us, so GD leaves the key alone
    key, sub = jax.random.split(s.key) if batch_size is not None else (s.key, s.key)
    new_params, log_lr, n_updates, opt_state, pstate = _propose(problem, policy, batch_size,
                                                                s, sub)
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
    # a retrying policy rejects an unchanged candidate anyway (its loss did not decrease)
    frozen = jnp.asarray(False) if policy.retry else _unchanged(new_params, s.params)
    accepted, fails, status, overflowed = _verdict(policy, config, s, new_log_loss,
                                                   jnp.isfinite(sq_norm), frozen)
    pick = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(accepted, a, b), new, old)

    # the gradient at the new point is reused by the next step
    if carry_grad and policy.retry:
        new_grad = jax.lax.cond(accepted, lambda: pullback(jnp.ones_like(new_log_loss))[0],
                                lambda: s.grad)
    elif carry_grad:
        new_grad = pick(new_grad, s.grad)
    else:
        new_grad = ()
    step_ = s.step + accepted.astype(s.step.dtype)
    crossed = accepted & (s.t0_step < 0) & (new_log_loss < config.log_t0)
    pending = T0Info(new_log_loss, 0.5 * jnp.log(sq_norm), jnp.full_like(new_log_loss, jnp.nan))
    return DescentState(
        params=pick(new_params, s.params),
        log_loss=jnp.where(accepted, new_log_loss, s.log_loss),
        grad=new_grad,
        min_log_loss=jnp.where(accepted, jnp.minimum(s.min_log_loss, new_log_loss), s.min_log_loss),
        step=step_,
        attempts=s.attempts + 1,
        fails=fails,
        log_T=jnp.where(accepted, jnp.logaddexp(s.log_T, log_lr + math.log(n_updates)), s.log_T),
        log_lr=jnp.where(accepted, log_lr, s.log_lr),
        policy_state=policy.update(pstate, accepted),
        opt_state=pick(opt_state, s.opt_state),
        t0=jax.tree_util.tree_map(lambda a, b: jnp.where(crossed, a, b), pending, s.t0),
        t0_step=jnp.where(crossed, step_, s.t0_step),
        key=key,
        status=jnp.asarray(status, s.status.dtype),  # strong, as the carry
        bad_step=jnp.where(status != RUNNING, s.step + 1, s.bad_step),
        last_gain=jnp.where(accepted, s.log_loss - new_log_loss, s.last_gain),
        overflowed=overflowed,
    )


def t0_pending(s: DescentState) -> jax.Array:
    """True where the run has crossed t0 but phi(L(t0)) is not computed yet."""
    return (s.t0_step >= 0) & jnp.isnan(s.t0.log_phi)


def settle_t0(s: DescentState, order: float) -> DescentState:
    """Fill in phi(L(t0)) (Appendix E.2) where ``t0_pending`` (pure). It evaluates the
    integral unconditionally: call it under a ``lax.cond`` on ``t0_pending`` (``step``)."""
    phi = log_phi(-s.t0.log_loss, -s.t0.log_loss, order)
    return s._replace(t0=s.t0._replace(log_phi=jnp.where(t0_pending(s), phi, s.t0.log_phi)))


def step(problem: Problem, policy: Policy, config: StepConfig, s: DescentState) -> DescentState:
    """One attempt (``attempt``) and, at the crossing, t0's phi (``settle_t0``)."""
    s = attempt(problem, policy, config, s)
    return jax.lax.cond(t0_pending(s), lambda: settle_t0(s, problem.order), lambda: s)


def init(problem: Problem, params0, policy: Policy, config: StepConfig, key,
         policy_state=None) -> DescentState:
    """The loop state at iteration 0 (pure; jit and vmap over parameters, policy states and
    keys). ``policy_state`` defaults to ``policy.init()``. t0 is iteration 0 if
    log L(params0) is already below the t0 threshold."""
    policy_state = policy.init() if policy_state is None else policy_state
    log_loss0, grad0 = jax.value_and_grad(problem.log_loss)(params0)
    if config.batch_size is not None or policy.optimizer is not None:
        grad0 = ()
    nan = jnp.full_like(log_loss0, jnp.nan)
    past = log_loss0 < config.log_t0
    t0 = T0Info(jnp.where(past, log_loss0, nan),
                jnp.where(past, jnp.log(global_norm(params0)), nan), nan)
    s = DescentState(
        params=params0, log_loss=log_loss0, grad=grad0, min_log_loss=log_loss0,
        step=jnp.asarray(0), attempts=jnp.asarray(0), fails=jnp.asarray(0),
        log_T=jnp.full_like(log_loss0, -jnp.inf), log_lr=nan, policy_state=policy_state,
        opt_state=policy.optimizer.init(params0) if policy.optimizer is not None else (),
        t0=t0, t0_step=jnp.where(past, 0, -1), key=key,
        status=jnp.asarray(RUNNING), bad_step=jnp.asarray(-1),
        last_gain=jnp.full_like(log_loss0, jnp.inf), overflowed=jnp.asarray(False))
    # strong dtypes throughout: the loop's carry then has one signature whether it comes
    # from here or from a previous chunk (weak Python-scalar types would retrace ``advance``)
    s = jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, x.dtype) if jnp.issubdtype(x.dtype, jnp.number) else x, s)
    return jax.lax.cond(t0_pending(s), lambda: settle_t0(s, problem.order), lambda: s)


def advance_loop(problem: Problem, policy: Policy, config: StepConfig, state: DescentState,
                 n_iterations) -> DescentState:
    """``n_iterations`` more accepted iterations of ``step`` in a ``lax.while_loop`` (fewer
    if the run stops: ``state.status``); ``advance`` is this, jitted."""
    target = state.step + n_iterations
    return jax.lax.while_loop(lambda s: (s.step < target) & (s.status == RUNNING),
                              lambda s: step(problem, policy, config, s), state)


# one compiled program per (model, policy object, config): the trip count and every numeric
# hyperparameter are traced
advance = jax.jit(advance_loop, static_argnums=(1, 2))
_init = jax.jit(init, static_argnums=(2, 3))


def _sharpness_columns(sh) -> dict:
    return {"sharpness": sh.sharpness, "log_curvature": sh.log_curvature}


def engine_columns(s: DescentState) -> dict:
    """The engine's own Trajectory columns of a state (arrays for a batch of states): step,
    attempts, log_T, log_lr. A row is these and ``Diagnostics.columns()``."""
    return {"step": s.step, "attempts": s.attempts, "log_T": s.log_T, "log_lr": s.log_lr}


def outcome(problem: Problem, policy: Policy, code: int, *, step: int, bad_step: int,
            log_loss: float, min_log_loss: float, log_T: float, grad_norm: float,
            steps: int, divergence_factor: float = 1e4) -> tuple[str, str]:
    """(status, message) of a finished run: the one place a descent status is decided.

    A run whose loss never fell below l(b_f) is "not_separated" whatever ended it, with the
    evidence: where log L stopped and the size of grad log L there. Errors of the step size
    (``ERRORS``) say what went wrong and where; "frozen" and "float64_exhausted" say when
    float64 ended the run's progress."""
    name = status_name(code)
    thr = problem.loss.log_threshold
    at = f"at iteration {bad_step}"
    if name in ("completed", "stalled", "frozen", "float64_exhausted") and min_log_loss >= thr:
        why = {"completed": f"in {steps} iterations",
               "stalled": f"and no step size lowered it further ({policy.max_retries} retries "
                          f"{at}): log L is at its floor",
               "frozen": f"and the updates stopped changing the parameters {at}",
               "float64_exhausted": f"and float64 stopped resolving its changes {at}"}[name]
        still = " -> 0: a stationary point of L" if grad_norm < 1e-6 else ""
        return "not_separated", (
            f"the loss never fell below the separability threshold l(b_f) = exp({thr:.6g}) "
            f"{why} (final log L = {log_loss:.6g}, ||grad log L|| = {grad_norm:.3g}{still}): "
            f"the data were not separated, so no margin claim applies to this run")
    if name == "completed":
        return name, f"completed {step} iterations"
    if name == "nonfinite_params":
        return name, f"the parameters became non-finite (NaN/inf) {at}; the step size is too large"
    if name == "nonfinite_loss":
        return name, f"log L became non-finite {at}; the step size is too large"
    if name == "diverged":
        return name, (f"the loss blew up {at}: it rose above {divergence_factor:g} times its "
                      f"smallest value so far (log L was {min_log_loss:.6g}); policy "
                      f"{policy.name} {policy.config} makes gradient descent diverge, use a "
                      f"smaller step")
    if name == "frozen":
        return name, (f"the update {at} changed no parameter (log T = {log_T:.6g}, log L = "
                      f"{log_loss:.6g}): every entry of the step fell below float64's spacing "
                      f"of theta, so the run cannot move at this step size; stopped there")
    if name == "float64_exhausted":
        return name, (f"float64 exhausted {at} (log T = {log_T:.6g}, log L = {log_loss:.6g}): "
                      f"the last accepted step changed log L by at most "
                      f"{_RESOLUTION_SPACINGS:g} of its float64 spacings "
                      f"({abs(float(np.spacing(log_loss))):.3g}) or a larger step left "
                      f"float64's range, so no step size lowers the loss measurably: the "
                      f"margins are beyond float64's resolution")
    return name, (f"the loss-based scheduler failed to decrease the loss in "
                  f"{policy.max_retries} consecutive retries {at} (log L = {log_loss:.6g}, "
                  f"||grad log L|| = {grad_norm:.3g}): the step is not a descent direction "
                  f"there (e.g. at a kink of the model)")


def record_grid(steps: int, n_points: int = 200) -> np.ndarray:
    """Iterations at which diagnostics are recorded: 0, then log-spaced up to ``steps``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = np.unique(np.round(np.geomspace(1, steps, n_points)).astype(np.int64))
    return np.concatenate([[0], grid])


_record = jax.jit(diagnostics, static_argnames="gradient")
_grad_norm = jax.jit(lambda problem, params: global_norm(jax.grad(problem.log_loss)(params)))


def descent(problem: Problem, params0, policy: Policy, steps: int, *,
            batch_size: int | None = None, key=None, n_records: int = 200,
            chunk: int = 2000, divergence_factor: float = 1e4, progress: bool = True,
            support_decades: float = 3.0, snapshots: bool = True,
            t0_log_loss: float | None = None, config: dict | None = None,
            record_at=None, on_record=None, kkt: bool = True, margin_norm=None,
            sharpness: bool = False, resume: Trajectory | None = None,
            record_gradient: bool = True) -> Trajectory:
    """Run gradient descent (or SGD with ``batch_size``) for ``steps`` iterations.

    An iteration is one step of full-batch GD, or one epoch of SGD. Diagnostics are
    recorded at ``record_grid(steps, n_records)``. Non-retrying policies stop with
    ``RunStopped`` when the state turns non-finite or the loss exceeds
    ``divergence_factor`` times its smallest value so far; the loss-based policy backs off
    instead, and stops only after ``max_retries`` consecutive failures ("stalled", an
    error, when the step is not a descent direction). ``RunStopped`` carries the trajectory
    recorded so far, ending with the last good state. Honest endings return the trajectory
    with a warning (``outcome`` decides): "not_separated" when the loss never got below
    the separability threshold l(b_f), whatever stopped the run (no margin claim holds);
    "frozen" when an update changed no parameter (the step fell below float64's spacing:
    the run cannot move, e.g. a linear model, logistic loss, lr 100); "float64_exhausted"
    when the loss-based scheduler can no longer change log L measurably (its margins are
    beyond float64's resolution, or a longer step overflows). Each names the iteration.

    The engine's public pieces (``step_config``, ``init``, ``step`` = ``attempt`` +
    ``settle_t0``, ``advance``, ``engine_columns``, ``outcome``) are what this function
    runs; ``homoflow.sweep`` vmaps the same ones.

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

    ``record_gradient=False`` records without the full-batch gradient (``beta`` is NaN;
    ``diagnostics(gradient=False)``): for SGD runs recorded every epoch, whose gradient
    would cost more than the epoch's own steps (a CNN on thousands of images). A message
    that quotes ||grad log L|| (a stopped or unseparated run) computes it once, at the
    last state.

    ``resume=traj`` continues a run that an ``on_record`` hook ended (e.g. an interrupted
    ``homoflow run``): ``traj.state`` is its loop state at its last row, and the arguments
    must be those of the original call. The result equals the uninterrupted run's bit for
    bit (the record grid and the chunks depend only on the step). The returned
    trajectory's ``state`` is the loop state at its last row.
    """
    cfg = step_config(problem, batch_size=batch_size, divergence_factor=divergence_factor,
                      t0_log_loss=t0_log_loss)
    batch_size, log_t0 = cfg.batch_size, cfg.log_t0
    ip = None if margin_norm is None else inv_p(margin_norm)
    key = jax.random.PRNGKey(0) if key is None else key
    params0 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), params0)
    # the policy's initial state is an argument, not a constant of the compiled init: a
    # policy whose init() changes between calls (paper_cnn's segments) would otherwise
    # get the state of the call that compiled it
    state = _init(problem, params0, policy, cfg, key, policy.init())
    if not jnp.isfinite(state.log_loss):
        raise ValueError(f"the initial loss is not finite (log L = {float(state.log_loss)})")
    rows, snaps = [], []
    if resume is not None:
        state = _resumed_state(state, resume)
        if snapshots and resume.snapshots is None:
            raise ValueError("resume: the saved run has no snapshots; resume it with "
                             "snapshots=False, as it was run")
        rows, snaps = resume.rows(), resume.snapshot_list() if snapshots else []

    last_grad_norm = [math.nan]
    start = time.perf_counter()

    def record(s: DescentState):
        # every value of the row comes to the host in one device_get (one transfer per
        # value costs ~0.4 ms each on CPU: ~1 s of a 1000-step default run's 132 records)
        d, engine, extra = jax.device_get((
            _record(problem, s.params, s.t0.log_loss, support_decades,
                    gradient=record_gradient), engine_columns(s),
            {**(kkt_columns(problem, s.params) if kkt else {}),
             **(lp_columns_jit(problem, s.params, ip) if ip is not None else {}),
             **(_sharpness_columns(sharpness_jit(problem, s.params)) if sharpness else {})}))
        row = d.columns()
        row.update({k: np.asarray(v) for k, v in engine.items()})
        last_grad_norm[0] = float(d.grad_norm_log_loss)
        row.update({k: float(v) for k, v in extra.items()})
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
        while int(state.step) < target and int(state.status) == RUNNING:
            n = int(min(target - int(state.step), chunk))
            before = int(state.step)
            state = advance(problem, policy, cfg, state, jnp.asarray(n))
            if compiling:  # no ETA from a rate that includes compilation
                compiling = False
                bar.set_description_str("")
                bar.reset(total=steps)
                bar.initial = bar.n = bar.last_print_n = before
            bar.update(int(state.step) - before)
            bar.set_postfix(log10_loss=f"{float(state.log_loss) / math.log(10):.4g}")
        if int(state.status) != RUNNING:
            break
        if record(state):
            hook_stop = int(state.step)
            break
    bar.close()

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
    code = int(state.status)
    if code != RUNNING and (not rows or rows[-1]["step"] != int(state.step)):
        record(state)  # the last good state: nothing computed is lost
    if not record_gradient and (code != RUNNING
                                or float(state.min_log_loss) >= problem.loss.log_threshold):
        # only the messages of a stopped or unseparated run quote ||grad log L||
        last_grad_norm[0] = float(_grad_norm(problem, state.params))
    status, message = outcome(
        problem, policy, code, step=int(state.step), bad_step=int(state.bad_step),
        log_loss=float(state.log_loss), min_log_loss=float(state.min_log_loss),
        log_T=float(state.log_T), grad_norm=last_grad_norm[0], steps=steps,
        divergence_factor=divergence_factor)
    if status == "completed":
        message += f"; t0 at iteration {meta['t0_step']}"
        if hook_stop is not None:
            message += " (on_record ended the run)"
            meta["stopped_by_hook"] = hook_stop
        if meta["t0_step"] is None:
            message += f" (log L never fell below t0_log_loss = {log_t0:.6g})"
    meta.update(status=status, message=message, wall_time_s=time.perf_counter() - start)
    if code != RUNNING:
        meta["stopped_at_step"] = int(state.bad_step)
    traj = Trajectory.from_rows(rows, snaps, meta)
    traj.state = state
    if status in ERRORS:
        raise RunStopped(message, traj, int(state.bad_step), status)
    if status != "completed":
        warnings.warn(message, stacklevel=2)
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


def euler(problem: Problem, params0, dt: float, steps: int, **kwargs) -> Trajectory:
    """Fixed-step explicit Euler for the gradient flow in original time: exactly gradient
    descent with step dt (``descent`` with ``constant(dt)``), labelled as a flow
    discretization."""
    traj = descent(problem, params0, constant(dt), steps, **kwargs)
    traj.meta["engine"] = "flow-euler"
    return traj
