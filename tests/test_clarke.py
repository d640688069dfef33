"""The Clarke KKT residual (homoflow.clarke, kkt.kkt_residual(selection="clarke")): exact
constructions whose multipliers need kink selections strictly inside the Clarke interval,
agreement with an independent convex solver, and how eps depends on the kink tolerance."""

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from clarke_reference import clarke_eps_reference

from homoflow import kkt, losses, models
from homoflow.problem import Problem, make_problem


_ACTS = {"relu": "relu", "leaky0.1": models.leaky_relu(0.1)}
# one compiled program per model (kink_tol is traced: always pass it as a float, so every
# call has the same signature); constructions are cached so that
# their models (hashed by identity) are built once
residual = jax.jit(kkt.kkt_residual, static_argnames=(
    "max_constraints", "selection", "max_kinks_per_unit", "max_vertex_kinks", "rounds"))


@lru_cache(maxsize=None)
def _two_layer_kink_point(act="relu", t=0.5):
    """A KKT point of (P) for a width-2 two-layer net on x_1 = (1, -t), x_2 = (0, 1) (both
    q = 1) and x_3 = (3, -1) (q = 3.5, inactive), y = +1: w_1 = e_1, a_1 = 1,
    w_2 = c (t, 1), a_2 = sqrt(l), c = l^{-1/2}, l = sqrt(1 + t^2). x_2 sits on unit 1's
    kink and x_1 on unit 2's; stationarity theta = h_1 + l h_2 holds exactly with the
    derivative sigma = t / l = 0.447 at both kinks (strictly inside [0, 1] and [0.1, 1]), and
    with no other selection."""
    lam = np.sqrt(1 + t * t)
    c, a2 = lam ** -0.5, lam ** 0.5
    X = np.array([[1.0, -t], [0.0, 1.0], [3.0, -1.0]])
    prob = make_problem(models.mlp((2, 2, 1), _ACTS[act]), losses.exponential(), X, np.ones(3))
    return prob, (jnp.array([[1.0, c * t], [0.0, c]]), jnp.array([[1.0], [a2]])), lam


@lru_cache(maxsize=None)
def _depth3_kink_point(act="relu"):
    """The same point through a depth-3 net: W_1 = alpha W_1', W_2 = F a^T (rank one,
    positive: no kinks in layer 2) with F = kappa alpha a', a = (1, 1) / (sqrt 2 kappa),
    kappa = alpha^2, alpha = ||a'||^{-1/3}; then theta = sum lambda_n h_n with lambda =
    kappa lambda' and the same kink derivatives (layer 2 is active everywhere), q = 1, 1, 3.5."""
    prob2, (W1, a2), _ = _two_layer_kink_point(act)
    a2 = np.asarray(a2)[:, 0]
    alpha = np.linalg.norm(a2) ** (-1 / 3)
    kappa = alpha ** 2
    a = np.ones(2) / (np.sqrt(2) * kappa)
    prob = make_problem(models.mlp((2, 2, 2, 1), _ACTS[act]), losses.exponential(),
                        np.asarray(prob2.X), np.asarray(prob2.y))
    return prob, (alpha * W1, jnp.asarray(np.outer(kappa * alpha * a2, a)), jnp.asarray(a[:, None]))


@pytest.mark.parametrize("act", list(_ACTS))
def test_two_layer_kkt_point_needing_interior_kink_slopes_has_zero_clarke_residual(act):
    prob, theta, lam = _two_layer_kink_point(act)
    np.testing.assert_allclose(np.asarray(prob.margins(theta)), [1.0, 1.0, 3.5], rtol=1e-15)
    r = residual(prob, theta, kink_tol=1e-9)
    auto = residual(prob, theta, selection="autodiff", kink_tol=1e-9)
    assert int(r.n_kinks) == 2 and not bool(r.capped) and float(r.kink_tol) == 1e-9
    assert float(r.eps) <= 1e-10 and abs(float(r.delta)) <= 1e-10   # measured 4e-16, 0
    assert float(r.eps_lower) == float(r.eps)                         # one hidden layer: exact
    np.testing.assert_allclose(np.asarray(r.lam), [1.0, lam, 0.0], atol=1e-10)
    assert float(auto.eps) >= 0.1        # measured 0.444 (ReLU: sigma = 0), 0.823 (leaky: 1)


@pytest.mark.parametrize("act", ["relu", pytest.param("leaky0.1", marks=pytest.mark.slow)])
def test_depth3_kkt_point_bracket_contains_zero(act):
    prob, theta = _depth3_kink_point(act)
    np.testing.assert_allclose(np.asarray(prob.margins(theta)), [1.0, 1.0, 3.5], rtol=1e-14)
    r = residual(prob, theta, kink_tol=1e-9)
    assert int(r.n_kinks) == 2 and not bool(r.capped)
    # upper end of the bracket ~1e-15; lower end proven (pricing converged, all vertices
    # enumerated) and equal to it
    assert 0.0 <= float(r.eps_lower) <= float(r.eps) <= 1e-10 and abs(float(r.delta)) <= 1e-10
    auto = residual(prob, theta, selection="autodiff", kink_tol=1e-9)
    assert float(auto.eps) >= 0.1                                    # measured 0.383, 0.746


