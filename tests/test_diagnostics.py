import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import homoflow
from homoflow import data, losses, models, schedules
from homoflow.diagnostics import diagnostics, log_phi, tree_dot
from homoflow.problem import make_problem


def _problem(model, loss, n=30, dim=5, seed=0):
    if model.multiclass:
        X, y = data.gaussian_classes(n, dim, model.n_outputs, seed=seed)
    else:
        X, y = data.linearly_separable(n, dim, seed=seed)
    return make_problem(model, loss, X, y)


CASES = [
    (models.mlp((5, 16, 1)), losses.exponential()),
    (models.mlp((5, 16, 1)), losses.logistic()),
    (models.deep_linear((5, 4, 4, 1)), losses.exponential()),
    (models.mlp((5, 16, 3)), losses.cross_entropy()),
    (models.mlp((5, 12, 1), models.relu_power(3)), losses.exponential()),
]
IDS = [f"{m.name}-C{m.n_outputs}-{l.name}" for m, l in CASES]


@pytest.fixture(scope="module", params=range(len(CASES)), ids=IDS)
def separated_run(request):
    model, loss = CASES[request.param]
    prob = _problem(model, loss)
    params0 = jax.tree_util.tree_map(lambda x: 0.5 * x, model.init(jax.random.PRNGKey(1)))
    # kkt=False: the KKT columns (an NNLS per record) are not what this file checks
    traj = homoflow.descent(prob, params0, schedules.loss_based(), 400, progress=False,
                            n_records=40, kkt=False)
    assert traj.meta["t0_step"] is not None
    return prob, traj


def _snapshot(traj, i):
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x[i]), traj.snapshots)


def test_nu_equals_theta_dot_minus_grad_log_loss_over_L(separated_run):
    """Theorem B.4 (and Appendix F): <theta, -grad L> = L nu, at every recorded point."""
    prob, traj = separated_run
    for i in range(0, len(traj), 7):
        p = _snapshot(traj, i)
        d = diagnostics(prob, p)
        g = jax.grad(prob.log_loss)(p)
        expected = -tree_dot(p, g) / prob.order
        assert abs(d.nu_over_loss - expected) <= 1e-10 * abs(expected)


def test_smoothed_margin_is_within_log_n_over_rho_L_below_normalized(separated_run):
    """gamma_tilde <= gamma_bar, and gamma_bar - gamma_tilde <= log N / rho^L for the
    exponential loss (Section 4.2; Lemma A.5 for logistic; Appendix F for cross-entropy)."""
    prob, traj = separated_run
    c = traj.columns
    sep = c["separated"].astype(bool)
    gap = c["normalized_margin"][sep] - c["smoothed_margin"][sep]
    assert np.all(gap >= -1e-12 * np.abs(c["normalized_margin"][sep]))
    if prob.loss.name == "exponential":
        bound = math.log(prob.n) * np.exp(-prob.order * c["log_rho"][sep])
        assert np.all(gap <= bound * (1 + 1e-12))


def test_descent_margin_is_below_smoothed_margin_after_t0(separated_run):
    """Lemma E.1(a): gamma_hat < gamma_tilde once L <= L(t0)."""
    prob, traj = separated_run
    c = traj.columns
    if prob.loss.name != "exponential":
        assert np.all(np.isnan(c["descent_margin"]))
        return
    after = np.isfinite(c["descent_margin"])
    assert after.sum() > 5
    assert np.all(c["descent_margin"][after] < c["smoothed_margin"][after])


