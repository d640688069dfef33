import math
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import homoflow
from homoflow import configs, data, losses, models, schedules
from homoflow.problem import make_problem

D = importlib.import_module("homoflow.descent")   # the module (homoflow.descent is the function)


@pytest.fixture(scope="module")
def default_run(default_problem):
    prob, params0 = default_problem
    return homoflow.descent(prob, params0, schedules.loss_based(), 10_000, progress=False)


def test_default_loss_based_run_records_only_finite_values(default_run):
    c = default_run.columns
    assert default_run.status == "completed" and c["step"][-1] == 10_000
    for name, col in c.items():
        if name == "descent_margin":  # defined from t0 on (Appendix E.2)
            col = col[c["step"] >= default_run.meta["t0_step"]]
        if name in ("kkt_eps", "kkt_delta", "kkt_eps_lower"):  # NaN exactly while q_min <= 0
            assert np.array_equal(np.isnan(col), c["q_min"] <= 0), name
            col = col[c["q_min"] > 0]
        if name in ("log_T", "log_lr"):  # at step 0: T = 0 (log T = -inf), no step yet
            assert c["log_T"][0] == -np.inf and np.isnan(c["log_lr"][0])
            col = col[1:]
        assert np.all(np.isfinite(col)), name


def test_loss_based_scheduler_only_accepts_loss_decreases(default_run):
    c = default_run.columns
    assert np.all(np.diff(c["log_loss"]) < 0)
    assert np.all(np.diff(c["log_T"][1:]) > 0)
    assert np.all(c["attempts"] >= c["step"])


def test_summary_counts_smoothed_margin_decreases_from_the_columns(default_run):
    c = default_run.columns
    sep = c["separated"].astype(bool)
    g = c["smoothed_margin"][sep]
    manual = int(np.sum(g[1:] < g[:-1] * (1 - 1e-10)))
    assert default_run.summary()["smoothed_margin_decreases"] == manual


@pytest.mark.filterwarnings("ignore:the loss never fell")  # short runs, before t0
def test_constant_step_matches_a_hand_written_gradient_descent_loop(default_problem):
    prob, params0 = default_problem
    lr, steps = 3e-5, 25
    traj = homoflow.descent(prob, params0, schedules.constant(lr), steps, progress=False,
                            n_records=3, kkt=False)
    p = params0
    for _ in range(steps):  # theta <- theta - lr grad L, with L formed directly
        g = jax.grad(lambda z: jnp.sum(jnp.exp(-prob.margins(z))))(p)
        p = jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)
    for got, want in zip(jax.tree_util.tree_leaves(traj.snapshots), jax.tree_util.tree_leaves(p)):
        np.testing.assert_allclose(got[-1], want, rtol=1e-11, atol=1e-14)
    assert traj["log_T"][-1] == pytest.approx(math.log(steps * lr), rel=1e-12)


def test_too_large_constant_step_stops_naming_the_iteration_and_keeps_the_record(default_problem):
    prob, params0 = default_problem
    with pytest.raises(homoflow.RunStopped, match="blew up at iteration 1") as info:
        homoflow.descent(prob, params0, schedules.constant(0.05), 100, progress=False, kkt=False)
    traj = info.value.trajectory
    assert info.value.step == 1 and info.value.reason == "diverged"
    assert len(traj) >= 1 and traj["step"][-1] == 0  # the last good state is kept
    assert np.all(np.isfinite(traj["log_loss"]))


def test_non_finite_parameters_stop_the_run_and_say_so(default_problem):
    prob, params0 = default_problem
    with pytest.raises(homoflow.RunStopped, match="parameters became non-finite.*iteration 1"):
        homoflow.descent(prob, params0, schedules.constant(1e308), 10, progress=False, kkt=False)


