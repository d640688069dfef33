"""Optimizer geometry: which margin each optimizer maximizes (homoflow.geometry)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from homoflow import data, descent, geometry, losses, models, schedules
from homoflow.kkt import angle, max_margin, polish_kkt, svm_reference
from homoflow.problem import make_problem

from conftest import host_devices_env

NORMS = (1.0, 1.5, 2.0, 3.0, math.inf)


@pytest.fixture(scope="module")
def three():
    X, y = data.three_norms()
    problem = make_problem(models.linear(3), losses.exponential(), X, y)
    refs = {p: svm_reference(problem, norm=p).direction for p in NORMS}
    return problem, refs


def test_three_norms_data_has_l1_l2_linf_directions_at_least_0_3_rad_apart(three):
    _, refs = three
    for a, b in [(1.0, 2.0), (2.0, math.inf), (1.0, math.inf)]:
        assert angle(refs[a], refs[b]) >= 0.3


@pytest.mark.parametrize("p", NORMS, ids=lambda p: f"p{p:g}")
def test_lp_steepest_descent_converges_to_its_own_norms_max_margin_direction(three, p):
    # normalized steps (eta = alpha / L): ||w|| grows like t, the angle like 1/t; from w = 0
    # (a component orthogonal to the data would never move)
    problem, refs = three
    traj = descent(problem, (jnp.zeros((3, 1)),), schedules.steepest(p, schedules.normalized(2.0)),
                   20_000, progress=False, kkt=False, n_records=3)
    w = np.asarray(traj.snapshots[0][-1]).ravel()
    assert angle(w, refs[p]) < 1e-3
    for other in (1.0, 2.0, math.inf):  # sign, coordinate and GD: far from the others'
        if p in (1.0, 2.0, math.inf) and other != p:
            assert angle(w, refs[other]) >= 0.2


def _cvxpy_max_margin(Z, p):
    """An independent solve: max gamma s.t. Z w >= gamma, ||w||_p <= 1 (a different
    formulation) by cvxpy's Clarabel (an interior-point solver, not HiGHS's simplex)."""
    cp = pytest.importorskip("cvxpy")
    w, g = cp.Variable(Z.shape[1]), cp.Variable()
    prob = cp.Problem(cp.Maximize(g), [Z @ w >= g, cp.norm(w, p) <= 1])
    prob.solve(solver="CLARABEL", tol_gap_abs=1e-13, tol_gap_rel=1e-13, tol_feas=1e-13,
               max_iter=500)
    return np.asarray(w.value), float(g.value)


@pytest.mark.parametrize("p,tol", [(1.0, 1e-8), (math.inf, 1e-8), (1.5, 1e-6), (3.0, 1e-6)],
                         ids=["p1", "pinf", "p1.5", "p3"])
def test_lp_max_margin_reference_agrees_with_an_independent_convex_solve(p, tol):
    for X, y in (data.three_norms(), data.linearly_separable(12, 4, seed=5)):
        Z = y[:, None] * X
        w, alpha = max_margin(Z, p)
        v, gamma = _cvxpy_max_margin(Z, p)
        size = np.linalg.norm(w, ord=p)
        assert abs(1.0 / size - gamma) <= tol
        np.testing.assert_allclose(w / size, v, atol=tol)
        assert (Z @ w).min() >= 1 - 1e-10 and alpha.min() >= 0


def test_l2_reference_is_unchanged_and_bad_norms_name_the_value(three):
    problem, refs = three
    old = svm_reference(problem)
    np.testing.assert_allclose(old.direction, refs[2.0], atol=1e-12)
    for bad in (0.5, "x", float("nan")):
        with pytest.raises(ValueError, match="norm must be"):
            svm_reference(problem, norm=bad)
    with pytest.raises(ValueError, match="infeasible|not separable"):
        max_margin(np.array([[1.0, 0.0], [-1.0, 0.0]]), 1)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, math.inf], ids=lambda p: f"p{p:g}")
def test_steepest_direction_attains_the_dual_norm_and_is_one_homogeneous(p):
    g = jax.random.normal(jax.random.PRNGKey(1), (7,))
    ip = geometry.inv_p(p)
    d = geometry.steepest_direction(g, ip)
    q = 1.0 if math.isinf(p) else (math.inf if p == 1 else p / (p - 1))
    gq = np.linalg.norm(np.asarray(g), ord=q)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(d), ord=p), gq, rtol=1e-12)
    np.testing.assert_allclose(float(jnp.vdot(g, d)), gq ** 2, rtol=1e-12)
    np.testing.assert_allclose(geometry.steepest_direction(1e-200 * g, ip), 1e-200 * d,
                               rtol=1e-12)


def test_lp_margins_are_log_domain_and_match_the_plain_formula():
    X, y = data.linearly_separable(10, 4, seed=2)
    problem = make_problem(models.diagonal_linear(4, 2), losses.exponential(), X, y)
    params = problem.model.init(jax.random.PRNGKey(0))
    flat = np.concatenate([np.asarray(u) for u in params])
    q = np.asarray(problem.margins(params))
    for p in (1.0, 3.0, math.inf):
        m = geometry.lp_margins(problem, params, geometry.inv_p(p))
        np.testing.assert_allclose(m.normalized, q.min() / np.linalg.norm(flat, p) ** 2, rtol=1e-12)
        np.testing.assert_allclose(m.layer_normalized, q.min() / np.prod(
            [np.linalg.norm(np.asarray(u), p) for u in params]), rtol=1e-12)
    # far out (q and rho^L near float64's top) the log-domain form stays exact
    big = jax.tree_util.tree_map(lambda u: 1e150 * u, params)
    m = geometry.lp_margins(problem, big, geometry.inv_p(3.0))
    np.testing.assert_allclose(m.normalized, q.min() / np.linalg.norm(flat, 3) ** 2, rtol=1e-10)
    assert np.isfinite(float(m.smoothed))


def _steepest_path(problem, w0, ip, alpha, steps):
    """theta <- theta - alpha d(grad log L) (``steepest`` with ``normalized(alpha)``) as a
    scan; returns the smoothed l_p margin after each step."""
    def step(w, _):
        g = jax.grad(problem.log_loss)(w)
        w = jax.tree_util.tree_map(lambda a, b: a - alpha * b, w,
                                   geometry.steepest_direction(g, ip))
        return w, geometry.lp_margins(problem, w, ip).smoothed

    return jax.lax.scan(step, w0, None, length=steps)[1]


_paths = jax.jit(jax.vmap(jax.vmap(_steepest_path, (0, 0, None, None, None)),
                          (None, None, 0, None, None)), static_argnums=4)


def _random_problems(seeds, n=12, dim=4):  # dim = 4: _LINEAR4
    probs, starts = [], []
    for s in seeds:
        X, y = data.linearly_separable(n, dim, seed=s)
        problem = make_problem(_LINEAR4, _EXP, X, y, check=False)
        probs.append(problem)
        # 3 x the SVM solution: q_min = 3, so L < 1 (separated) from the start
        starts.append((jnp.asarray(svm_reference(problem).solution.reshape(dim, 1)) * 3.0,))
    stack = lambda *xs: jnp.stack(xs)
    return (jax.tree_util.tree_map(stack, *probs), jax.tree_util.tree_map(stack, *starts),
            probs[0], starts[0])


_LINEAR4, _EXP = models.linear(4), losses.exponential()  # one object each: stackable


def test_smoothed_lp_margin_never_decreases_after_separation_along_small_step_steepest_descent():
    # Gunasekar et al. 2018 / Tsilivis et al. 2025: along l_p steepest flow,
    # d(-log L)/dt = ||g||_q^2 >= ||g||_q (-log L) / ||w||_p >= (-log L) d log||w||_p / dt
    problems, starts, _, _ = _random_problems(range(10, 18))
    ips = jnp.asarray([geometry.inv_p(p) for p in (1.0, 1.5, 2.0, 3.0, math.inf)])
    g = np.asarray(_paths(problems, starts, ips, 0.01, 500))   # (norm, problem, step)
    assert np.all(np.diff(g, axis=-1) >= -1e-12 * np.abs(g[..., :-1])), np.diff(g, axis=-1).min()
    assert np.all(g[..., -1] > g[..., 0])


def test_descent_margin_norm_columns_follow_the_same_steepest_steps():
    _, _, problem, w0 = _random_problems([10])
    p = math.inf
    traj = descent(problem, w0, schedules.steepest(p, schedules.normalized(0.01)), 20,
                   progress=False, kkt=False, record_at=range(1, 21), margin_norm=p,
                   snapshots=False)
    expect = np.asarray(_steepest_path(problem, w0, geometry.inv_p(p), 0.01, 20))
    np.testing.assert_allclose(traj.columns["smoothed_margin_p"][1:], expect, rtol=1e-11)
    assert traj.meta["margin_norm"] == p
    with pytest.raises(ValueError, match="p must be"):
        descent(problem, w0, schedules.constant(0.1), 5, progress=False, margin_norm=0.3)


def _dense_top_eigenvalue(problem, params):
    from jax.flatten_util import ravel_pytree
    flat, unravel = ravel_pytree(params)
    H = jax.jit(jax.hessian(lambda z: jnp.exp(problem.log_loss(unravel(z)))))(flat)
    return float(np.linalg.eigvalsh(np.asarray(H))[-1])


@pytest.mark.parametrize("model", [models.linear(5),
                                   models.mlp((5, 4, 1), models.leaky_relu(0.1))],
                         ids=lambda m: m.name)
def test_sharpness_equals_the_dense_hessians_top_eigenvalue(model):
    X, y = data.linearly_separable(20, 5, seed=1)
    problem = make_problem(model, losses.logistic(), X, y)
    params = model.init(jax.random.PRNGKey(3))
    top = _dense_top_eigenvalue(problem, params)
    s = geometry.sharpness_jit(problem, params)
    assert abs(float(s.sharpness) - top) <= 1e-8 * max(1.0, abs(top))


def test_bad_geometry_hyperparameters_raise_naming_the_value():
    for bad in (0.5, -1, "two", float("nan")):
        with pytest.raises(ValueError, match="p must be"):
            schedules.steepest(bad)
    with pytest.raises(ValueError, match="power"):
        schedules.decaying(0.1, power=-1)
    with pytest.raises(ValueError, match="alpha"):
        schedules.normalized(0.0)
    with pytest.raises(ValueError, match="growth"):
        schedules.progressive_rescaling(growth=0.5)
    with pytest.raises(ValueError, match="period"):
        schedules.progressive_rescaling(period=0)
    with pytest.raises(ValueError, match="steepest needs a step-size policy"):
        schedules.steepest(2, schedules.dual_acceleration())


def _diagonal_run(depth, scale, lr, record_at):
    X, y = data.three_norms()
    problem = make_problem(models.diagonal_linear(3, depth), losses.exponential(), X, y)
    p0 = tuple(scale * u for u in problem.model.init(jax.random.PRNGKey(0)))
    traj = descent(problem, p0, schedules.constant(lr), record_at[-1], progress=False,
                   kkt=False, record_at=record_at)
    return problem, traj


def test_depth2_diagonal_net_heads_to_the_l1_max_margin_and_polishes_onto_it():
    # Gunasekar et al. (NeurIPS 2018): w = u * v converges to the l1 max-margin direction
    problem, traj = _diagonal_run(2, 0.3, 0.2, [5, 50, 500, 5000, 50_000])  # T = 1 ... 10^4
    ref = svm_reference(problem, norm=1)
    assert angle(ref.solution, svm_reference(problem).solution) >= 0.3
    w = [np.prod([np.asarray(u[i]) for u in traj.snapshots], axis=0) for i in range(1, 6)]
    angles = np.array([angle(v, ref.solution) for v in w])
    assert np.all(np.diff(angles) < 0), angles           # falls every decade of T
    end = tuple(jnp.asarray(u[-1]) for u in traj.snapshots)
    polished = polish_kkt(problem, end, rtol=0.0, max_iter=400)
    w_star = np.prod([np.asarray(u) for u in polished.params], axis=0)   # q_min = 1
    np.testing.assert_allclose(w_star, ref.solution, atol=1e-6)


def test_depth3_diagonal_net_ends_at_an_l_2_over_3_kkt_point_after_polish():
    # KKT points of min ||theta||^2 s.t. q_n >= 1 over (u1, u2, u3) are those of the
    # l_{2/3} max-margin problem in w = u1 * u2 * u3 (Gunasekar, Lee, Soudry & Srebro, NeurIPS 2018)
    problem, traj = _diagonal_run(3, 0.5, 0.2, [100, 100_000])
    end = tuple(jnp.asarray(u[-1]) for u in traj.snapshots)
    polished = polish_kkt(problem, end, rtol=0.0, max_iter=400)
    assert polished.eps <= 1e-6 and abs(polished.delta) <= 1e-6


def test_margin_rates_quick_benchmark_fits_the_predicted_rates():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "margin_rates.py"
    spec = importlib.util.spec_from_file_location("margin_rates", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = bench.QUICK
    result = bench.race(cfg)
    fits = bench.fit(result, cfg)
    assert abs(fits["normalized_gd"]["fitted_slope"] + 1.0) <= 0.2
    assert abs(fits["dual_acceleration"]["fitted_slope"] + 2.0) <= 0.2
    assert abs(fits["dual_acceleration"]["fitted_slope_log_corrected"] + 2.0) <= 0.2
    assert fits["gd"]["gap_x_log_T_max_over_min"] <= 2.0                    # ~ C / log T
    prgd = fits["progressive_rescaling"]
    assert prgd["r2"] > 0.99 and abs(prgd["fitted_rate"] / prgd["predicted_rate"] - 1) < 0.1
    assert prgd["final_gap"] < 1e-8
    fig = bench.figure(result)
    assert len(fig.axes[0].lines) == 4


_SHARDED = """
import json, math, jax, numpy as np
from homoflow import sweep
assert len(jax.devices()) == 8, jax.devices()
base = {"model": "linear", "depth": 1, "n": 12, "dim": 3, "steps": 200, "n_records": 8,
        "step": "normalized", "alpha0": 0.5, "seed": [0, 1]}