def test_diagnostics_vmapped_over_snapshots_equal_separate_calls(separated_run):
    prob, traj = separated_run
    snaps = jax.tree_util.tree_map(jnp.asarray, traj.snapshots)
    t0 = jnp.asarray(traj.meta["log_loss_t0"])
    batched = jax.vmap(diagnostics, (None, 0, None))(prob, snaps, t0)
    for i in (0, len(traj) // 2, len(traj) - 1):
        single = diagnostics(prob, _snapshot(traj, i), t0)
        for name, value in single._asdict().items():
            np.testing.assert_allclose(np.asarray(getattr(batched, name))[i], value,
                                       rtol=1e-12, atol=0, equal_nan=True, err_msg=name)


def test_recorded_columns_equal_a_fresh_diagnostics_call(separated_run):
    prob, traj = separated_run
    i = len(traj) - 1
    d = diagnostics(prob, _snapshot(traj, i), jnp.asarray(traj.meta["log_loss_t0"]))
    for name in ("log_loss", "q_min", "rho", "normalized_margin", "smoothed_margin", "beta"):
        assert traj[name][i] == pytest.approx(float(getattr(d, name)), rel=1e-12)


def test_diagnostics_without_the_gradient_differ_only_in_its_columns(separated_run):
    """``gradient=False`` (descent's ``record_gradient=False``) skips the backward pass:
    beta and the gradient norm are NaN, every other field is the same computation."""
    prob, traj = separated_run
    p, t0 = _snapshot(traj, len(traj) - 1), jnp.asarray(traj.meta["log_loss_t0"])
    full, light = diagnostics(prob, p, t0), diagnostics(prob, p, t0, gradient=False)
    for name, value in full._asdict().items():
        if name in ("beta", "grad_norm_log_loss"):
            assert np.isnan(getattr(light, name)) and np.isfinite(value)
        else:
            np.testing.assert_allclose(getattr(light, name), value, rtol=1e-12, atol=0,
                                       equal_nan=True, err_msg=name)


def test_beta_and_support_count_match_numpy():
    prob = _problem(models.mlp((5, 16, 1)), losses.exponential())
    p = prob.model.init(jax.random.PRNGKey(3))
    d = diagnostics(prob, p, support_decades=2.0)
    theta = np.concatenate([np.ravel(x) for x in p])
    g = np.concatenate([np.ravel(x) for x in jax.grad(prob.log_loss)(p)])
    assert d.beta == pytest.approx(-theta @ g / np.linalg.norm(theta) / np.linalg.norm(g),
                                   rel=1e-12)
    q = np.asarray(prob.margins(p))
    assert int(d.n_support) == int(np.sum(q < q.min() + 2 * math.log(10)))


def test_layer_normalized_margin_is_invariant_under_layer_rebalancing():
    """Eq. (4): q_min / prod rho_i^{k_i} is unchanged by (c W1, W2 / c) in a ReLU network,
    while the plain normalized margin q_min / rho^L changes."""
    prob = _problem(models.mlp((5, 16, 1)), losses.exponential())
    W1, W2 = prob.model.init(jax.random.PRNGKey(4))
    a = diagnostics(prob, (W1, W2))
    b = diagnostics(prob, (3.0 * W1, W2 / 3.0))
    assert b.layer_normalized_margin == pytest.approx(float(a.layer_normalized_margin), rel=1e-12)
    assert b.layer_smoothed_margin == pytest.approx(float(a.layer_smoothed_margin), rel=1e-12)
    assert abs(b.normalized_margin - a.normalized_margin) > 1e-3 * abs(a.normalized_margin)


@pytest.mark.parametrize("s0, L", [(0.05, 2.0), (1.0, 1.0), (3.0, 4.0), (20.0, 0.5)])
def test_phi_integral_is_increasing_continuous_and_matches_eq19_tail(s0, L):
    """Appendix E.2: I(s) = phi - log s is increasing in s = log(1/L), negative, continuous
    where the numerical part meets the closed form (19), and equal to (19) far out."""
    s = s0 * np.exp(np.linspace(0.0, np.log(2000.0 / s0), 20001))
    I = np.asarray(log_phi(jnp.asarray(s), s0, L)) - np.log(s)
    assert np.all(np.diff(I) >= -1e-15) and np.all(I < 0)
    S = max(s0, 2.0) + 60.0 + 3.0 * max(0.0, -math.log(s0))  # where (19) takes over
    below, above = (float(log_phi(jnp.asarray(x), s0, L))
                    for x in (S * (1 - 1e-12), S * (1 + 1e-12)))
    assert abs(above - below) < 1e-9
    far = 1e6
    tail = -s0 * (1 / far + 1 / (2 * L * far ** 2))
    assert float(log_phi(jnp.asarray(far), s0, L)) - math.log(far) == pytest.approx(tail, rel=1e-12)


def test_phi_is_undefined_before_t0():
    assert np.isnan(log_phi(jnp.asarray(0.5), 1.0, 2.0))


from conftest import all_models, model_id  # noqa: E402

EVERY_MODEL = all_models()


@pytest.mark.parametrize("entry", EVERY_MODEL, ids=[model_id(e) for e in EVERY_MODEL])
@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_smoothed_margin_bounds_hold_for_every_model(entry, scale):
    """Exponential loss, any theta: gamma_tilde <= gamma_bar <= gamma_tilde + log M / rho^L,
    since e^{-q_min} <= L <= M e^{-q_min} with M = N (binary) or N (C - 1) (C classes,
    where L = sum_n sum_{j != y_n} e^{-s_nj}). Relative tolerance 1e-12."""
    model, shape = entry
    n = 24
    X = np.asarray(jax.random.normal(jax.random.PRNGKey(5), (n,) + shape))
    y = np.arange(n) % model.n_outputs if model.multiclass else np.where(np.arange(n) % 2, 1.0, -1.0)
    prob = make_problem(model, losses.exponential(), X, y)
    params = jax.tree_util.tree_map(lambda p: scale * p, model.init(jax.random.PRNGKey(6)))
    d = diagnostics(prob, params)
    M = n * (model.n_outputs - 1 if model.multiclass else 1)
    tol = 1e-12 * (abs(float(d.normalized_margin)) + 1e-300)
    assert d.smoothed_margin <= d.normalized_margin + tol
    bound = math.log(M) * np.exp(-prob.order * d.log_rho)
    assert d.normalized_margin - d.smoothed_margin <= bound + tol


@pytest.mark.parametrize("log_rho", [100.0, 708.5, 709.5])
def test_margins_stay_exact_where_rho_to_the_L_leaves_float64(log_rho):
    """gamma_bar = q_min / rho^L and gamma_tilde are formed as exp(log q - L log rho): at
    rho^L > e^708 the factor exp(-L log rho) is subnormal (flushed to 0 by XLA on CPU) and
    the old form q_min * exp(-L log rho) reported gamma_bar = 0. A linear model at rho =
    e^log_rho must report its direction's margin (rtol 1e-12: a few roundings of log)."""
    X = np.array([[1.0, 0.2], [0.3, 1.0], [-0.8, -0.5]])
    y = np.array([1.0, 1.0, -1.0])
    model = models.linear(2)
    prob = make_problem(model, losses.exponential(), X, y)
    w_hat = np.array([0.8, 0.6])
    want = float(np.min(y * (X @ w_hat)))
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(np.exp(log_rho) * w_hat.reshape(p.shape)),
                                    model.init(jax.random.PRNGKey(0)))
    d = jax.jit(diagnostics)(prob, params)
    assert float(d.log_rho) == pytest.approx(log_rho, rel=1e-14)  # no overflow of sum x^2
    assert float(d.normalized_margin) == pytest.approx(want, rel=1e-12)
    # exp loss: q_min - log N <= -log L <= q_min, so 0 <= gamma_bar - gamma_tilde <=
    # log N / rho (up to the roundings of log L at |log L| ~ e^log_rho: rtol 1e-12)
    gap = want - float(d.smoothed_margin)
    assert -1e-12 * want <= gap <= math.log(3) * math.exp(-log_rho) + 1e-12 * want
    assert bool(d.separated)


def test_separated_column_is_the_threshold_test_on_log_l():
    X, y = data.linearly_separable(10, 3, seed=0)
    model = models.linear(3)
    prob = make_problem(model, losses.logistic(), X, y)
    p = model.init(jax.random.PRNGKey(0))
    for c in (1e-3, 1e3):
        d = diagnostics(prob, jax.tree_util.tree_map(lambda a: c * a, p))
        assert bool(d.separated) == bool(d.log_loss < losses.logistic().log_threshold)
        assert d.columns()["separated"].dtype == bool
