"""Step-size policies (homoflow.schedules): each rule's log eta, its state updates, its
validation, and the exactness of the step multiple at extreme losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from homoflow import schedules
from homoflow.diagnostics import log_h_bound, log_phi
from homoflow.schedules import T0Info

NO_T0 = T0Info(jnp.nan, jnp.nan, jnp.nan)


def test_constant_policy_steps_eta_times_the_loss_along_grad_log_l():
    p = schedules.constant(0.3)
    st = p.init()
    log_scale, log_lr = p.step_logs(st, jnp.asarray(-2.5), NO_T0, 1.0)
    assert float(log_lr) == math.log(0.3)
    # grad L = L grad log L: the multiple of grad log L is eta L
    assert float(log_scale) == pytest.approx(math.log(0.3) - 2.5, rel=1e-15)
    assert p.update(st, jnp.asarray(True)) is st and not p.retry


def test_loss_based_scheduler_follows_appendix_k1_in_the_log_domain():
    p = schedules.loss_based(alpha0=0.1, r_u=2 ** 0.2, r_d=2 ** 0.1, radial_cap=None)
    st = p.init()
    assert p.retry and p.limit is None
    up = p.update(st, jnp.asarray(True))
    down = p.update(st, jnp.asarray(False))
    assert float(up.log_alpha) == pytest.approx(math.log(0.1) + 0.2 * math.log(2), rel=1e-15)
    assert float(down.log_alpha) == pytest.approx(math.log(0.1) - 0.1 * math.log(2), rel=1e-15)
    # eta = alpha / L: T accumulates log alpha - log L
    _, log_lr = p.step_logs(st, jnp.asarray(-40.0), NO_T0, 2.0)
    assert float(log_lr) == pytest.approx(math.log(0.1) + 40.0, rel=1e-15)


@pytest.mark.parametrize("log_loss", [-3.9e15, -1e17, -1e300])
def test_loss_based_step_multiple_is_alpha_exactly_at_any_loss(log_loss):
    """The step subtracts alpha grad log L with alpha = exp(log alpha) bitwise; forming it
    as exp((log alpha - log L) + log L) loses |log L| 2^-52 to cancellation (the bug this
    guards: alpha 16 % wrong at log L = -3.9e15, and exactly 1 beyond |log L| ~ 1e17)."""
    p = schedules.loss_based(alpha0=0.1)
    st = p.init()
    log_scale, log_lr = p.step_logs(st, jnp.asarray(log_loss), NO_T0, 1.0)
    assert float(jnp.exp(log_scale)) == float(jnp.exp(st.log_alpha))
    cancelled = float(jnp.exp(log_lr + log_loss))
    if log_loss == -3.9e15:  # the old formula's error, measured: far beyond rounding
        assert abs(cancelled / 0.1 - 1) > 0.01


def test_normalized_policy_uses_alpha_as_the_step_multiple():
    p = schedules.normalized(0.25)
    log_scale, log_lr = p.step_logs(p.init(), jnp.asarray(-1e16), NO_T0, 1.0)
    assert float(log_scale) == math.log(0.25)
    assert float(log_lr) == pytest.approx(math.log(0.25) + 1e16, rel=1e-15)


def test_radial_cap_limits_alpha_to_c_over_the_squared_radial_derivative():
    p = schedules.loss_based(alpha0=100.0, radial_cap=0.5)
    st = p.init()
    capped = p.limit(st, jnp.asarray(4.0))  # alpha <= 0.5 / 4^2
    assert float(capped.log_alpha) == pytest.approx(math.log(0.5 / 16.0), rel=1e-14)
    # below the cap nothing changes; before separation (radial <= 0) there is no cap
    assert float(p.limit(st, jnp.asarray(0.01)).log_alpha) == math.log(100.0)
    assert float(p.limit(st, jnp.asarray(-3.0)).log_alpha) == math.log(100.0)
    # the growth after an accepted step starts from the capped alpha
    grown = p.update(capped, jnp.asarray(True))
    assert float(grown.log_alpha) == pytest.approx(math.log(0.5 / 16.0 * 2 ** 0.2), rel=1e-14)
    # a failed attempt's alpha stays within the cap of the same iterate: the SGD engine
    # skips the cap (and its full-batch jvp) on retries, which relies on this
    failed = p.update(capped, jnp.asarray(False))
    assert float(failed.log_alpha) < float(capped.log_alpha)
    assert float(p.limit(failed, jnp.asarray(4.0)).log_alpha) == float(failed.log_alpha)


def test_steepest_wraps_the_step_rule_with_its_multiple_and_cap():
    inner = schedules.loss_based(alpha0=2.0, radial_cap=1.0)
    p = schedules.sign_descent(inner)
    st = p.init()
    log_scale, _ = p.step_logs(st, jnp.asarray(-1e17), NO_T0, 1.0)
    assert float(log_scale) == math.log(2.0)
    assert float(p.limit(st, jnp.asarray(2.0)).step.log_alpha) == pytest.approx(
        math.log(0.25), rel=1e-14)
    assert p.retry and p.name == "sign/loss_based"


def test_decaying_policy_divides_by_a_power_of_accepted_iterations():
    p = schedules.decaying(0.5, power=0.5)
    st = p.init()
    for _ in range(3):
        st = p.update(st, jnp.asarray(True))
    st = p.update(st, jnp.asarray(False))  # a rejected attempt does not count
    assert float(p.log_lr(st, 0.0, NO_T0, 1.0)) == pytest.approx(math.log(0.5 / 2.0), rel=1e-14)


def test_h_bound_is_constant_before_t0_and_mu_over_c_kappa_after():
    p = schedules.h_bound(c_eta=3.0, lr_before_t0=0.2, fraction=0.5)
    st = p.init()
    assert float(p.log_lr(st, jnp.asarray(-0.1), NO_T0, 2.0)) == pytest.approx(math.log(0.2))
    t0 = T0Info(jnp.asarray(-1.0), jnp.asarray(0.3), log_phi(1.0, 1.0, 2.0))
    got = float(p.log_lr(st, jnp.asarray(-7.0), t0, 2.0))
    want = float(log_h_bound(7.0, 1.0, math.log(3.0), 2.0)) + math.log(0.5)
    assert got == pytest.approx(want, rel=1e-14)
    # mu(L) = log(1/L(t0)) / (2 log(1/L)), kappa(x) = x (log 1/x)^{2 - 2/L} (Appendix E.1)
    s, s0 = 7.0, 1.0
    direct = math.log(s0 / (2 * s)) - math.log(3.0) - (-s + (2 - 2 / 2.0) * math.log(s))
    assert got - math.log(0.5) == pytest.approx(direct, rel=1e-14)


def test_c_eta_from_constants_matches_the_end_of_appendix_e2():
    B0, B1, B2, L = 2.0, 3.0, 5.0, 2.0
    t0 = T0Info(jnp.asarray(-1.5), jnp.asarray(0.7), jnp.asarray(-0.4))
    gamma_hat0 = math.exp(-0.4 - L * 0.7)
    want = (B1 ** 2 + math.exp(-L * 0.7) * B2) / gamma_hat0 ** 2 * B0 ** (2 / L) / 2
    got = float(schedules.c_eta_from_constants(B0, B1, B2, t0, L))
    assert got == pytest.approx(math.log(want), rel=1e-14)


def test_optax_log_lr_reads_an_injected_learning_rate():
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.03)
    state = opt.init({"w": jnp.zeros(2)})
    assert float(schedules.optax_log_lr(state)) == pytest.approx(math.log(0.03), rel=1e-7)
    assert float(schedules.optax_log_lr(optax.sgd(0.1).init({"w": jnp.zeros(2)}))) == 0.0


@pytest.mark.parametrize("make, match", [
    (lambda: schedules.constant(0.0), "lr must be a finite number > 0, got 0.0"),
    (lambda: schedules.constant(math.nan), "got nan"),
    (lambda: schedules.loss_based(r_u=0.5), "r_u and r_d must be >= 1"),
    (lambda: schedules.loss_based(radial_cap=-1.0), "radial_cap must be a finite number > 0"),
    (lambda: schedules.decaying(0.1, power=-1.0), "power must be a finite number >= 0"),
    (lambda: schedules.h_bound(), "exactly one of c_eta or constants"),
    (lambda: schedules.optax_optimizer(optax.sgd(0.1), objective="L"), "objective must be"),
    (lambda: schedules.steepest(2.0, schedules.optax_optimizer(optax.sgd(0.1))),
     "steepest needs a step-size policy"),
])
def test_bad_hyperparameters_raise_naming_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_policy_states_are_pytrees_of_float64_arrays():
    """Hyperparameters live in traced state: a sweep stacks and vmaps them."""
    for p in (schedules.constant(0.1), schedules.loss_based(), schedules.normalized(),
              schedules.decaying(0.1), schedules.h_bound(c_eta=1.0)):
        leaves = jax.tree_util.tree_leaves(p.init())
        assert leaves and all(np.asarray(x).dtype == np.float64 for x in leaves), p.name