def test_loss_based_scheduler_backs_off_from_a_huge_alpha(default_problem):
    prob, params0 = default_problem
    traj = homoflow.descent(prob, params0, schedules.loss_based(alpha0=1e8), 50,
                            progress=False, n_records=10, kkt=False)
    assert traj.status == "completed"
    assert traj["attempts"][-1] > traj["step"][-1] + 100  # at least log(1e8)/log(r_d) retries
    assert np.all(np.diff(traj["log_loss"]) < 0)


def test_data_that_never_separates_is_reported_without_margin_claims():
    X = np.array([[1.0, 0.5], [1.0, 0.5], [-0.3, 2.0], [0.7, -1.0]])
    y = np.array([1.0, -1.0, 1.0, -1.0])  # the same point with both labels
    prob = make_problem(models.linear(2), losses.exponential(), X, y)
    with pytest.warns(UserWarning, match="never fell below the separability threshold"):
        traj = homoflow.descent(prob, models.linear(2).init(jax.random.PRNGKey(0)),
                                schedules.loss_based(), 300, progress=False, kkt=False)
    s = traj.summary()
    assert s["status"] == "not_separated" and not s["separated"]
    assert "normalized_margin" not in s and traj.meta["t0_step"] is None


def _smooth_problem():
    X, y = data.linearly_separable(40, 5, 1)
    model = models.mlp((5, 20, 1), models.relu_power(3))  # C^2: assumption (S1)
    prob = make_problem(model, losses.exponential(), X, y)
    return prob, jax.tree_util.tree_map(lambda x: 0.5 * x, model.init(jax.random.PRNGKey(0)))


def test_descent_margin_never_decreases_at_the_h_bound_for_a_smooth_model():
    """Theorem E.2: gamma_hat(t+1) >= gamma_hat(t) after t0 when eta <= H(L) (relative
    tolerance 1e-10). C_eta is built from sampled estimates of B0, B1, B2."""
    prob, params0 = _smooth_problem()
    B = schedules.estimate_smoothness_constants(prob, jax.random.PRNGKey(1), n_directions=8)
    assert B["estimate"] is True
    policy = schedules.h_bound(constants=(B["B0"], B["B1"], B["B2"]), lr_before_t0=0.01)
    traj = homoflow.descent(prob, params0, policy, 3000, progress=False, t0_log_loss=-2.0,
                            kkt=False)   # (the KKT columns: one NNLS per record, unused)
    g = traj["descent_margin"][np.isfinite(traj["descent_margin"])]
    assert len(g) > 20
    assert traj.count_decreases("descent_margin", rtol=1e-10) == 0
    assert g[-1] > g[0]


def test_smoothness_estimate_is_finite_where_some_margin_has_a_zero_hessian():
    """A data point at the origin has q_n = 0 for every theta (zero Hessian): the power
    iteration must report 0 for it, not 0/0 = NaN, so B2 stays finite."""
    X = np.array([[1.0, 0.5], [0.0, 0.0], [-1.0, 0.3]])
    model = models.mlp((2, 4, 1), models.relu_power(3))
    prob = make_problem(model, losses.exponential(), X, np.array([1.0, 1.0, -1.0]))
    B = schedules.estimate_smoothness_constants(prob, jax.random.PRNGKey(0), n_directions=4)
    assert all(np.isfinite(B[k]) and B[k] > 0 for k in ("B0", "B1", "B2"))


def test_descent_margin_never_decreases_with_a_small_constant_step_for_a_smooth_model():
    prob, params0 = _smooth_problem()
    traj = homoflow.descent(prob, params0, schedules.constant(0.01), 5000, progress=False,
                            kkt=False)
    g = traj["descent_margin"][np.isfinite(traj["descent_margin"])]
    assert len(g) > 20 and g[-1] > 10 * g[0]
    assert traj.count_decreases("descent_margin", rtol=1e-10) == 0


