import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from homoflow import data, losses, models
from homoflow.flow import flow
from homoflow.kkt import constraints, kkt_residual, nnls
from homoflow.problem import make_problem

from conftest import hard_margin_svm


def _instances(count=120, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        m, n = int(rng.integers(2, 30)), int(rng.integers(1, 25))
        A, b = rng.normal(size=(m, n)), rng.normal(size=m)
        if i % 4 == 1:
            A[:, rng.integers(n)] = 0.0           # a zero column
        if i % 4 == 2 and n > 1:
            A[:, 1] = A[:, 0]                     # a duplicate column
        yield A, b


def test_nnls_agrees_with_scipy_on_random_and_degenerate_instances():
    """The residual (unique) to 1e-8 relative, and the solution itself where A has full
    column rank (then it is unique too)."""
    solve = jax.jit(nnls)
    for A, b in _instances():
        x = np.asarray(solve(jnp.asarray(A), jnp.asarray(b)))
        xs, rs = scipy.optimize.nnls(A, b)
        assert np.all(x >= 0)
        assert abs(np.linalg.norm(A @ x - b) - rs) <= 1e-8 * max(1.0, rs)
        if np.linalg.matrix_rank(A) == A.shape[1]:
            np.testing.assert_allclose(x, xs, rtol=1e-8, atol=1e-8)


def _linear_problem():
    X, y = data.linearly_separable(40, 5, 0)
    return make_problem(models.linear(5), losses.exponential(), X, y), X, y


def test_the_svm_solution_is_an_exact_kkt_point_and_a_random_direction_is_not():
    prob, X, y = _linear_problem()
    w, alpha = hard_margin_svm(X, y)
    at_svm = kkt_residual(prob, (jnp.asarray(w[:, None] * 3.7),))  # any positive scaling
    assert bool(at_svm.valid) and at_svm.eps <= 1e-10 and abs(at_svm.delta) <= 1e-10
    np.testing.assert_allclose(at_svm.lam, alpha, atol=1e-8)  # the dual multipliers
    tilt = np.random.default_rng(1).normal(size=w.shape)
    w_off = w + 0.05 * np.linalg.norm(w) * tilt / np.linalg.norm(tilt)  # still separating
    off = kkt_residual(prob, (jnp.asarray(w_off[:, None]),))
    assert bool(off.valid) and off.eps > 1.0 and off.delta > 1.0  # measured: 4.2 and 2.5


def test_kkt_residual_is_flagged_before_separation():
    prob, _, _ = _linear_problem()
    res = kkt_residual(prob, (-jnp.ones((5, 1)),))
    assert not bool(res.valid) and np.isnan(res.eps) and np.isnan(res.delta)


def test_kkt_residual_vanishes_along_a_linear_flow_and_vmaps_over_snapshots():
    prob, _, _ = _linear_problem()
    traj = flow(prob, prob.model.init(jax.random.PRNGKey(0)), log_t_max=1e4, n_saves=12,
                h_max=0.005, progress=False)
    after = np.nonzero(traj["phase"] == 2)[0]
    snaps = jax.tree_util.tree_map(lambda a: jnp.asarray(a[after]), traj.snapshots)
    batched = jax.jit(jax.vmap(kkt_residual, (None, 0)))(prob, snaps)
    eps, delta = np.asarray(batched.eps), np.asarray(batched.delta)
    assert np.all(np.asarray(batched.valid))
    assert eps[-1] < 1e-3 * eps[0] and eps[-1] < 1e-5
    assert 0 <= delta[-1] < 1e-3 * delta[0]
    single = kkt_residual(prob, jax.tree_util.tree_map(lambda a: a[-1], snaps))
    assert float(single.eps) == pytest.approx(float(eps[-1]), rel=1e-8, abs=1e-14)


def test_multiclass_constraints_are_s_nj_for_the_other_classes():
    X, y = data.gaussian_classes(12, 4, 3, seed=1)
    model = models.linear(4, 3)
    prob = make_problem(model, losses.cross_entropy(), X, y)
    params = model.init(jax.random.PRNGKey(0))
    c = np.asarray(constraints(prob, params)).reshape(12, 2)
    out = np.asarray(model.apply(params, X))
    expected = np.stack([np.delete(out[n, y[n]] - out[n], y[n]) for n in range(12)])
    np.testing.assert_allclose(c, expected, rtol=1e-13)
