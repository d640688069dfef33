"""Phase 1: gradient flow d theta/dt = -grad L(theta) in original time, until t0.

An adaptive diffrax solve (Tsit5 + PID) of the flow, stopped by a ``diffrax.Event`` at t0,
the first time L falls below the separability threshold l(b_f) (DESIGN §3); configured by
``Phase1Config``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import diffrax
import jax
import jax.numpy as jnp
import optimistix as optx

from ._checks import _finite_at_least, _tolerances


@dataclass(frozen=True)
class Phase1Config:
    """Phase 1's solve, validated when made: PID tolerances ``rtol``/``atol``, the time
    ``t0_limit`` by which the data must have separated, and the step budget ``max_steps``."""
    rtol: float = 1e-6
    atol: float = 1e-9
    t0_limit: float = 1e6
    max_steps: int = 1_000_000

    def __post_init__(self):
        rtol, atol = _tolerances("", self.rtol, self.atol)
        t0_limit = _finite_at_least("t0_limit", self.t0_limit, 0.0, True)
        try:
            max_steps = operator.index(self.max_steps)
        except TypeError:
            max_steps = 0
        if isinstance(self.max_steps, bool) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {self.max_steps!r}")
        for name, v in (("rtol", rtol), ("atol", atol), ("t0_limit", t0_limit),
                        ("max_steps", max_steps)):
            object.__setattr__(self, name, v)


# The phase-1 field scales -grad log L by L = exp(log L). Along the flow L never increases,
# so only a trial stage can see L above L(0): capping the exponent at log L(0) +
# _STAGE_HEADROOM is exact on the flow and keeps trial stages finite. Above
# _LOG_LOSS_MAX the field at theta_0 itself is not representable in float64.
_STAGE_HEADROOM = 50.0
_LOG_LOSS_MAX = 700.0 - _STAGE_HEADROOM


class _PIDRejectingNaN(diffrax.PIDController):
    """diffrax's PID controller, except that a NaN in the error estimate (a trial stage
    where the field overflowed) counts as an infinite error: the step is rejected and the
    next one shrunk by ``factormin``. diffrax itself turns a NaN error into a NaN step size,
    after which every step is rejected and the solve ends where it started."""

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                        controller_state):
        y_error = jax.tree_util.tree_map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e),
                                         y_error)
        return super().adapt_step_size(t0, t1, y0, y1_candidate, args, y_error, error_order,
                                       controller_state)


def _phase1_field(t, y, args):
    problem, unravel, log_loss_cap = args
    log_loss, grad = jax.value_and_grad(lambda z: problem.log_loss(unravel(z)))(y)
    return -jnp.exp(jnp.minimum(log_loss, log_loss_cap)) * grad


def _phase1_separated(t, y, args, **kwargs):
    problem, unravel, _ = args
    return problem.log_loss(unravel(y)) - problem.loss.log_threshold


def _first_step(problem, unravel, flat0, log_loss_cap, t0_limit):
    """A first step that moves theta by 1e-3 |theta_0| at the initial speed (diffrax's
    automatic guess, 0.01 |y| / |f| refined by a trial step, can throw a deep model's
    exponential loss into overflow); the PID controller grows it by up to 10x a step."""
    speed = jnp.linalg.norm(_phase1_field(0.0, flat0, (problem, unravel, log_loss_cap)))
    size = jnp.maximum(jnp.linalg.norm(flat0), 1.0)
    return jnp.where(jnp.isfinite(speed) & (speed > 0),
                     jnp.minimum(1e-3 * size / jnp.where(speed > 0, speed, 1.0),
                                 1e-3 * t0_limit), 1e-3 * t0_limit)


def _phase1(problem, flat0, unravel, cfg: Phase1Config, save_t):
    """Original-time flow until L < l(b_f) (a diffrax Event) or cfg.t0_limit. The field and
    the event are module-level functions of ``args`` so diffrax's compiled solve is reused.
    Pure: jit and vmap freely."""
    saveat = (diffrax.SaveAt(t1=True) if save_t is None else
              diffrax.SaveAt(ts=jnp.asarray(save_t, jnp.float64), t1=True))
    log_loss_cap = problem.log_loss(unravel(flat0)) + _STAGE_HEADROOM
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(_phase1_field), diffrax.Tsit5(), t0=0.0, t1=cfg.t0_limit,
        dt0=_first_step(problem, unravel, flat0, log_loss_cap, cfg.t0_limit),
        y0=flat0, stepsize_controller=_PIDRejectingNaN(rtol=cfg.rtol, atol=cfg.atol),
        saveat=saveat,
        event=diffrax.Event(_phase1_separated,
                            root_finder=optx.Newton(rtol=1e-12, atol=1e-12)),
        args=(problem, unravel, log_loss_cap), max_steps=cfg.max_steps, throw=False)
    return sol


# phase 1 as one jitted program of (problem, flat0, save_t): flow() compiles it ahead of
# time (``.lower(...).compile()``, which fills jit's cache) before its wall budget starts
_phase1_jit = jax.jit(_phase1, static_argnames=("unravel", "cfg"))
