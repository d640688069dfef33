import numpy as np
import pytest

from homoflow import losses, models
from homoflow.models import HomogeneityError
from homoflow.problem import make_problem

X = np.random.default_rng(0).normal(size=(20, 4))
Y = np.sign(X[:, 0]) + (X[:, 0] == 0)


def test_binary_labels_in_zero_one_are_rejected_with_a_hint():
    with pytest.raises(ValueError, match=r"\{-1, \+1\}, got values \[0(\.0)?\].*2 \* y - 1"):
        make_problem(models.linear(4), losses.exponential(), X, (Y > 0).astype(float))


def test_binary_labels_with_other_values_are_named():
    y = Y.copy()
    y[3] = 2.5
    with pytest.raises(ValueError, match=r"got values \[2\.5\]"):
        make_problem(models.linear(4), losses.exponential(), X, y)


def test_multiclass_labels_out_of_range_are_named():
    y = np.arange(20) % 3
    y[5] = 7
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2 .* got values \[7\]"):
        make_problem(models.linear(4, 3), losses.cross_entropy(), X, y)


def test_label_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match=r"y must have shape \(N,\) = \(20,\).*got shape \(19,\)"):
        make_problem(models.linear(4), losses.exponential(), X, Y[:19])


def test_input_shape_mismatch_with_the_model_is_rejected():
    with pytest.raises(ValueError, match=r"'linear' cannot be applied to inputs of shape \(4,\)"):
        make_problem(models.linear(5), losses.exponential(), X, Y)


def test_nan_and_inf_in_X_are_located():
    bad = X.copy()
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*index \(7, 2\)"):
        make_problem(models.linear(4), losses.exponential(), bad, Y)
    bad[7, 2] = np.inf
    with pytest.raises(ValueError, match=r"index \(7, 2\): inf"):
        make_problem(models.linear(4), losses.exponential(), bad, Y)


def test_cross_entropy_needs_a_multiclass_model():
    with pytest.raises(ValueError, match="cross_entropy needs a multi-class model"):
        make_problem(models.linear(4), losses.cross_entropy(), X, Y)


def test_declared_order_refuted_at_problem_construction():
    good = models.mlp((4, 6, 1))
    wrong = models.Model("mislabelled", good.init, good.apply, 1.0, (0.5, 0.5))
    with pytest.raises(HomogeneityError, match="mislabelled.*declared 1 but measured 2"):
        make_problem(wrong, losses.exponential(), X, Y)


def test_multiclass_margins_follow_appendix_f():
    model = models.linear(4, 3)
    y = np.arange(20) % 3
    prob = make_problem(model, losses.cross_entropy(), X, y)
    params = model.init(__import__("jax").random.PRNGKey(0))
    out = np.asarray(model.apply(params, X))
    s = out[np.arange(20), y][:, None] - out
    s[np.arange(20), y] = np.inf
    q, q_loss, _ = prob.margin_terms(params)
    np.testing.assert_allclose(q, s.min(axis=1), rtol=1e-14)
    np.testing.assert_allclose(q_loss, -np.log(np.exp(-s).sum(axis=1)), rtol=1e-12)
    ce = np.sum(-np.log(np.exp(out[np.arange(20), y]) / np.exp(out).sum(axis=1)))
    assert float(prob.log_loss(params)) == pytest.approx(np.log(ce), rel=1e-12)


def test_class_gaps_are_score_differences_with_the_own_class_filled():
    from homoflow.attacks import class_gaps as attack_gaps, multiclass_margin
    from homoflow.problem import class_gaps
    out = np.array([[1.0, 3.0, -2.0], [0.5, 0.25, 4.0]])
    y = np.array([1, 2])
    s, mask = class_gaps(out, y)
    np.testing.assert_array_equal(s, [[2.0, 0.0, 5.0], [3.5, 3.75, 0.0]])
    np.testing.assert_array_equal(mask, [[False, True, False], [False, False, True]])
    inf_filled = attack_gaps(out, y)
    assert np.all(np.isinf(inf_filled[mask])) and np.array_equal(inf_filled[~mask], s[~mask])
    np.testing.assert_array_equal(multiclass_margin(out, y), [2.0, 3.5])