# p = 1 and inf are coordinate and sign descent: one program serves all four norms
grids = [{**base, "policy": "lp", "p": [1.0, 1.5, 3.0, math.inf]}]
err, rows = 0.0, 0
for grid in grids:
    one = sweep.sweep(grid, devices=jax.devices()[:1], progress=False)
    eight = sweep.sweep(grid, progress=False)
    assert eight.meta["devices"] == 8 and set(eight.meta["statuses"]) == {"completed"}
    for k in ("log_loss", "normalized_margin", "rho"):
        a, b = one.columns[k], eight.columns[k]
        err = max(err, float(np.max(np.abs(a - b) / np.abs(b))))
    rows += len(eight.columns["step"])
print(json.dumps({"max_rel": err, "rows": rows}))
"""


@pytest.mark.slow  # ~17 s, a fresh process: the sharded sweep itself is tested in test_sweep
def test_sweep_shards_steepest_descent_policies_over_8_host_devices():
    import json
    import subprocess
    import sys
    env = {**host_devices_env(8), "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1"}
    res = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["rows"] == 8 * 9 and out["max_rel"] <= 1e-13


def test_sweep_rejects_bad_steepest_settings_before_compute():
    from homoflow import sweep
    with pytest.raises(ValueError, match="p must be"):
        sweep.sweep({"model": "linear", "depth": 1, "policy": "lp", "p": 0.5}, progress=False)
    with pytest.raises(ValueError, match="step must be one of loss_based, normalized, constant, got 'adam'"):
        sweep.sweep({"model": "linear", "depth": 1, "policy": "sign", "step": "adam"},
                    progress=False)
    with pytest.raises(ValueError, match=r"\['p'\] are swept but policy 'sign'"):
        sweep.expand({"policy": "sign", "p": [1.5, 3.0]})


@pytest.mark.slow   # ~10 s of compilation for a thin layer over descent (tested above)
def test_cli_runs_steepest_descent_and_records_the_matching_margins(tmp_path, capsys):
    from homoflow.cli import main
    from homoflow.trajectory import Trajectory
    out = tmp_path / "run"
    code = main(["run", "--model", "linear", "--depth", "1", "--n", "10", "--dim", "3",
                 "--policy", "lp", "--p", "3", "--step", "normalized", "--alpha0", "1",
                 "--steps", "3000", "--margin-norm", "3", "--out", str(out), "--no-progress",
                 "--no-kkt-report"])
    assert code == 0
    traj = Trajectory.load(out)
    assert traj.meta["policy"] == "lp/normalized" and traj.meta["margin_norm"] == 3.0
    X, y = data.linearly_separable(10, 3, 0)
    problem = make_problem(models.linear(3), losses.exponential(), X, y)
    ref = svm_reference(problem, norm=3)
    w = np.asarray(traj.snapshots[0][-1]).ravel()
    assert angle(w, ref.direction) < 0.1   # from a random init: its trace decays like 1/t
    gap = ref.margin - traj.columns["normalized_margin_p"][-1]
    assert 0 <= gap < 1e-2 * ref.margin
    with pytest.raises(SystemExit):
        main(["run", "--policy", "lp", "--step", "adam"])


@pytest.mark.slow
def test_edge_of_stability_large_step_oscillates_then_beats_every_monotone_step():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "edge_of_stability.py"
    spec = importlib.util.spec_from_file_location("edge_of_stability", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.run(bench.QUICK)
    largest, best = result["largest"], result["best_stable"]
    assert largest["increases_early"] >= 5 and largest["eta_times_lambda0_over_2"] > 100
    assert largest["final_log_loss"] < best["final_log_loss"] - 10 * math.log(10)


@pytest.mark.parametrize("p", NORMS, ids=lambda p: f"p{p:g}")
def test_norm_kkt_residual_vanishes_at_the_lp_max_margin_and_not_elsewhere(p):
    from homoflow.kkt import norm_kkt_residual
    X, y = data.three_norms()
    Z = y[:, None] * X
    w, _ = max_margin(Z, p)
    r = norm_kkt_residual(Z, w, p)
    assert r.eps <= 1e-8 * np.linalg.norm(w, p) ** 2 and abs(r.delta) <= 1e-8
    other, _ = max_margin(Z, 2.0 if p != 2.0 else 1.0)
    r_other = norm_kkt_residual(Z, other, p)
    assert r_other.eps + r_other.delta > 1e-2
    with pytest.raises(ValueError, match="does not separate"):
        norm_kkt_residual(Z, -w, p)


def test_one_compiled_program_serves_every_norm():
    traces = []   # a Python side effect runs once per trace (chex is not a dependency)

    def counted(f):
        def g(*args):
            traces.append(f.__name__)
            return f(*args)
        return g

    direction = jax.jit(counted(geometry.steepest_direction))
    margins = jax.jit(counted(geometry.lp_margins))
    X, y = data.three_norms()
    problem = make_problem(models.linear(3), losses.exponential(), X, y)
    w = (jnp.asarray([[1.0], [-0.2], [0.4]]),)
    for p in NORMS:   # p enters as a traced 1/p: no retrace
        direction(w, geometry.inv_p(p))
        margins(problem, w, geometry.inv_p(p))
    assert sorted(traces) == ["lp_margins", "steepest_direction"]


@pytest.mark.slow
def test_adam_on_log_loss_heads_to_the_linf_max_margin_and_on_loss_stops_short(three):
    # Zhang, Zou & Cao (NeurIPS 2024): Adam without eps -> l_inf margin; through grad L the
    # gradient falls below Adam's eps and the steps shrink with L (schedules.optax_optimizer)
    import optax
    problem, refs = three
    ends = {}
    for objective in ("log_loss", "loss"):
        opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.05)
        traj = descent(problem, (jnp.zeros((3, 1)),),
                       schedules.optax_optimizer(opt, objective=objective), 20_000,
                       progress=False, kkt=False, n_records=3)
        ends[objective] = np.asarray(traj.snapshots[0][-1]).ravel()
        assert traj.columns["log_T"][-1] == pytest.approx(math.log(0.05 * 20_000))
    assert angle(ends["log_loss"], refs[math.inf]) < 2e-3
    assert angle(ends["loss"], refs[math.inf]) > 0.05