def _random_instances(act, C, count, seed, N=8, d=3, width=5):
    """Random two-layer nets with a few data points moved onto each unit's kink (w_j
    projected so that w_j . x_n = 0), labelled by the net itself (q_n >= 0.05)."""
    rng = np.random.default_rng(seed)
    model = models.mlp((d, width, C), act)
    out = []
    while len(out) < count:
        X, W1, A = rng.normal(size=(N, d)), rng.normal(size=(d, width)), rng.normal(size=(width, C))
        for j in range(width):
            for n in rng.choice(N, size=rng.integers(0, 3), replace=False):
                W1[:, j] -= (X[n] @ W1[:, j]) / (X[n] @ X[n]) * X[n]
        Z = X @ W1
        F = np.where(Z >= 0, Z, model.kinks.lo * Z) @ A
        y = np.sign(F[:, 0]) if C == 1 else np.argmax(F, axis=1).astype(np.int32)
        top = np.sort(F, axis=1)
        q = y * F[:, 0] if C == 1 else top[:, -1] - top[:, -2]
        if q.min() >= 0.05:
            out.append((X, y, W1, A))
    X, y, W1, A = (jnp.asarray(np.array(v)) for v in zip(*out))
    return model, X, y, (W1, A)


def _batched(model, loss):
    """kkt_residual vmapped over (X, y, params, kink_tol): one compiled program per model."""
    return jax.jit(jax.vmap(lambda X, y, th, tol: kkt.kkt_residual(
        Problem(X, y, model, loss), th, kink_tol=tol), (0, 0, 0, None)))


_GROUPS = [("relu", 1, 0), (models.leaky_relu(0.2), 3, 1)]


@pytest.fixture(scope="module")
def random_groups():
    out = []
    for act, C, seed in _GROUPS:
        model, X, y, th = _random_instances(act, C, 20, seed)
        loss = losses.exponential() if C == 1 else losses.cross_entropy()
        out.append((model, loss, X, y, th, _batched(model, loss)))
    return out


def test_one_hidden_clarke_eps_equals_an_independent_cvxpy_solve_on_40_instances(random_groups):
    """40 instances (20 ReLU binary, 20 leaky-ReLU 3-class, 0-5 active kinks each): eps and
    delta agree with ``clarke_eps_reference`` (explicit gradients, cvxpy/Clarabel SOCP,
    polished on its active set) to 1e-8 relative to max(1, eps) (eps ~ 2-25 here;
    measured worst <= 1e-12 relative)."""
    n_kinks = []
    for model, loss, X, y, th, f in random_groups:
        r = f(X, y, th, 1e-9)
        for i in range(X.shape[0]):
            prob = Problem(X[i], y[i], model, loss)
            eps, delta, nk = clarke_eps_reference(prob, (np.asarray(th[0][i]),
                                                         np.asarray(th[1][i])))
            assert int(r.n_kinks[i]) == nk
            assert abs(float(r.eps[i]) - eps) <= 1e-8 * max(1.0, eps)
            assert abs(float(r.delta[i]) - delta) <= 1e-8 * max(1.0, eps)
            assert float(r.eps_lower[i]) == float(r.eps[i])
            n_kinks.append(nk)
    assert len(n_kinks) == 40 and sum(k > 0 for k in n_kinks) >= 35


def test_a_larger_kink_tolerance_never_raises_the_joint_residual(random_groups):
    """More active kinks enlarge the feasible set (an active kink's interval contains the
    derivative it had), so sqrt(eps^2 + delta^2) is non-increasing in kink_tol (to 1e-12
    relative) and the number of active kinks non-decreasing; tolerance 0 keeps only exact
    zeros (none here: the projected w_j . x_n are ~1e-16, not 0)."""
    model, loss, X, y, th, f = random_groups[0]
    prev_val, prev_k = None, None
    for tol in [0.0, 1e-12, 1e-9, 1e-6, 1e-3, 1e-1, 1.0]:
        r = f(X, y, th, tol)
        val = np.hypot(np.asarray(r.eps), np.asarray(r.delta))
        k = np.asarray(r.n_kinks)
        if prev_val is not None:
            assert np.all(val <= prev_val * (1 + 1e-12)) and np.all(k >= prev_k)
        prev_val, prev_k = val, k
    # at tolerance 1 every site with |z| <= ||x|| ||w|| (all) is active: the loosest residual
    assert np.all(prev_k == X.shape[1] * th[0].shape[2])


