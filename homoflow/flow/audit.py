"""What the flow is checked against and what it records: Lemma 5.1 along the velocity it
follows (``_lemma_5_1``, ``polar_rates``) and the saved rows (``_Recorder``), whose
diagnostics come from the one shared ``diagnostics`` function. Lemma C.9's integral is
part of the solve (``ros2``); its value is recorded in the ``speed_integral`` and
``path_energy`` columns."""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ..diagnostics import diagnostics
from ..kkt import kkt_columns
from ..problem import Problem
from .polar import PolarState, _field_only, _log_smoothed, _ravel

_diagnostics_jit = jax.jit(diagnostics)


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



def _polar_summary(problem: Problem, st: PolarState, unravel) -> dict:
    """What a saved row says about the velocity the flow follows at the polar state ``st``
    (pure; jit and vmap freely): beta of that velocity (the minimum-norm Clarke element
    when kinks slide), the size of the sliding set, Lemma 5.1's two sides along it, and the
    solver's integral of |F|^2 so far."""
    rate, speed2 = _lemma_5_1(problem, st.x, st.tau, st.point.F, st.slide, unravel=unravel)
    return {"flow_beta": st.point.s / jnp.linalg.norm(st.point.g),
            "sliding": 0 if st.mask is None else jnp.sum(st.mask),
            "dlog_smoothed_dtau": rate, "speed2": speed2, "speed_integral": st.speed_int}


def _solver_columns(problem: Problem, log_loss, *, step, rejected, log_t, phase,
                    path_energy, polar: dict) -> dict:
    """The flow's columns besides the diagnostics, for one row (scalars) or many (arrays):
    the one place both drivers name them. ``polar`` holds ``_polar_summary``'s entries."""
    step, rejected = np.asarray(step), np.asarray(rejected)
    return {"step": step, "attempts": step + rejected, "log_T": log_t,
            "log_lr": np.full(np.shape(log_t), math.nan),
            "separated": np.asarray(log_loss) < problem.loss.log_threshold,
            "phase": np.full(np.shape(log_t), phase), "rejected": rejected,
            "path_energy": path_energy, **polar}


class _Recorder:
    """Diagnostics (the one shared function) at saved points, plus solver statistics."""

    def __init__(self, problem: Problem, snapshots: bool, kkt: bool, unravel=None,
                 on_record=None):
        self.problem, self.snapshots, self.kkt, self.unravel = problem, snapshots, kkt, unravel
        self.on_record, self.stopped_at = on_record, None
        self.rows, self.snaps = [], []

    def __call__(self, params, log_t, phase, steps, rejected, wall, energy=math.nan,
                 state: PolarState | None = None):
        d = _diagnostics_jit(self.problem, params)
        row = d.columns()
        if self.kkt:
            row.update({k: float(v) for k, v in kkt_columns(self.problem, params).items()})
        # without a polar state (phase 1) the velocity is the autodiff gradient's
        polar = ({"flow_beta": row["beta"], "sliding": 0, "dlog_smoothed_dtau": math.nan,
                  "speed2": math.nan, "speed_integral": math.nan} if state is None else
                 _polar_summary(self.problem, state, self.unravel))
        cols = _solver_columns(self.problem, d.log_loss, step=steps, rejected=rejected,
                               log_t=log_t, phase=phase, path_energy=energy, polar=polar)
        row.update({k: np.asarray(v).item() for k, v in cols.items()}, wall_s=wall)
        self.rows.append(row)
        if self.snapshots:
            self.snaps.append(jax.device_get(params))
        # the caller's hook (descent's signature); True ends the run after this row
        if self.on_record is not None and bool(self.on_record(row["step"], params, row)):
            self.stopped_at = row["step"]
        return self.stopped_at is not None


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


