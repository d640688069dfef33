import jax
import jax.numpy as jnp
import numpy as np
import pytest

from homoflow import models
from homoflow.models import HomogeneityError, check_homogeneity

from conftest import RTOL_F64, all_models, model_id

MODELS = all_models()


def _inputs(shape, n=12, seed=0):
    return jax.random.normal(jax.random.PRNGKey(seed), (n,) + shape)


@pytest.mark.parametrize("entry", MODELS, ids=[model_id(e) for e in MODELS])
def test_measured_order_equals_declared_for_every_model(entry):
    model, shape = entry
    params = model.init(jax.random.PRNGKey(1))
    report = check_homogeneity(model, params, _inputs(shape), rtol=RTOL_F64)
    assert abs(report.order - model.order) <= RTOL_F64 * model.order
    for measured, declared in zip(report.layer_orders, model.layer_orders):
        assert abs(measured - declared) <= RTOL_F64 * declared


@pytest.mark.parametrize("entry", MODELS, ids=[model_id(e) for e in MODELS])
def test_euler_identity_theta_dot_grad_output_equals_L_output(entry):
    """Theorem B.2(b): <theta, h> = L Phi for the autodiff selection h of every output
    (relative to the largest output, tolerance 1e-10)."""
    model, shape = entry
    params = model.init(jax.random.PRNGKey(2))
    X = _inputs(shape, n=6, seed=1)
    out = model.apply(params, X)
    jac = jax.jacrev(model.apply)(params, X)  # leaves of shape out.shape + leaf.shape
    lhs = sum(jnp.tensordot(j, p, axes=p.ndim) for j, p in zip(jax.tree_util.tree_leaves(jac),
                                                                jax.tree_util.tree_leaves(params)))
    scale = float(jnp.max(jnp.abs(out))) * model.order
    np.testing.assert_allclose(lhs, model.order * out, rtol=0, atol=1e-10 * scale)


def test_wrong_declared_order_is_refuted_with_both_values_in_the_message():
    good = models.mlp((4, 8, 1))
    wrong = models.Model("mlp-wrong", good.init, good.apply, 3.0, (2.0, 1.0))
    params = good.init(jax.random.PRNGKey(0))
    with pytest.raises(HomogeneityError, match=r"declared 3 but measured 2(\.0*)? "):
        check_homogeneity(wrong, params, _inputs((4,)))


def test_wrong_layer_order_is_refuted():
    good = models.mlp((4, 8, 1), models.relu_power(3))  # layer orders (3, 1)
    wrong = models.Model("swapped", good.init, good.apply, 4.0, (1.0, 3.0))
    with pytest.raises(HomogeneityError, match="parameter group 0"):
        check_homogeneity(wrong, good.init(jax.random.PRNGKey(0)), _inputs((4,)))


def test_user_network_with_a_second_layer_bias_is_not_homogeneous():
    # a * <w, x> + b: degree 2 in (a, w) but degree 1 in b, so no single order exists
    def apply(params, X):
        g = params[0]
        return g["a"] * (X @ g["w"]) + g["b"]

    init = lambda key: ({"a": jnp.asarray(1.5), "w": jax.random.normal(key, (4,)),
                         "b": jnp.asarray(0.7)},)
    model = models.homogeneous_model(apply, init, order=2.0, name="biased")
    with pytest.raises(HomogeneityError, match="biased"):
        check_homogeneity(model, init(jax.random.PRNGKey(0)), _inputs((4,)))


def test_user_homogeneous_function_passes_the_check():
    # Phi(a, b; x) = a^2 <b, x>: order 3, layer orders (2, 1)
    apply = lambda p, X: p[0] ** 2 * (X @ p[1])
    init = lambda key: (jnp.asarray(1.3), jax.random.normal(key, (4,)))
    model = models.homogeneous_model(apply, init, 3.0, (2.0, 1.0))
    report = check_homogeneity(model, init(jax.random.PRNGKey(0)), _inputs((4,)))
    assert report.layer_orders == pytest.approx((2.0, 1.0), rel=RTOL_F64)


def test_layer_orders_must_sum_to_the_order():
    with pytest.raises(ValueError, match="sum to"):
        models.Model("bad", lambda k: (), lambda p, X: X, 2.0, (1.0, 0.5))