def test_minibatch_sgd_runs_epochs_and_accumulates_T_per_update():
    X, y = data.linearly_separable(40, 5, 2)
    model = models.mlp((5, 16, 1))
    prob = make_problem(model, losses.logistic(), X, y)
    traj = homoflow.descent(prob, model.init(jax.random.PRNGKey(0)), schedules.constant(0.05),
                            30, batch_size=10, progress=False, n_records=5, kkt=False)
    assert traj["log_loss"][-1] < traj["log_loss"][0] - 1.0
    assert traj["log_T"][-1] == pytest.approx(math.log(30 * 4 * 0.05), rel=1e-12)


@pytest.mark.filterwarnings("ignore:the loss never fell")  # 3 epochs, before t0
def test_sgd_records_without_the_gradient_keep_every_other_column():
    """``record_gradient=False`` (the paper-CNN's per-epoch records): the same run, beta
    NaN, every other column equal; the final message still gives ||grad log L||."""
    X, y = data.linearly_separable(40, 5, 2)
    model = models.mlp((5, 16, 1))
    prob = make_problem(model, losses.logistic(), X, y)
    runs = [homoflow.descent(prob, model.init(jax.random.PRNGKey(0)), schedules.loss_based(),
                             3, batch_size=10, progress=False, record_at=range(1, 4),
                             kkt=False, record_gradient=g) for g in (True, False)]
    full, light = runs
    assert np.all(np.isnan(light["beta"])) and np.all(np.isfinite(full["beta"]))
    for name in ("log_loss", "q_min", "normalized_margin", "smoothed_margin", "attempts"):
        np.testing.assert_array_equal(light[name], full[name], err_msg=name)
    assert light.meta["message"] == full.meta["message"] and "||grad log L|| = " in \
        full.meta["message"]


@pytest.mark.filterwarnings("ignore:the loss never fell")  # short runs, before t0
def test_optax_adam_decreases_the_loss_and_T_uses_the_injected_learning_rate(default_problem):
    prob, params0 = default_problem
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    traj = homoflow.descent(prob, params0, schedules.optax_optimizer(opt), 200, progress=False,
                            n_records=5, kkt=False)
    assert traj["log_loss"][-1] < traj["log_loss"][0] - 1.0
    assert traj["log_T"][-1] == pytest.approx(math.log(200 * 1e-3), rel=1e-9)


