"""``homoflow report DIR...`` and the sweep's status table and rate figure."""

import jax
import numpy as np
import pytest

from homoflow import data, descent, losses, models, schedules, sweep, theory
from homoflow.cli import main
from homoflow.problem import make_problem
from homoflow.report import run_row, status_rows, status_table


@pytest.fixture(scope="module")
def runs():
    X, y = data.linearly_separable(24, 3, 2)
    model = models.linear(3)
    problem = make_problem(model, losses.exponential(), X, y)
    p0 = model.init(jax.random.PRNGKey(0))
    return [descent(problem, p0, schedules.loss_based(alpha0=a), 300, progress=False)
            for a in (0.1, 0.5)]


def test_report_compares_run_directories_in_a_table_and_an_overlaid_figure(runs, tmp_path,
                                                                           capsys):
    dirs = []
    for i, t in enumerate(runs):
        dirs.append(str(t.save(tmp_path / f"run{i}")))
    out = tmp_path / "rep"
    assert main(["report", *dirs, "--labels", "slow", "fast", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert (out / "compare.png").stat().st_size > 0 and (out / "report.md").read_text() in text
    lines = [ln for ln in text.splitlines() if ln.startswith("| slow") or ln.startswith("| fast")]
    assert len(lines) == 2
    for line, t in zip(lines, runs):
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = dict(zip(("run", "engine", "L", "status"), cells))
        assert row["status"] == t.status and row["L"] == "1"
        sep = t["separated"].astype(bool)
        assert f"{t['normalized_margin'][sep][-1]:.8g}" in cells


def test_report_refuses_a_directory_that_is_neither_a_run_nor_a_sweep(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert "empty is neither a run directory" in err
    assert not (tmp_path / "rep").exists()   # nothing written before every path is checked


def test_sweep_writes_its_per_configuration_status_table_and_rate_figure(tmp_path):
    grid = {"model": "linear", "depth": 1, "n": 12, "dim": 3, "steps": 200, "n_records": 10,
            "policy": "constant", "lr": [0.1, 1e4], "seed": 0}
    table = sweep.sweep(grid, out=tmp_path / "sw", progress=False)
    printed = status_table(table)
    rows = status_rows(table)
    assert [r["lr"] for r in rows] == [0.1, 1e4]             # the swept axis, per configuration
    assert [r["status"] for r in rows] == table.meta["statuses"]
    for r in rows:
        assert f"| {r['config']} | {r['lr']} | {r['status']} |" in printed
    md = (tmp_path / "sw" / "status.md").read_text()
    assert md == printed + "\n"
    short = status_table(table, max_rows=1)
    assert short.count("\n| ") == 1 and "1 more configurations" in short
    assert (tmp_path / "sw" / "rates.png").stat().st_size > 0
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "sw"), "--out", str(out)]) == 0
    assert (out / "rates-sw.png").exists() and "## sweep sw" in (out / "report.md").read_text()


def test_run_row_reports_the_fitted_exponent_against_two_minus_two_over_l(runs):
    row = run_row(runs[1], "x")
    assert row["2 - 2/L"] == "0.000"
    fit = theory.rate_check(runs[1].columns, 1.0)
    assert np.isfinite(fit["fitted_exponent"])
    assert row["exponent"] == f"{fit['fitted_exponent']:.3f} ± {fit['fit_stderr']:.2g}"
