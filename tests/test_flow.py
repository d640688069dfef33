"""Gradient flow: phase 1 (diffrax, original time) and phase 2 (log-polar ROS2 W-method).

These checks use models without kinks (linear, deep linear, the Mexican hat); the ReLU
network's sliding flow is checked in ``test_sliding.py``."""

import math
import warnings

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import hard_margin_svm

import homoflow
from homoflow import data, losses, models, schedules
from homoflow.flow import align, flow, flow_batch, polar_rates
from homoflow.kkt import convergence_report
from homoflow.problem import make_problem


def _linear_problem(model):
    X, y = data.linearly_separable(40, 5, 0)
    return make_problem(model, losses.exponential(), X, y), X, y


@pytest.fixture(scope="module")
def linear_flow():
    prob, X, y = _linear_problem(models.linear(5))
    traj = flow(prob, prob.model.init(jax.random.PRNGKey(0)), log_t_max=1e6, n_saves=30,
                h_max=0.005, progress=False, kkt=False)
    return prob, X, y, traj


@pytest.fixture(scope="module")
def deep_linear_flow():
    prob, _, _ = _linear_problem(models.deep_linear((5, 4, 4, 1)))
    traj = flow(prob, prob.model.init(jax.random.PRNGKey(0)), log_t_max=100.0, n_saves=15,
                rtol=1e-10, atol=1e-12, polar_rtol=1e-10, polar_atol=1e-10, progress=False,
                kkt=False)
    return prob, traj


def test_linear_flow_direction_approaches_the_svm_like_one_over_log_t(linear_flow):
    prob, X, y, traj = linear_flow
    w_svm, _ = hard_margin_svm(X, y)
    w_svm = w_svm / np.linalg.norm(w_svm)
    W = traj.snapshots[0][:, :, 0]
    err = np.linalg.norm(W / np.linalg.norm(W, axis=1, keepdims=True) - w_svm, axis=1)
    log_t = traj["log_T"]
    late = log_t >= 100
    assert late.sum() >= 8 and log_t[-1] >= 1e6
    scaled = err[late] * log_t[late]  # ~ constant if the error shrinks like 1 / log t
    assert scaled.max() / scaled.min() < 1.5
    assert np.all(np.diff(err[late]) < 0)


def test_deep_linear_flow_conserves_layer_balance_in_both_phases(deep_linear_flow):
    """W_{k+1}^T W_{k+1} - W_k W_k^T is constant along the flow (relative drift <= 1e-8).
    Weights act as h @ W here, so the invariant reads W_{k+1} W_{k+1}^T - W_k^T W_k."""
    prob, traj = deep_linear_flow
    assert set(traj["phase"]) == {1, 2}
    Ws = traj.snapshots

    def balance(i):
        return [Ws[k + 1][i] @ Ws[k + 1][i].T - Ws[k][i].T @ Ws[k][i] for k in range(2)]

    D0 = balance(0)
    for i in range(len(traj)):
        for Di, D0k in zip(balance(i), D0):
            assert np.abs(Di - D0k).max() <= 1e-8 * np.abs(D0k).max()


@pytest.mark.parametrize("which", ["linear", "deep_linear"])
def test_smoothed_margin_never_decreases_and_lemma_c9_holds_after_t0(which, linear_flow,
                                                                     deep_linear_flow):
    """Theorem 4.1 (gamma_tilde non-decreasing, relative tolerance 1e-10) and Lemma C.9:
    int (beta^-2 - 1) dlog rho <= (1/L) log(gamma_tilde(t2) / gamma_tilde(t1)) on every window
    between saved points, the left side both by the trapezoid rule on the autodiff beta and
    from the simulated path's own chords (the ``path_energy`` column)."""
    prob, traj = (linear_flow[0], linear_flow[3]) if which == "linear" else deep_linear_flow
    c = traj.columns
    after = (c["phase"] == 2) & c["separated"].astype(bool)
    g, b, tau = c["smoothed_margin"][after], c["beta"][after], c["log_rho"][after]
    assert len(g) > 10
    assert np.all(g[1:] >= g[:-1] * (1 - 1e-10))
    lhs = 0.5 * ((b[1:] ** -2 - 1) + (b[:-1] ** -2 - 1)) * np.diff(tau)
    rhs = np.log(g[1:] / g[:-1]) / prob.order
    assert np.all(lhs <= rhs)
    energy = c["path_energy"][after]
    assert np.all(np.isfinite(energy)) and np.all(np.diff(energy) <= rhs)