@pytest.mark.parametrize("make, match", [
    (lambda: schedules.constant(-0.1), r"lr must be a finite number > 0, got -0\.1"),
    (lambda: schedules.constant(float("nan")), r"got nan"),
    (lambda: schedules.loss_based(alpha0=0.0), r"alpha0 must be .* got 0\.0"),
    (lambda: schedules.loss_based(r_u=0.5), r"r_u and r_d must be >= 1"),
    (lambda: schedules.h_bound(), r"exactly one of c_eta or constants"),
    (lambda: schedules.optax_optimizer(optax.sgd(0.1), objective="margin"), r"'margin'"),
])
def test_bad_policy_parameters_name_the_value(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_batch_size_and_step_count_are_rejected(default_problem):
    prob, params0 = default_problem
    with pytest.raises(ValueError, match=r"batch_size must be in 1\.\.N = 100, got 500"):
        homoflow.descent(prob, params0, schedules.loss_based(), 10, batch_size=500)
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        homoflow.descent(prob, params0, schedules.loss_based(), 0)


def test_record_grid_is_log_spaced_from_zero_to_the_last_step():
    grid = homoflow.record_grid(10_000, 50)
    assert grid[0] == 0 and grid[-1] == 10_000 and np.all(np.diff(grid) > 0)
    ratios = grid[-10:][1:] / grid[-10:][:-1]
    assert np.allclose(ratios, ratios[0], rtol=0.05)


@pytest.mark.slow  # 42 s on a quiet 2-core machine; benchmarks/descent_reach.py measures it
def test_default_problem_reaches_log_loss_below_minus_1e5_with_finite_records(default_problem):
    """Far into the asymptotic regime: L = e^{-10^5} is 10^-43430, where L itself, grad L and
    eta = alpha / L all leave float64's range; homoflow carries their logs. The loss-based
    scheduler gains ~0.2 in log(1/L) per iteration on this problem (its stable alpha shrinks
    like 1 / log(1/L)), so this takes 5 * 10^5 iterations (~40 s on two cores)."""
    prob, params0 = default_problem
    traj = homoflow.descent(prob, params0, schedules.loss_based(), 500_000, progress=False,
                            n_records=60, snapshots=False)
    c = traj.columns
    assert c["log_loss"][-1] <= -1e5
    t0 = traj.meta["t0_step"]
    for name, col in c.items():
        if name == "descent_margin":
            col = col[c["step"] >= t0]
        if name in ("kkt_eps", "kkt_delta", "kkt_eps_lower"):  # NaN exactly while q_min <= 0
            assert np.array_equal(np.isnan(col), c["q_min"] <= 0), name
            col = col[c["q_min"] > 0]
        col = col[1:] if name in ("log_T", "log_lr") else col
        assert np.all(np.isfinite(col)), name
    assert c["log_lr"][-1] > 1e5  # eta = alpha / L itself would overflow float64
    # gamma_bar - gamma_tilde <= log N / rho^L still resolves at this scale
    gap = c["normalized_margin"][-1] - c["smoothed_margin"][-1]
    assert 0 <= gap <= math.log(prob.n) * math.exp(-2 * c["log_rho"][-1])


# --- honest endings, the loss-based direction, public steps --------------------------------

def _two_point_logistic():
    """A 2-D linear problem with logistic loss on which the paper's loss-based rule grows
    alpha geometrically (every long step still lowers L)."""
    X, y = data.linearly_separable(2, 2, seed=0)
    model = models.linear(2)
    return make_problem(model, losses.logistic(), X, y), model.init(jax.random.PRNGKey(0))


def test_loss_based_direction_converges_to_the_hard_margin_svm_on_a_linear_problem():
    """On linearly separable data the gradient-flow direction tends to the hard-margin SVM
    at rate O(1 / log t) (Soudry et al., JMLR 2018, with non-degenerate support vectors); the
    capped loss-based scheduler must follow it: angle and relative margin gap below
    1 / log T at the end. (The paper's uncapped rule ended 0.38 rad away, ``stalled``,
    on this problem before the cap and the exact step multiple.)"""
    from conftest import hard_margin_svm
    prob, params0 = _two_point_logistic()
    traj = homoflow.descent(prob, params0, schedules.loss_based(), 300, progress=False,
                            n_records=10, kkt=False)
    assert traj.status == "completed"
    w_svm, _ = hard_margin_svm(np.asarray(prob.X), np.asarray(prob.y))
    w = np.asarray(jax.tree_util.tree_leaves(traj.snapshots)[0][-1]).ravel()
    log_T = traj["log_T"][-1]
    assert log_T > 100
    from homoflow.kkt import angle
    assert angle(w, w_svm) < 1.0 / log_T
    gamma_svm = 1.0 / np.linalg.norm(w_svm)
    assert 0 < 1 - traj["normalized_margin"][-1] / gamma_svm < 1.0 / log_T


def test_paper_loss_based_rule_ends_saying_float64_is_exhausted():
    """Without the cap, alpha grows geometrically on this problem until float64 cannot
    resolve a further change of log L (or a longer step leaves its range): the run must end
    with that status, naming the iteration, not "stalled" blaming the scheduler."""
    prob, params0 = _two_point_logistic()
    with pytest.warns(UserWarning, match=r"float64 exhausted at iteration \d+"):
        traj = homoflow.descent(prob, params0, schedules.loss_based(radial_cap=None), 5000,
                                progress=False, n_records=10, kkt=False)
    assert traj.status == "float64_exhausted"
    assert traj.meta["stopped_at_step"] == traj["step"][-1] + 1 < 5000
    assert traj["log_T"][-1] > 1e100  # alpha grew geometrically: log T ~ -log L


@pytest.mark.parametrize("policy", [schedules.loss_based(), schedules.constant(0.5),
                                    schedules.normalized(0.1)], ids=lambda p: p.name)
def test_never_separated_data_end_not_separated_for_every_policy_with_the_evidence(policy):
    X, y = data.linearly_separable(2, 2, seed=0)
    X, y = np.concatenate([X, X]), np.concatenate([y, -y])  # each point with both labels
    prob = make_problem(models.linear(2), losses.logistic(), X, y)
    with pytest.warns(UserWarning, match=r"never fell below the separability threshold.*"
                                         r"\|\|grad log L\|\| = "):
        traj = homoflow.descent(prob, models.linear(2).init(jax.random.PRNGKey(0)), policy,
                                2000, progress=False, n_records=10, kkt=False)
    assert traj.status == "not_separated" and traj.meta["t0_step"] is None
    # log L sits at its floor: the minimum of the convex loss: theta = 0, L = 4 log 2 (4 points)
    assert traj["log_loss"][-1] == pytest.approx(math.log(4 * math.log(2)), abs=1e-6)
    # and the convergence report names non-separability, not a missing saved point
    from homoflow.kkt import convergence_report
    with pytest.raises(ValueError, match="never separated"):
        convergence_report(prob, traj)


def test_updates_below_float64_spacing_end_the_run_frozen_not_completed():
    """Logistic loss, linear model, lr 100: after a few huge steps L is so small that
    lr * grad L is below half a float64 spacing of every parameter; the run must say so
    (status "frozen" with a warning naming the iteration), not report "completed"."""
    X, y = data.linearly_separable(20, 2, seed=0)
    model = models.linear(2)
    prob = make_problem(model, losses.logistic(), X, y)
    with pytest.warns(UserWarning, match=r"update at iteration \d+ changed no parameter"):
        traj = homoflow.descent(prob, model.init(jax.random.PRNGKey(0)), schedules.constant(100.0),
                                1000, progress=False, n_records=10, kkt=False)
    assert traj.status == "frozen" and traj["step"][-1] < 1000
    # independent check: one more step from the last state changes nothing
    p = jax.tree_util.tree_map(lambda a: a[-1], traj.snapshots)
    g = jax.grad(lambda z: jnp.exp(prob.log_loss(z)))(p)
    q = jax.tree_util.tree_map(lambda a, b: a - 100.0 * b, p, g)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(p),
                                                     jax.tree_util.tree_leaves(q)))