def test_a_near_kink_counts_as_a_kink_only_within_the_tolerance():
    """The construction with unit 1 moved off x_2's kink by 1e-6 (relative): with the
    default tolerance 1e-9 the kink is inactive and eps is that of the smooth piece (0.43,
    no longer a KKT point); with 1e-5 it is treated as active and eps ~ 1e-6 (optimistic:
    the certificate is for the point with the kink moved back onto 0)."""
    prob, (W1, a), _ = _two_layer_kink_point()
    W1 = W1.at[1, 0].set(1e-6)
    tight = residual(prob, (W1, a), kink_tol=1e-9)
    loose = residual(prob, (W1, a), kink_tol=1e-5)
    assert int(tight.n_kinks) == 1 and int(loose.n_kinks) == 2
    assert float(tight.eps) >= 0.1 and float(loose.eps) <= 1e-5


def test_kkt_columns_record_the_tolerance_and_the_number_of_kinks():
    prob, theta, _ = _two_layer_kink_point()
    cols = kkt.kkt_columns(prob, theta, kink_tol=1e-9)
    assert set(cols) == {"kkt_eps", "kkt_delta", "kkt_eps_lower", "kkt_kink_tol", "kkt_n_kinks",
                         "beta_clarke"}
    assert float(cols["kkt_kink_tol"]) == 1e-9 and int(cols["kkt_n_kinks"]) == 2
    assert float(cols["kkt_eps"]) <= 1e-10


def test_bad_selection_or_kink_tolerance_raises_naming_the_value():
    prob, theta, _ = _two_layer_kink_point()
    with pytest.raises(ValueError, match="'clark'"):
        kkt.kkt_residual(prob, theta, selection="clark")
    with pytest.raises(ValueError, match="-1e-09"):
        kkt.kkt_residual(prob, theta, kink_tol=-1e-9)
    with pytest.raises(ValueError, match="max_kinks_per_unit"):
        kkt.kkt_residual(prob, theta, max_kinks_per_unit=0)


@pytest.mark.slow  # ~10 s of compilation; the residual tests cover the shared slot code
def test_min_norm_clarke_element_equals_a_bounded_least_squares_solve():
    """The minimum-norm element of {sum_n w_n h_n(sigma_n)} (w = softmax(-q), the weights of
    -grad log L for the exponential loss) equals SciPy's BVLS on the dense design
    (u = w (sigma - lo) in [0, w]) to 1e-12 (measured ~1e-15), and is no longer than the
    autodiff (sigma = lo) element."""
    import scipy.optimize
    from jax.flatten_util import ravel_pytree

    from homoflow import clarke
    model, X, y, th = _random_instances("relu", 1, 3, 5)
    f = jax.jit(clarke.min_norm_element, static_argnames="max_kinks_per_unit")
    for i in range(3):
        prob = Problem(X[i], y[i], model, losses.exponential())
        params = (th[0][i], th[1][i])
        w = jax.nn.softmax(-kkt.constraints(prob, params))
        el = np.asarray(ravel_pytree(f(prob, params, w).element)[0])
        flat, unravel = ravel_pytree(params)
        sl = clarke.one_hidden_slots(prob, flat, unravel, jnp.arange(w.shape[0]), 1e-9, 8)
        b0, V = np.asarray(sl.H.T @ w), np.asarray(sl.V)
        Wn, T, d = V.shape
        cols, ubs = [], []
        for j, t in zip(*np.nonzero(np.asarray(sl.mask))):
            g = np.zeros_like(b0)
            g[: d * Wn] = np.outer(V[j, t], np.eye(Wn)[j]).ravel()
            cols.append(g)
            ubs.append(float(w[sl.owner[j, t]]))
        assert len(cols) >= 1
        A = np.array(cols).T
        u = scipy.optimize.lsq_linear(A, -b0, bounds=(0, np.array(ubs)), method="bvls",
                                      tol=1e-15).x
        np.testing.assert_allclose(el, b0 + A @ u, atol=1e-12)
        assert np.linalg.norm(el) <= np.linalg.norm(b0) * (1 + 1e-15)


@pytest.mark.parametrize("which", ["relu", pytest.param("leaky0.1", marks=pytest.mark.slow),
                                   pytest.param("depth3", marks=pytest.mark.slow)])
def test_clarke_residual_runs_under_strict_dtype_promotion_with_the_same_result(which):
    """Every array op of the Clarke residual (the exact QP with its active-set refinement,
    the deep bracket) has an explicit dtype: under jax.numpy_dtype_promotion("strict") it
    traces and returns what the standard mode returns, bit for bit."""
    prob, theta = (_depth3_kink_point("relu") if which == "depth3"
                   else _two_layer_kink_point(which)[:2])
    standard = residual(prob, theta, kink_tol=1e-9)      # compiled by the tests above
    with jax.numpy_dtype_promotion("strict"):
        strict = kkt.kkt_residual(prob, theta, kink_tol=1e-9)
    assert int(strict.n_kinks) == 2
    for a, b in zip(strict, standard):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
