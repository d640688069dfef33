import math

import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.special import logsumexp

from homoflow import losses, models
from homoflow.problem import make_problem

N = 7


def _binary_problem(loss, q):
    """A problem whose margins are exactly q: linear model on x_n = q_n e_1, w = e_1."""
    X = np.zeros((len(q), 2))
    X[:, 0] = q
    prob = make_problem(models.linear(2), loss, X, np.ones(len(q)))
    return prob, (jnp.asarray([[1.0], [0.0]]),)


def _multiclass_problem(s_value, C=4):
    """Every s_nj equals s_value: Phi_y = s_value, other outputs 0 (linear model)."""
    X = np.zeros((N, C))
    y = np.arange(N) % C
    X[np.arange(N), y] = s_value
    prob = make_problem(models.linear(C, C), losses.cross_entropy(), X, y)
    return prob, (jnp.eye(C),)


@pytest.mark.parametrize("loss", [losses.exponential(), losses.logistic()],
                         ids=lambda l: l.name)
def test_log_loss_is_exact_at_margins_of_a_million(loss):
    prob, params = _binary_problem(loss, np.full(N, 1e6))
    expected = -1e6 + math.log(N)  # l(q) = e^{-q} (1 + O(e^{-q})) for both losses
    assert abs(prob.log_loss(params) - expected) <= 1e-12 * abs(expected)


def test_cross_entropy_log_loss_is_exact_at_margins_of_a_million():
    C = 4
    prob, params = _multiclass_problem(1e6, C)
    expected = -1e6 + math.log(C - 1) + math.log(N)
    assert abs(prob.log_loss(params) - expected) <= 1e-12 * abs(expected)


@pytest.mark.parametrize("name, expected", [
    ("exponential", 1e3 + math.log(N)),
    ("logistic", math.log(1e3 + math.log1p(math.exp(-1e3))) + math.log(N)),
])
def test_log_loss_is_finite_and_correct_at_margins_of_minus_a_thousand(name, expected):
    prob, params = _binary_problem(losses.get_loss(name), np.full(N, -1e3))
    value = float(prob.log_loss(params))
    assert math.isfinite(value) and abs(value - expected) <= 1e-12 * abs(expected)


def test_cross_entropy_is_finite_and_correct_at_margins_of_minus_a_thousand():
    C = 4
    prob, params = _multiclass_problem(-1e3, C)
    expected = math.log(1e3 + math.log(C - 1)) + math.log(N)  # log(1 + 3 e^{1000})
    assert abs(prob.log_loss(params) - expected) <= 1e-12 * abs(expected)


def test_log_loss_matches_direct_formula_at_moderate_margins():
    q = np.linspace(-5, 40, 23)
    for loss, direct in ((losses.exponential(), np.exp(-q)),
                         (losses.logistic(), np.log1p(np.exp(-q)))):
        prob, params = _binary_problem(loss, q)
        assert abs(prob.log_loss(params) - np.log(direct.sum())) < 1e-13 * 10


def test_logistic_f_is_continuous_across_the_q30_switch():
    q = jnp.asarray([30.0 - 1e-9, 30.0 + 1e-9])
    f = losses.logistic_f(q)
    assert abs(f[1] - f[0]) < 1e-8


@pytest.mark.parametrize("x", [-50.0, -5.0, -1.0, 0.0, 0.3, 5.0, 29.9, 30.1, 700.0, 1e6])
def test_logistic_g_inverts_f(x):
    q = losses.logistic_g(jnp.asarray(x))
    assert abs(losses.logistic_f(q) - x) <= 1e-12 * max(1.0, abs(x))


def test_inverse_of_logistic_loss_at_tiny_loss_needs_no_underflowing_exp():
    # L = N e^{-1e6}: l^{-1}(L) = -log(expm1(L)) = 1e6 - log N up to O(L)
    value = losses.logistic().inverse(jnp.asarray(-1e6 + math.log(N)))
    assert abs(value - (1e6 - math.log(N))) <= 1e-12 * 1e6


def test_thresholds_are_l_of_b_f():
    assert losses.exponential().log_threshold == 0.0
    assert losses.logistic().log_threshold == pytest.approx(math.log(math.log(2)), rel=1e-14)
    assert losses.cross_entropy().log_threshold == pytest.approx(math.log(math.log(2)), rel=1e-14)


def test_general_loss_with_computed_inverse_matches_logistic():
    loss = losses.exp_tailed(losses.logistic_f)  # g computed by bisection
    x = jnp.asarray([-3.0, 0.0, 0.5, 12.0, 1e4])
    assert np.allclose(loss.g(x), losses.logistic_g(x), rtol=1e-12, atol=1e-12)


def test_general_loss_cubic_tail():
    # l(q) = exp(-q^3) for q >= 0 extended as an increasing f: f(q) = q^3 + q
    loss = losses.exp_tailed(lambda q: q ** 3 + q, b_f=0.0, name="cubic")
    q = jnp.asarray([0.1, 1.0, 3.0, 50.0])
    assert np.allclose(loss.g(loss.f(q)), q, rtol=1e-12)
    assert loss.log_loss(q) == pytest.approx(float(logsumexp(-(q ** 3 + q))), rel=1e-14)


def test_negative_b_f_is_rejected():
    with pytest.raises(ValueError, match="b_f must be >= 0"):
        losses.exp_tailed(lambda q: q, b_f=-1.0)


def test_unknown_loss_name_is_rejected():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        losses.get_loss("hinge")