def _tiny():
    X, y = data.linearly_separable(6, 3, seed=1)
    model = models.mlp((3, 4, 1))
    return make_problem(model, losses.exponential(), X, y), model.init(jax.random.PRNGKey(2))


@pytest.mark.filterwarnings("ignore:the loss never fell")  # 6 iterations, before t0
@pytest.mark.parametrize("policy, batch", [(schedules.loss_based(), None),
                                           (schedules.constant(0.1), None),
                                           (schedules.loss_based(), 3)],
                         ids=["loss_based", "constant", "sgd"])
def test_public_steps_under_strict_promotion_and_disable_jit_match_the_engine(policy, batch):
    """The public init/step, run eagerly under ``jax.disable_jit()`` and strict dtype
    promotion, reproduce ``descent``'s compiled run (rtol 1e-12: only XLA's fusion and
    summation order differ) and keep every float in float64."""
    prob, params0 = _tiny()
    cfg = D.step_config(prob, batch_size=batch)
    with jax.numpy_dtype_promotion("strict"):
        traj = homoflow.descent(prob, params0, policy, 6, batch_size=batch, progress=False,
                                record_at=range(1, 7), kkt=False)
        with jax.disable_jit():
            s = D.init(prob, params0, policy, cfg, jax.random.PRNGKey(0))
            while int(s.step) < 6:
                s = D.step(prob, policy, cfg, s)
    for got, want in zip(jax.tree_util.tree_leaves(s.params),
                         jax.tree_util.tree_leaves(jax.tree_util.tree_map(lambda a: a[-1],
                                                                          traj.snapshots))):
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert float(s.log_T) == pytest.approx(traj["log_T"][-1], rel=1e-12)
    assert all(x.dtype != jnp.float32 for x in jax.tree_util.tree_leaves(s))