def test_lemma_5_1_and_the_speed_identity_hold_at_saved_points(linear_flow, deep_linear_flow):
    """d log gamma_tilde / d tau >= L ||d theta_hat / d tau||^2 (Lemma 5.1 in tau) and
    ||d theta_hat / d tau||^2 = beta^-2 - 1 = tan^2 of the angle between theta and
    G = -grad log L, at every saved point after t0.

    The right side is formed from G's component perpendicular to theta_hat,
    ||G - <G, x> x||^2 / <G, x>^2, not from beta: with 1 - beta ~ 1e-10, beta^-2 - 1 loses
    ten digits (it differed by 6e-5 relative between two CPUs). Error estimate: the
    per-point exponents u_n ~ log(1/L) are rounded to eps |u_n|, so the soft-min weights,
    hence autodiff's G and the solver's field, are off by about eps (1 + log(1/L)) |G| per
    coordinate; each side's perpendicular part over <G, x> is then off by
    delta = c eps sqrt(P) (1 + log(1/L)) and tan^2 by 2 tan delta + delta^2. Measured on
    these flows (log(1/L) up to 1e6): at most 1.9 times that with c = 1; c = 16."""
    eps = np.finfo(np.float64).eps
    for prob, traj in ((linear_flow[0], linear_flow[3]), deep_linear_flow):
        for i in np.nonzero((traj["phase"] == 2) & traj["separated"].astype(bool))[0]:
            p = jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), traj.snapshots)
            r = polar_rates(prob, p)
            assert r["dlog_smoothed_dtau"] >= prob.order * r["speed2"]
            flat = np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(p)])
            x = flat / np.linalg.norm(flat)
            G = -np.concatenate([np.ravel(a) for a in jax.tree_util.tree_leaves(
                jax.grad(prob.log_loss)(p))])
            along = G @ x
            tan2 = np.sum((G - along * x) ** 2) / along ** 2
            delta = 16 * eps * math.sqrt(flat.size) * (1 - float(prob.log_loss(p)))
            assert abs(float(r["speed2"]) - tan2) <= 2 * math.sqrt(tan2) * delta + delta ** 2


