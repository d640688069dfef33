import jax
import jax.numpy as jnp
import numpy as np
import pytest

from homoflow import attacks, models

# the bar for the attack on a linear classifier
ATTACK_RTOL = 1e-4


def _linear_case(n_classes, seed=0, n=300, d=16):
    """Points in the middle of [0, 1]^d whose closest boundary point is inside the box, so
    the exact distance to the decision boundary is min_j s_j / ||w_y - w_j||."""
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(d, n_classes))
    X = 0.5 + 0.1 * rng.normal(size=(n, d))
    out = X @ W
    y = np.argmax(out, axis=1)
    s = out[np.arange(n), y][:, None] - out
    lip = np.linalg.norm(W[:, y].T[:, :, None] - W[None], axis=1)
    ratio = np.where(np.arange(n_classes)[None] == y[:, None], np.inf,
                     s / np.where(lip > 0, lip, 1.0))
    exact, j = ratio.min(axis=1), ratio.argmin(axis=1)
    normal = (W[:, y] - W[:, j]).T
    foot = X - exact[:, None] * normal / np.linalg.norm(normal, axis=1, keepdims=True)
    keep = (foot.min(axis=1) > 0) & (foot.max(axis=1) < 1)
    return W, X[keep], y[keep], exact[keep]


@pytest.mark.parametrize("n_classes", [2, 3])
def test_attack_finds_the_exact_distance_to_a_linear_decision_boundary(n_classes):
    W, X, y, exact = _linear_case(n_classes)
    assert len(y) >= 50
    model = models.linear(X.shape[1], n_classes)
    res = attacks.l2_attack(model.apply, (jnp.asarray(W),), X, y, box=(0.0, 1.0),
                            binary_steps=4, steps=60, polish_steps=3)
    np.testing.assert_allclose(res.distance, exact, rtol=ATTACK_RTOL)
    # what it returns is a genuine adversarial point in the box at that distance
    m = attacks.multiclass_margin(model.apply((jnp.asarray(W),), jnp.asarray(res.x_adv)),
                                  jnp.asarray(y))
    assert np.all(np.asarray(m) < 0)
    assert res.x_adv.min() >= 0.0 and res.x_adv.max() <= 1.0
    np.testing.assert_allclose(np.linalg.norm(res.x_adv - X, axis=1), res.distance, rtol=1e-12)


def test_attack_on_a_binary_linear_model_with_plus_minus_one_labels():
    W, X, y, exact = _linear_case(2, seed=1)
    w = W[:, 1] - W[:, 0]  # Phi = <w, x>, label +1 for class 1
    model = models.linear(X.shape[1])
    res = attacks.l2_attack(model.apply, (jnp.asarray(w[:, None]),), X, 2.0 * y - 1.0,
                            binary_steps=4, steps=60, polish_steps=3)
    np.testing.assert_allclose(res.distance, exact, rtol=ATTACK_RTOL)
    cert = attacks.certified_radius(model, (jnp.asarray(w[:, None]),), X, 2.0 * y - 1.0)
    np.testing.assert_allclose(cert, exact, rtol=1e-12)  # the bound is tight for one layer


def test_certified_radius_of_a_linear_model_is_the_exact_distance():
    W, X, y, exact = _linear_case(3, seed=2)
    cert = attacks.certified_radius(models.linear(X.shape[1], 3), (jnp.asarray(W),), X, y)
    np.testing.assert_allclose(cert, exact, rtol=1e-12)


@pytest.fixture(scope="module")
def small_cnn():
    model = models.cnn((8, 8), channels=(3, 4), hidden=8, n_outputs=4, bias_first=True)
    params = model.init(jax.random.PRNGKey(3))
    params = (dict(params[0], b=0.1 * jax.random.normal(jax.random.PRNGKey(4), (3,))),
              *params[1:])
    X = jax.random.uniform(jax.random.PRNGKey(5), (40, 8, 8))
    y = jnp.argmax(jax.jit(model.apply)(params, X), axis=1)  # every point correctly classified
    return model, params, X, y


def test_lipschitz_bound_dominates_every_observed_difference_quotient(small_cnn):
    model, params, X, _ = small_cnn
    K, W_out = attacks.lipschitz_factors(model, params)
    keys = jax.random.split(jax.random.PRNGKey(6), 2)
    X2 = X + 0.3 * jax.random.normal(keys[0], X.shape)
    diff = model.apply(params, X) - model.apply(params, X2)  # (N, C)
    dist = jnp.linalg.norm((X - X2).reshape(len(X), -1), axis=1)
    pair_diff = jnp.abs(diff[:, :, None] - diff[:, None, :]) / dist[:, None, None]
    pair_bound = K * jnp.linalg.norm(W_out[:, :, None] - W_out[:, None, :], axis=0)
    assert bool(jnp.all(pair_diff <= pair_bound[None]))
    assert float(jnp.max(pair_diff / jnp.where(pair_bound > 0, pair_bound, 1.0))) > 0.01


def test_certified_radius_never_exceeds_the_attack_distance_on_a_cnn(small_cnn):
    model, params, X, y = small_cnn
    res = attacks.l2_attack(model.apply, params, X, y, binary_steps=3, steps=40, polish_steps=2)
    cert = attacks.certified_radius(model, params, X, y)
    assert np.all(np.isfinite(res.distance)) and np.all(cert > 0)
    assert np.all(cert <= res.distance)
    m = attacks.multiclass_margin(model.apply(params, jnp.asarray(res.x_adv)), y)
    assert np.all(np.asarray(m) < 0)


def test_robust_accuracy_counts_points_with_robustness_above_eps():
    acc = attacks.robust_accuracy(np.array([0.0, 0.5, 1.0, np.inf]), np.array([0.0, 0.5, 2.0]))
    np.testing.assert_array_equal(acc, [0.75, 0.5, 0.25])
