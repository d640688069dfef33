import jax
import numpy as np
import pytest

import homoflow
from homoflow import Trajectory, data, losses, models, schedules
from homoflow.problem import make_problem


@pytest.fixture(scope="module")
def traj():
    X, y = data.linearly_separable(30, 4, 0)
    model = models.cnn((2, 2), channels=(2,), pool=1, hidden=4, bias_first=True)
    prob = make_problem(model, losses.logistic(), X, y)
    return homoflow.descent(prob, model.init(jax.random.PRNGKey(0)), schedules.loss_based(),
                            60, progress=False, n_records=10, config={"note": "roundtrip"})


def test_save_and_load_round_trip_columns_snapshots_and_meta(traj, tmp_path):
    traj.save(tmp_path / "run")
    back = Trajectory.load(tmp_path / "run")
    assert set(back.columns) == set(traj.columns)
    for k in traj.columns:
        np.testing.assert_array_equal(back[k], traj[k])
    # nested parameter groups (a dict in the first group) come back with their structure
    tree = jax.tree_util
    assert tree.tree_structure(back.snapshots) == tree.tree_structure(traj.snapshots)
    for a, b in zip(tree.tree_leaves(back.snapshots), tree.tree_leaves(traj.snapshots)):
        np.testing.assert_array_equal(a, b)
    assert back.meta["config"] == {"note": "roundtrip"}
    assert back.meta["versions"]["jax"] == traj.meta["versions"]["jax"]
    assert back.summary()["steps"] == traj.summary()["steps"] == 60


def test_run_directory_has_a_csv_with_one_row_per_recorded_point(traj, tmp_path):
    d = traj.save(tmp_path / "csv")
    table = np.genfromtxt(d / "trajectory.csv", delimiter=",", names=True)
    assert len(table) == len(traj)
    np.testing.assert_allclose(table["log_loss"], traj["log_loss"], rtol=1e-15)


def test_pandas_export_has_the_scalar_columns(traj):
    pd = pytest.importorskip("pandas")
    df = traj.to_pandas()
    assert isinstance(df, pd.DataFrame) and len(df) == len(traj)
    assert {"step", "log_T", "log_loss", "normalized_margin", "beta"} <= set(df.columns)
    assert "margins" not in df.columns  # per-point margins stay in columns / npz