@pytest.mark.filterwarnings("ignore:the loss never fell")  # 3 iterations, before t0
def test_optax_adam_runs_under_strict_promotion_in_float64():
    """optax's Adam mixes float64 and its int32 step count; descent scopes standard
    promotion to the optimizer's own call, so a strict session can use it."""
    prob, params0 = _tiny()
    policy = configs.build_policy(configs.resolve({"policy": "adam", "lr": 0.01}))
    with jax.numpy_dtype_promotion("strict"):
        traj = homoflow.descent(prob, params0, policy, 3, progress=False, kkt=False,
                                n_records=2)
    assert int(traj["step"][-1]) == 3   # (3 steps do not separate: status not_separated)
    assert all(x.dtype == jnp.float64 for x in jax.tree_util.tree_leaves(traj.snapshots))
    assert np.all(np.isfinite(traj["log_loss"])) and traj["log_loss"][-1] < traj["log_loss"][0]


@pytest.mark.filterwarnings("ignore:the loss never fell")  # a few iterations, before t0
def test_advance_is_compiled_once_for_every_chunk_length_and_hyperparameter(monkeypatch):
    """One program per (model, policy, config): the trip count and the policy's numbers
    (here alpha0, r_u, the cap) are traced state."""
    chex = pytest.importorskip("chex")
    prob, params0 = _tiny()
    policy = schedules.loss_based()
    cfg = D.step_config(prob)
    advance = jax.jit(chex.assert_max_traces(D.advance_loop, n=1), static_argnums=(1, 2))
    for n, state0 in [(3, policy.init()), (7, schedules.loss_based(0.5, 1.5, 1.2).init())]:
        s = D.init(prob, params0, policy, cfg, jax.random.PRNGKey(0), state0)
        s = advance(prob, policy, cfg, s, jnp.asarray(n))
        assert int(s.step) == n
    # descent() goes through the module's ``advance``: counted the same way
    chex.clear_trace_counter()
    monkeypatch.setattr(D, "advance", jax.jit(chex.assert_max_traces(D.advance_loop, n=1),
                                              static_argnums=(1, 2)))
    for steps, chunk in [(5, 2), (9, 4)]:
        homoflow.descent(prob, params0, policy, steps, chunk=chunk, progress=False, kkt=False,
                         n_records=3)


@pytest.mark.filterwarnings("ignore:the loss never fell below")   # one step: not separated
def test_a_policy_whose_init_changes_between_calls_starts_each_call_from_its_current_state():
    """descent hands the policy's init() to the compiled init as an argument: a policy object
    reused across calls with a changing initial state (the paper-cnn experiment's segments)
    starts every call from the state of that call, not of the call that compiled it (the
    bug this guards: segments after the first reused the first segment's alpha, so a resumed
    run differed from an uninterrupted one). One loss-based step from the same point with
    alpha = 0.01, then 0.001: log eta = log alpha - log L(theta0) differs by log 10 exactly."""
    import dataclasses
    X, y = data.linearly_separable(20, 3, 0)
    model = models.linear(3)
    prob = make_problem(model, losses.exponential(), X, y)
    base = schedules.loss_based(alpha0=0.01)
    cell = {"state": base.init()}
    policy = dataclasses.replace(base, init=lambda: cell["state"])
    params = model.init(jax.random.PRNGKey(0))
    first = homoflow.descent(prob, params, policy, 1, n_records=2, progress=False, kkt=False)
    cell["state"] = cell["state"]._replace(log_alpha=jnp.asarray(math.log(0.001)))
    second = homoflow.descent(prob, params, policy, 1, n_records=2, progress=False, kkt=False)
    assert first["attempts"][-1] == second["attempts"][-1] == 1   # both first steps accepted
    assert abs(first["log_lr"][-1] - second["log_lr"][-1] - math.log(10.0)) < 1e-12
