import jax
import numpy as np
import pytest

import homoflow
from homoflow import Trajectory, data, io, losses, models, schedules
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


# ---------------------------------------------------------------------------------------
# issue 16: files read back with validation; a run resumed from its saved state


def test_load_names_a_damaged_file_and_says_what_to_do(traj, tmp_path):
    d = traj.save(tmp_path / "run")
    cols = (d / "columns.npz").read_bytes()
    (d / "columns.npz").write_bytes(cols[: len(cols) // 2])   # truncated
    with pytest.raises(io.CorruptFileError, match=r"columns.npz: not a readable .npz archive "
                                                  r".*rerun into a fresh directory"):
        Trajectory.load(d)
    np.savez(d / "columns.npz", **{k: v for k, v in traj.columns.items() if k != "step"})
    with pytest.raises(io.CorruptFileError, match=r"columns.npz: lacks the arrays \['step'\]"):
        Trajectory.load(d)
    np.savez(d / "columns.npz", **{**traj.columns, "rho": traj["rho"][:-1]})
    with pytest.raises(io.CorruptFileError, match=r"columns of unequal length"):
        Trajectory.load(d)
    (d / "columns.npz").write_bytes(cols)
    meta = (d / "meta.json").read_text()
    (d / "meta.json").write_text(meta[:40])
    with pytest.raises(io.CorruptFileError, match=r"meta.json: not valid JSON"):
        Trajectory.load(d)
    (d / "meta.json").unlink()
    with pytest.raises(io.CorruptFileError, match=r"meta.json: missing"):
        Trajectory.load(d)


def test_writes_are_atomic_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "x.json"
    io.write_json(path, {"a": 1})

    def fail(f):
        f.write(b'{"a": ')
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        io.atomic_write(path, fail)
    assert io.read_json(path) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == \
        ["x.json"]
    # one conversion to JSON: numpy scalars, non-finite floats, callables never fail
    assert io.jsonable({"f": np.float64("inf"), "i": np.int32(3), "b": np.bool_(True),
                        "g": np.mean, "a": np.arange(2)}) == \
        {"f": "inf", "i": 3, "b": True, "g": "mean", "a": [0, 1]}


def test_descent_resumed_from_a_saved_state_equals_the_uninterrupted_run(tmp_path):
    # the loss-based scheduler: its alpha and retry count live in the saved state (the
    # constant step is resumed through the CLI in test_interrupt.py)
    X, y = data.linearly_separable(16, 3, 1)
    model = models.mlp((3, 6, 1))
    prob = make_problem(model, losses.logistic(), X, y)
    pol = schedules.loss_based()
    p0 = model.init(jax.random.PRNGKey(2))
    kw = dict(progress=False, n_records=15, kkt=False)
    full = homoflow.descent(prob, p0, pol, 400, **kw)
    part = homoflow.descent(prob, p0, pol, 400, on_record=lambda s, p, r: s >= 30, **kw)
    assert part["step"][-1] < 400 and part.state is not None
    back = Trajectory.load(part.save(tmp_path / "part"))
    resumed = homoflow.descent(prob, p0, pol, 400, resume=back, **kw)
    assert resumed.status == full.status
    for k in full.columns:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(resumed.snapshots),
                    jax.tree_util.tree_leaves(full.snapshots)):
        np.testing.assert_array_equal(a, b)
    # a state from another problem is refused, naming what to do
    other = make_problem(models.mlp((3, 7, 1)), losses.logistic(), X, y)
    with pytest.raises(ValueError, match="does not fit this problem"):
        homoflow.descent(other, models.mlp((3, 7, 1)).init(jax.random.PRNGKey(2)), pol, 400,
                         resume=back, **kw)