def test_cnn_first_layer_bias_keeps_parameter_homogeneity_but_not_input_homogeneity():
    model = models.cnn((8, 8), channels=(3,), hidden=5, bias_first=True)
    params = model.init(jax.random.PRNGKey(0))
    params = ({"w": params[0]["w"], "b": jnp.full((3,), 0.3)},) + params[1:]
    X = _inputs((8, 8))
    check_homogeneity(model, params, X)  # homogeneous in theta
    out, out2 = model.apply(params, X), model.apply(params, 2.0 * X)
    assert not np.allclose(out2, 2.0 * out, rtol=1e-6)  # ... not in x


def test_mexican_hat_initial_condition_has_psi_zero():
    (theta,) = models.mexican_hat_params(0.6)
    u, v = float(theta[0]), float(theta[1])
    r = np.hypot(u, v)
    phi = np.arctan2(v, u) % (2 * np.pi)
    assert abs(np.linalg.norm(theta) - 1) < 1e-15
    assert abs(phi - (1 / (1 - r * r)) % (2 * np.pi)) < 1e-12


def test_mexican_hat_gradient_is_finite_at_r_zero_and_r_one():
    model = models.mexican_hat(2.0)
    X = jnp.zeros((1, 1))
    for theta in ([0.0, 0.0, 1.0], [1.0, 0.0, 0.0]):
        g = jax.grad(lambda p: model.apply(p, X)[0])((jnp.asarray(theta),))
        assert np.all(np.isfinite(g[0]))


@pytest.mark.parametrize("entry", MODELS, ids=model_id)
def test_init_scale_multiplies_every_parameter_and_the_outputs_by_scale_to_the_L(entry):
    model, shape = entry
    key = jax.random.PRNGKey(3)
    p1, p2 = model.init(key), model.init(key, scale=0.01)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        np.testing.assert_array_equal(b, 0.01 * a)  # one rounding: the product itself
    if model.homogeneous:
        x = _inputs(shape, n=4)
        np.testing.assert_allclose(model.apply(p2, x), 0.01 ** model.order * model.apply(p1, x),
                                   rtol=RTOL_F64, atol=1e-300)
    for a, b in zip(jax.tree_util.tree_leaves(p1),
                    jax.tree_util.tree_leaves(model.init(key, scale=1.0))):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_init_scale_is_rejected_naming_it(scale):
    with pytest.raises(ValueError, match=f"init scale must be a finite number > 0, got {scale}"):
        models.linear(3).init(jax.random.PRNGKey(0), scale=scale)


@pytest.mark.parametrize("shape,kernels", [((12, 12, 2), (5, 3)), ((16, 3), (4, 3)),
                                           ((9, 10, 1), (2, 3))])
def test_cnn_convolution_derivatives_equal_xla_convolution_derivatives(shape, kernels):
    """The CNN's convolution (``models._conv_same``: W-derivative as a matmul of shifted
    windows, for XLA-CPU's speed inside loops) has XLA's derivatives: gradient in both
    operands, forward mode, Hessian-vector products and vmap, odd and even kernels, 1-D
    and 2-D. Tolerance: both sum the same products in different orders, so they agree to
    a few ulps of the largest entry (2e-15 measured); 1e-13 leaves a margin for other CPUs."""
    dims = len(shape) - 1
    X = jax.random.normal(jax.random.PRNGKey(0), (7,) + shape)
    W1 = jax.random.normal(jax.random.PRNGKey(1), (kernels[0],) * dims + (shape[-1], 4))
    W2 = jax.random.normal(jax.random.PRNGKey(2), (kernels[1],) * dims + (4, 3))

    def f(conv):
        return lambda W1, W2, X: jnp.sum(jnp.sin(conv(jax.nn.relu(conv(X, W1)), W2)))

    ours, xla = f(models._conv_same), f(models.conv_same)

    def close(a, b):
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_allclose(u, v, rtol=0, atol=1e-13 * float(jnp.max(jnp.abs(v))))

    close(jax.grad(ours, (0, 1, 2))(W1, W2, X), jax.grad(xla, (0, 1, 2))(W1, W2, X))
    v = jax.random.normal(jax.random.PRNGKey(3), W1.shape)
    close(jax.jvp(lambda W: ours(W, W2, X), (W1,), (v,)), jax.jvp(lambda W: xla(W, W2, X), (W1,), (v,)))
    close(jax.jvp(lambda W: jax.grad(ours)(W, W2, X), (W1,), (v,))[1],
          jax.jvp(lambda W: jax.grad(xla)(W, W2, X), (W1,), (v,))[1])
    close(jax.vmap(jax.grad(ours), (None, None, 0))(W1, W2, X[:, None]),
          jax.vmap(jax.grad(xla), (None, None, 0))(W1, W2, X[:, None]))
