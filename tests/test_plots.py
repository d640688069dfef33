"""The run dashboard and the comparison figure draw what the theory says they draw."""

import math

import jax
import numpy as np
import pytest

from homoflow import Trajectory, data, descent, losses, models, schedules, theory
from homoflow.plots import compare_figure, rate_figure, save_summary, summary_figure
from homoflow.problem import make_problem


@pytest.fixture(scope="module")
def run():
    X, y = data.linearly_separable(30, 4, 1)
    model = models.linear(4)
    problem = make_problem(model, losses.exponential(), X, y)
    return descent(problem, model.init(jax.random.PRNGKey(0)), schedules.loss_based(alpha0=0.5),
                   600, progress=False)


def _line(ax, label):
    lines = [ln for ln in ax.lines if ln.get_label() == label]
    assert len(lines) == 1, [ln.get_label() for ln in ax.lines]
    return lines[0]


def test_dashboard_panels_plot_the_theorem_ratios_on_a_log_time_axis(run):
    fig = summary_figure(run, reference=0.3, reference_label="ref")
    ax = dict(zip(("loss", "margins", "loss_ratio", "norm_ratio", "beta", "kkt"), fig.axes))
    c, L = run.columns, run.meta["order"]
    assert c["log_T"].max() / c["log_T"][c["log_T"] > 0].min() > 10   # spans decades
    for a in fig.axes:
        assert a.get_xscale() == "log"                                  # never symlog
        assert "Σ η" in a.get_xlabel()
    keep = c["separated"].astype(bool) & (c["log_T"] >= 1)
    x, y = _line(ax["loss_ratio"], "measured").get_data()
    np.testing.assert_array_equal(x, c["log_T"][keep])
    np.testing.assert_allclose(y, theory.loss_ratio(c["log_T"], c["log_loss"], L)[keep],
                               rtol=1e-15)
    x, y = _line(ax["norm_ratio"], "measured").get_data()
    np.testing.assert_allclose(y, np.exp(c["log_rho"][keep]) / c["log_T"][keep] ** (1 / L),
                               rtol=1e-12)
    # the limits drawn are those of the given reference margin: 1/(L^2 g^{2/L}), g^{-1/L}
    assert _line(ax["margins"], "ref").get_ydata()[0] == 0.3
    limits = [ln.get_ydata()[0] for ln in ax["loss_ratio"].lines if "limit" in ln.get_label()]
    assert limits == [pytest.approx(1 / (L ** 2 * 0.3 ** (2 / L)), rel=1e-15)]
    limits = [ln.get_ydata()[0] for ln in ax["norm_ratio"].lines if "limit" in ln.get_label()]
    assert limits == [pytest.approx(0.3 ** (-1 / L), rel=1e-15)]
    # 1 - beta after t0, and the KKT panel says it has nothing rather than staying blank
    x, y = ax["beta"].lines[0].get_data()
    sep = c["separated"].astype(bool) & (c["log_T"] > 0)
    np.testing.assert_allclose(y, 1 - c["beta"][sep], rtol=1e-12)
    if "kkt_eps" not in c:
        assert any("no KKT" in t.get_text() for t in ax["kkt"].texts)


def test_flow_runs_are_labelled_t_and_short_runs_keep_a_linear_axis(run):
    flow_like = Trajectory(dict(run.columns), None, {**run.meta, "engine": "flow"})
    fig = summary_figure(flow_like)
    assert fig.axes[0].get_xlabel().startswith("log t") and "Σ η" not in fig.axes[0].get_xlabel()
    # without a reference the limits use the last normalized margin, and say so
    labels = [ln.get_label() for ln in fig.axes[2].lines]
    assert any("γ̄ (last)" in lab for lab in labels)
    short = {k: v[-5:] for k, v in run.columns.items()}       # less than a decade of log T
    assert short["log_T"].max() / short["log_T"].min() < 10
    fig = summary_figure(Trajectory(short, None, run.meta))
    assert all(a.get_xscale() == "linear" for a in fig.axes)


def test_compare_figure_overlays_one_colour_per_run_and_checks_labels(run):
    other = Trajectory({**run.columns, "log_loss": run.columns["log_loss"] - 1.0}, None, run.meta)
    fig = compare_figure([run, other], ["a", "b"])
    margins = fig.axes[1]
    a, b = _line(margins, "a"), _line(margins, "b")
    assert a.get_color() != b.get_color()
    ya, yb = _line(fig.axes[2], "a").get_ydata(), _line(fig.axes[2], "b").get_ydata()
    np.testing.assert_allclose(yb / ya, math.exp(-1.0), rtol=1e-13)   # L scaled by 1/e
    with pytest.raises(ValueError, match="2 trajectories but 1 labels"):
        compare_figure([run, other], ["a"])


def test_save_summary_writes_a_png_and_leaves_no_figure_open(run, tmp_path):
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    path = save_summary(run, tmp_path)
    assert path.name == "summary.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # pyplot keeps every open figure: a sweep saving one per run would grow without bound
    assert set(plt.get_fignums()) == before


def test_rate_figure_draws_every_configuration_of_a_sweep(run):
    from homoflow.sweep import SweepTable
    n = len(run)
    one = {k: v for k, v in run.columns.items() if v.ndim == 1}
    columns = {k: np.concatenate([v, v + (k == "log_loss")]) for k, v in one.items()}
    columns.update(config=np.repeat([0, 1], n), order=np.ones(2 * n),
                   status=np.full(2 * n, "completed"))
    table = SweepTable(columns, {"configs": [{"seed": 0}, {"seed": 1}]})
    fig = rate_figure(table)
    assert len(fig.axes[0].lines) == 2 and len(fig.axes[1].lines) == 2
    for (cfg, cols), line in zip(table.runs(), fig.axes[0].lines):
        keep = cols["separated"].astype(bool) & (cols["log_T"] >= 1)
        np.testing.assert_allclose(line.get_ydata(),
                                   theory.loss_ratio(cols["log_T"], cols["log_loss"], 1.0)[keep])


@pytest.mark.slow   # a linear flow to log t = 10^4 (~20 s of CPU)
def test_norm_ratio_panel_limit_is_reached_by_a_linear_flow_at_rate_one_over_log_t():
    """rho / log t -> 1/gamma* for a linear model (L = 1): rho^L gamma ~ q_min and
    q_min = log t + O(1) (w(t) = w* log t + w~ + o(1) with ||w*|| = 1/gamma*), so the
    relative error is O(1/log t); measured 1.3-1.4 / log t at log t = 10^2, 10^3, 10^4."""
    from homoflow import kkt
    from homoflow.flow import flow
    X, y = data.linearly_separable(40, 6, seed=3)
    model = models.linear(6)
    problem = make_problem(model, losses.exponential(), X, y)
    traj = flow(problem, model.init(jax.random.PRNGKey(0)), log_t_max=1e4, progress=False)
    c = traj.columns
    gamma = kkt.svm_reference(problem).margin
    ratio = theory.norm_ratio(c["log_T"], c["log_rho"], 1.0)
    late = c["log_T"] >= 100
    assert late.sum() >= 10 and c["log_T"][-1] >= 1e4 * (1 - 1e-9)
    scaled = np.abs(ratio[late] / theory.limit_norm_ratio(gamma, 1.0) - 1) * c["log_T"][late]
    assert np.all(scaled <= 3.0), scaled.max()
