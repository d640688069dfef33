"""homoflow.theory: the rate ratios and the fitted exponent on trajectories whose rates are
known exactly, and the monotonicity audit."""

import math

import numpy as np
import pytest

from homoflow import theory


@pytest.mark.parametrize("L", [1, 2, 3, 4, 5, 6])
def test_exact_rate_gives_constant_ratio_and_the_predicted_exponent(L):
    a = 2.0 - 2.0 / L
    log_T = np.log(10.0) * np.linspace(1, 40, 200)
    log_loss = -log_T - a * np.log(log_T) + math.log(3.0)      # L = 3 / (T (log T)^a)
    log_rho = np.log(log_T) / L + math.log(0.5)                 # rho = 0.5 (log T)^{1/L}
    cols = {"log_T": log_T, "log_loss": log_loss, "log_rho": log_rho,
            "separated": np.ones_like(log_T, bool)}
    np.testing.assert_allclose(theory.loss_ratio(log_T, log_loss, L), 3.0, rtol=1e-12)
    np.testing.assert_allclose(theory.norm_ratio(log_T, log_rho, L), 0.5, rtol=1e-12)
    rc = theory.rate_check(cols, L)
    assert rc["fitted_exponent"] == pytest.approx(a, abs=1e-10)
    assert rc["ratio_spread_last"] == pytest.approx(1.0, abs=1e-10)
    assert rc["decades_recorded"] == pytest.approx(39.0)
    assert rc["window_points"] == sum(log_T >= log_T[-1] - 6 * np.log(10.0))


def test_fitted_exponent_converges_despite_a_subleading_term():
    # log(1/L) - log T = a log log T + c + d / log T: the fit over far decades (as the
    # log-polar flow reaches) recovers a; over the first decades it is biased
    a, d = 1.5, 5.0
    log_T = np.geomspace(3.0, 1e8, 300)
    log_loss = -log_T - a * np.log(log_T) - d / log_T
    far = theory.fitted_exponent(log_T, log_loss, log_T > 1e3)["exponent"]
    near = theory.fitted_exponent(log_T, log_loss, log_T < 30)["exponent"]
    assert abs(far - a) < 1e-3
    assert abs(near - a) > 0.1


def test_window_keeps_the_last_decades_past_t0():
    log_T = np.log(10.0) * np.arange(-2, 13, dtype=float)      # T = 10^-2 .. 10^12
    sep = log_T > np.log(10.0) * 0.5
    m = theory.window(log_T, decades=6, separated=sep)
    assert np.array_equal(np.flatnonzero(m), np.arange(8, 15))   # 10^6 .. 10^12
    m = theory.window(log_T, separated=sep)
    assert np.array_equal(np.flatnonzero(m), np.arange(3, 15))   # T > 1 and past t0


def test_window_in_decades_of_log_T_for_the_flow():
    log_T = np.geomspace(1e-2, 1e8, 11)                         # log t = 10^-2 .. 10^8
    m = theory.window(log_T, decades=6, of="log T")
    assert np.array_equal(np.flatnonzero(m), np.arange(4, 11))   # log T = 10^2 .. 10^8
    with pytest.raises(ValueError, match="of must be"):
        theory.window(log_T, decades=6, of="t")


def test_monotonicity_audit_lists_every_violation_after_t0():
    v = np.array([5.0, 1.0, 1.0, 2.0, 1.5, 3.0, 3.0 - 1e-14, 4.0])
    cols = {"descent_margin": v, "step": np.arange(8) * 10, "log_T": np.arange(8.0),
            "separated": np.array([False, True, True, True, True, True, True, True])}
    out = theory.audit_margin(cols, "descent")
    assert [o["index"] for o in out] == [4]          # 5 -> 1 is before t0; -1e-14 is in rtol
    assert out[0]["step"] == 40 and out[0]["relative_drop"] == pytest.approx(0.25)
    assert theory.audit_margin({"smoothed_margin": np.arange(5.0)}, "flow") == []


def test_linear_model_gradient_flow_on_one_point_has_rate_constant_one_over_norm_squared():
    # q' = |x|^2 e^{-q}: e^q = e^{q0} + |x|^2 t, so L t -> 1 / |x|^2 (L = 1: no log factor)
    x2, q0 = 2.5, 0.3
    log_T = np.log(np.geomspace(1e2, 1e30, 100))
    log_loss = -np.logaddexp(q0, math.log(x2) + log_T)
    ratio = theory.loss_ratio(log_T, log_loss, 1.0)
    assert ratio[-1] == pytest.approx(1 / x2, rel=1e-12)
    assert theory.spread(ratio, theory.window(log_T, decades=6)) == pytest.approx(1.0, abs=1e-12)
    assert theory.fitted_exponent(log_T, log_loss)["exponent"] == pytest.approx(0.0, abs=1e-3)


def test_bad_order_is_rejected():
    with pytest.raises(ValueError, match="order L must be > 0"):
        theory.loss_exponent(0.0)


@pytest.mark.slow  # ~45 s, six runs; the default run checks the rate machinery on exact rates
# and on real runs through benchmarks/margin_rates.py --quick (tests/test_geometry.py)
def test_rates_benchmark_quick_mode_meets_theorem_4_3_on_its_runs(tmp_path):
    # benchmarks/rates.py --quick: L in {1, 2}, deep linear, exponential loss
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "rates.py"
    spec = importlib.util.spec_from_file_location("rates_bench", path)
    rates = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rates)
    report = rates.main(["--quick", "--out", str(tmp_path)])
    rows = {(r["L"], r["engine"]): r for r in report["rows"]}
    assert len(rows) == 6 and all(r["status"] == "completed" for r in rows.values())
    for L in (1, 2):
        flow = rows[(L, "flow")]
        # the log-polar flow reaches log t = 1e4: thousands of decades of T
        assert flow["decades_T"] > 1000
        assert abs(flow["fitted_exponent"] - (2 - 2 / L)) <= 0.15
        # saves are log-spaced in log t: the last 6 decades of T hold one of them, so the
        # band is checked over the last 6 decades of log T (here the whole run)
        assert flow["ratio_spread_last6_logT"] <= 4.0
        assert flow["monotonicity_violations"] == 0        # gamma_tilde never decreases
    # steps at the H(L) bound: T grows geometrically once past t0; the ratio is flat
    hb = rows[(2, "descent_h_bound")]
    assert hb["decades_T"] >= 8 and hb["ratio_spread_last6"] <= 4.0
    assert hb["monotonicity_violations"] == 0              # gamma_hat never decreases
    for name in ("rates_quick.md", "rates_quick.csv", "rates_ratio.png", "rates_exponent.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| model | L | loss | engine |" in (tmp_path / "rates_quick.md").read_text()


def test_rate_check_accepts_a_trajectory():
    from homoflow import Trajectory

    log_T = np.log(10.0) * np.linspace(1, 20, 50)
    tr = Trajectory({"log_T": log_T, "log_loss": -log_T - np.log(log_T),
                     "log_rho": np.log(log_T) / 2, "smoothed_margin": np.linspace(0, 1, 50)})
    rc = theory.rate_check(tr, 2.0)
    assert rc["fitted_exponent"] == pytest.approx(1.0, abs=1e-10)
    assert theory.audit_margin(tr, "flow") == []