def test_speed_rate_and_the_exact_slack_of_lemma_5_1(deep_linear_flow):
    """At saved points of the depth-3 linear flow: (a) ``_speed_rate``, the JVP of |F|^2
    along the flow that the solver's end-corrected trapezoid for Lemma C.9's integral uses,
    equals a central difference along (F, 1) (relative 1e-5); (b) Lemma 5.1's slack is
    exactly L (r - 1)(1 + |F|^2) with r = sum_n w_n u_n / log(1/L) >= 1 (exponential loss,
    u the per-point losses' exponents, w = softmax(-u); relative 1e-8): d log gamma_tilde /
    d tau = L |g|^2 rho / (s log(1/L)) - L and rho s = L sum_n w_n u_n (Euler). r - 1 is the
    soft-min weights' entropy over log(1/L), so C.9 turns tight as the loss falls."""
    from homoflow.flow import polar as F
    prob, traj = deep_linear_flow
    rows = np.nonzero((traj["phase"] == 2) & traj["separated"].astype(bool))[0]
    for i in rows[:: max(1, len(rows) // 4)]:
        p = jax.tree_util.tree_map(lambda a: jnp.asarray(a[i]), traj.snapshots)
        flat, unravel = F._ravel(p)
        rho = jnp.linalg.norm(flat)
        x, tau = flat / rho, jnp.log(rho)
        Fx = F._field_only(prob, unravel, x, tau)
        rate = float(F._speed_rate(prob, unravel, x, tau, Fx))
        eps = 1e-5

        def f2(a):
            v = F._field_only(prob, unravel, x + a * Fx, tau + a)
            return float(v @ v)

        assert rate == pytest.approx((f2(eps) - f2(-eps)) / (2 * eps), rel=1e-5)
        u = F._per_point_neg_log_loss(prob, unravel, flat)
        w = jax.nn.softmax(-u)
        r = float(w @ u) / float(-jax.scipy.special.logsumexp(-u))
        got = polar_rates(prob, p)
        slack = float(got["dlog_smoothed_dtau"] - prob.order * got["speed2"])
        assert r >= 1.0
        assert slack == pytest.approx(prob.order * (r - 1) * (1 + float(got["speed2"])),
                                      rel=1e-8, abs=1e-14)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_flow_rejects_a_stiff_ref_that_is_not_positive(bad):
    prob, _, _ = _linear_problem(models.linear(5))
    params = prob.model.init(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match=r"stiff_ref must be > 0.*got"):
        flow(prob, params, stiff_ref=bad, progress=False)
    with pytest.raises(ValueError, match=r"stiff_ref must be > 0.*got"):
        flow_batch(prob, jax.tree_util.tree_map(lambda a: a[None], params), stiff_ref=bad)


def test_descent_approaches_the_flow_linearly_in_the_step_size():
    """At equal T = sum eta, ||theta_GD - theta_flow|| = O(eta): the fitted slope of
    log distance against log eta over three step sizes lies in [0.8, 1.2]."""
    prob, _, _ = _linear_problem(models.linear(5))
    params0 = prob.model.init(jax.random.PRNGKey(0))
    T, etas, dist = 2.0, [0.02, 0.01, 0.005], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # T = 2 is before t0: "not separated" is expected
        for eta in etas:
            gd = homoflow.descent(prob, params0, schedules.constant(eta), int(round(T / eta)),
                                  progress=False, n_records=5, kkt=False)
            fl = flow(prob, params0, log_t_max=2.5, save_t=np.exp(gd["log_T"][1:]), rtol=1e-12,
                      atol=1e-14, n_saves=3, progress=False, kkt=False)
            aligned = align(gd, fl)
            assert aligned["log_T"][-1] == pytest.approx(math.log(T), rel=1e-12)
            dist.append(aligned["param_distance"][-1])
    slope = np.polyfit(np.log(etas), np.log(dist), 1)[0]
    assert 0.8 <= slope <= 1.2


def test_mexican_hat_psi_is_invariant_only_with_the_corrected_c():
    """Appendix I: d psi/dt = 0 on psi = 0 needs C(r) = 4r^4 / (4r^4 + (1-r^2)^3) for the
    homogeneous model (the paper's (1-r^2)^4 drops the sphere's (1-r^2) factor in dr/dt)."""
    X = jnp.zeros((1, 1))

    def psi(th):
        rho = jnp.linalg.norm(th)
        u, v = th[0] / rho, th[1] / rho
        return jnp.arctan2(v, u) - 1 / (1 - (u * u + v * v))

    for r0 in (0.3, 0.5, 0.8):
        rates = []
        for paper_c in (False, True):
            model = models.mexican_hat(2.0, r0, paper_c=paper_c)
            (theta,) = model.init(None)
            grad = jax.grad(lambda t: model.apply((t,), X)[0])(theta)
            rates.append(float(jax.jvp(psi, (theta,), (grad,))[1]))
        assert abs(rates[0]) <= 1e-12 and abs(rates[1]) > 1e-3


def test_mexican_hat_flow_keeps_psi_zero_while_the_direction_keeps_moving():
    model = models.mexican_hat(2.0)
    prob = make_problem(model, losses.exponential(), np.zeros((1, 1)), np.ones(1))
    traj = flow(prob, model.init(None), log_t_max=1e3, n_saves=100, polar_rtol=1e-10,
                polar_atol=1e-10, progress=False)
    th = traj.snapshots[0]
    u, v = (th[:, :2] / np.linalg.norm(th, axis=1, keepdims=True)).T
    r, phi = np.hypot(u, v), np.unwrap(np.arctan2(v, u))
    psi = (phi - 1 / (1 - r ** 2) + np.pi) % (2 * np.pi) - np.pi
    assert np.abs(psi).max() <= 1e-6
    assert np.all(np.diff(r) > 0) and np.all(np.diff(phi) > 0)  # spiralling outwards
    # the convergence report does not claim a limit direction (measured path-length ratio
    # between the last two decades of log t: 0.95), while for a linear model it does (0.12)
    report = convergence_report(prob, traj, polish=False)
    assert report["verdict"].startswith("not converged")
    assert report["path_last_decade"] > 0.5 * report["path_previous_decade"]


def test_flow_on_data_that_never_separate_stops_at_the_time_limit_and_says_so():
    X = np.array([[1.0, 0.5], [1.0, 0.5], [-0.3, 2.0]])
    prob = make_problem(models.linear(2), losses.exponential(), X, np.array([1.0, -1.0, 1.0]))
    with pytest.warns(UserWarning, match="never fell below the separability threshold"):
        traj = flow(prob, models.linear(2).init(jax.random.PRNGKey(0)), log_t_max=10.0,
                    t0_limit=1e3, progress=False, kkt=False)
    assert traj.status == "not_separated" and set(traj["phase"]) == {1}


def test_non_separable_data_end_not_separated_with_the_loss_floor_as_evidence():
    """Issue 16 (5): on data no linear model separates (a point repeated with both labels)
    the flow's loss creeps to its floor log 2 (the third point's term -> 0 like 1/t) and
    Tsit5's steps are stability-limited there (about 1.4 per unit of t), so a run asked for
    log t = 1e8 ran out of max_steps and ended phase1_failed ("Try increasing max_steps").
    It ends not_separated, with the evidence: log L fell by < 1e-3 over the last decade of t
    (it falls by ~log 10 per decade on separable data), and says that phase 1 stopped short
    of the requested log t."""
    X = np.array([[1.0, 0.5], [1.0, 0.5], [-0.3, 2.0]])
    prob = make_problem(models.linear(2), losses.exponential(), X, np.array([1.0, -1.0, 1.0]))
    with pytest.warns(UserWarning, match="at its floor"):
        traj = flow(prob, models.linear(2).init(jax.random.PRNGKey(0)), log_t_max=1e8,
                    t0_limit=1e6, max_steps=3000, progress=False, kkt=False)
    assert traj.status == "not_separated", traj.meta["message"]
    floor = traj.meta["phase1_floor"]
    assert floor["at_floor"] and 0 <= floor["log_loss_fall"] < 1e-3
    assert abs(floor["log_loss"] - math.log(2.0)) < 1e-2
    assert "ran out of steps" in traj.meta["message"] and "1e+08" in traj.meta["message"]


def test_flow_vmapped_over_seeds_gives_the_numbers_of_separate_calls():
    """One vmapped call over 2 initializations equals separate runs of each: same saved
    steps, and log t, rho, gamma_bar equal to 1e-10 relative. A seed "alone" is a batch of
    copies of it, so every lane of that batch does exactly its steps: the batched loop
    keeps stepping (masked) a seed that finished while the other runs, and that must not
    change its numbers. The batch shape is the same, so the program is compiled once
    (a batch of 1 was a second 10-s compilation)."""

    prob, _, _ = _linear_problem(models.linear(5))
    batch = jax.vmap(prob.model.init)(jax.random.split(jax.random.PRNGKey(0), 2))
    together = flow_batch(prob, batch, log_t_max=300.0, n_saves=10, kkt=False)
    assert together[0]["step"][-1] != together[1]["step"][-1]   # the lanes end apart
    for b, traj in enumerate(together):
        alone = flow_batch(prob, jax.tree_util.tree_map(lambda p: p[jnp.array([b, b])], batch),
                           log_t_max=300.0, n_saves=10, kkt=False)[0]
        assert traj.meta["status"] == alone.meta["status"] == "completed"
        np.testing.assert_array_equal(traj["step"], alone["step"])
        assert traj["log_T"][-1] >= 300
        for name in ("log_T", "rho", "normalized_margin"):
            np.testing.assert_allclose(traj[name][1:], alone[name][1:], rtol=1e-10, err_msg=name)


def _overflowing_deep_linear():
    """Issue 14 (6a): depth 3 (widths 5-5-5-1), exponential loss, 40 separable points in
    R^5 (data seed 2, init seed 2; log L(theta_0) = 4.1, |dtheta/dt| = 91 at |theta| = 3.7).
    diffrax's automatic first step made exp(log L) overflow, the NaN error estimate turned
    every later step size into NaN, and flow() died in math.log(0) with no accepted step."""
    model = models.deep_linear((5, 5, 5, 1))
    X, y = data.linearly_separable(40, 5, 2)
    return make_problem(model, losses.exponential(), X, y), model.init(jax.random.PRNGKey(2))


def test_deep_linear_phase1_separates_where_the_first_step_used_to_overflow():
    """Phase 1 alone on that problem (no phase 2 to compile): the solve ends at the event
    L = l(b_f) after accepted steps, with L non-increasing at the saved times (the flow's
    loss never increases) and every saved state finite."""
    from homoflow.flow import phase1, polar
    prob, params0 = _overflowing_deep_linear()
    flat, unravel = polar._ravel(params0)
    grid = np.geomspace(1e-7, 10.0, 30)
    sol = phase1._phase1(prob, flat, unravel, phase1.Phase1Config(t0_limit=10.0,
                                                                  max_steps=2000), grid)
    assert sol.result == diffrax.RESULTS.event_occurred
    assert int(sol.stats["num_accepted_steps"]) > 0
    ts, ys = np.asarray(sol.ts), np.asarray(sol.ys)
    ys = ys[np.isfinite(ts)]
    log_loss = np.array([float(prob.log_loss(unravel(jnp.asarray(v)))) for v in ys])
    assert np.all(np.isfinite(ys)) and np.all(np.diff(log_loss) <= 1e-12)
    assert log_loss[-1] <= prob.loss.log_threshold + 1e-9


@pytest.mark.slow
def test_deep_linear_flow_completes_where_the_first_step_used_to_overflow():
    """The whole flow on that problem reaches phase 2, with gamma_tilde non-decreasing after
    t0 (relative 1e-10); ~1 min, nearly all of it compiling a new model's programs."""
    prob, params0 = _overflowing_deep_linear()
    traj = flow(prob, params0, log_t_max=3.0, t0_limit=10.0, max_steps=2000, n_saves=5,
                progress=False, kkt=False, snapshots=False)
    assert traj.meta["status"] == "completed" and traj.meta["phase1"]["steps"] > 0
    c = traj.columns
    assert np.all(np.diff(c["log_loss"]) <= 0) and set(c["phase"]) == {1, 2}
    g = c["smoothed_margin"][(c["phase"] == 2) & c["separated"].astype(bool)]
    assert len(g) >= 2 and np.all(g[1:] >= g[:-1] * (1 - 1e-10))


def test_phase1_that_cannot_finish_raises_run_stopped_naming_the_time_and_the_cause():
    """A phase-1 solve that runs out of steps is status "phase1_failed" (RunStopped with
    the time reached and diffrax's reason, and what was recorded), never a math error."""
    prob, _, _ = _linear_problem(models.linear(5))
    with pytest.raises(homoflow.RunStopped, match=r"original-time solve failed at t = .*"
                                                  r"steps") as info:
        flow(prob, prob.model.init(jax.random.PRNGKey(0)), max_steps=2, progress=False,
             kkt=False)
    assert info.value.reason == "phase1_failed"
    assert info.value.trajectory.meta["status"] == "phase1_failed"
    assert len(info.value.trajectory) >= 1


def test_flow_compiles_once_per_model_shape_and_the_budget_starts_after_compiling():
    """Issue 14 (5): a second flow on the same model and shapes (another initialization,
    other stop values, numpy or python scalars) compiles nothing new, and compile time is
    reported apart from the flow's wall time."""
    from homoflow.flow import phase1, polar, ros2
    prob, _, _ = _linear_problem(models.linear(5))
    kw = dict(n_saves=5, progress=False, kkt=False, snapshots=False)
    first = flow(prob, prob.model.init(jax.random.PRNGKey(0)), log_t_max=50.0, **kw)
    sizes = [f._cache_size() for f in (phase1._phase1_jit, polar._polar_start_jit,
                                       ros2._advance)]
    second = flow(prob, prob.model.init(jax.random.PRNGKey(1)), log_t_max=np.float64(80.0),
                  **kw)
    assert [f._cache_size() for f in (phase1._phase1_jit, polar._polar_start_jit,
                                      ros2._advance)] == sizes
    for traj in (first, second):
        assert traj.status == "completed"
        assert traj.meta["compile_time_s"] >= 0 and traj.meta["wall_time_s"] >= 0
    assert second.meta["compile_time_s"] < first.meta["compile_time_s"]


def test_on_record_sees_every_row_and_can_end_the_flow():
    """``on_record(step, params, row)`` gets each row as recorded, with the parameters of that
    row (its normalized margin recomputed from them matches the row to 1e-12), and True
    ends the run after that row, completed, with ``meta["stopped_by_hook"]``."""
    prob, _, _ = _linear_problem(models.linear(5))
    seen = []

    def hook(step, params, row):
        w = np.ravel(np.asarray(params[0]))
        q = np.asarray(prob.y) * (np.asarray(prob.X) @ w)
        seen.append((step, row["log_T"], q.min() / np.linalg.norm(w), row["normalized_margin"]))
        return row["phase"] == 2 and row["log_T"] >= 5.0

    traj = flow(prob, prob.model.init(jax.random.PRNGKey(0)), log_t_max=50.0, n_saves=20,
                progress=True, kkt=False, on_record=hook)
    assert traj.status == "completed" and traj.meta["stopped_by_hook"] == seen[-1][0]
    assert len(seen) == len(traj) and 5.0 <= traj["log_T"][-1] < 50.0
    np.testing.assert_array_equal([s[1] for s in seen], traj["log_T"])
    np.testing.assert_allclose([s[2] for s in seen], [s[3] for s in seen], rtol=1e-12)
