"""homoflow.sweep: vmapped configurations give descent's numbers, sharding changes nothing,
an interrupted sweep resumes without recomputing, bad input fails before any compute."""

import json
import math
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import homoflow
from homoflow import losses, models, schedules, sweep
from homoflow.cli import main

from conftest import host_devices_env

TINY = {"n": 12, "dim": 3, "width": 5, "steps": 300, "n_records": 12}
COLS = ("log_loss", "log_T", "log_lr", "rho", "smoothed_margin", "normalized_margin",
        "descent_margin", "beta", "step", "attempts")


def _rel(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(same, 0.0, np.abs(a - b) / np.maximum(np.abs(b), 1e-300))
    return float(err.max()) if err.size else 0.0


def _tables_equal(t1, t2, rtol=1e-12):
    assert list(t1.columns) == list(t2.columns)
    for k in t1.columns:
        if t1[k].dtype.kind in "fi":
            assert t1[k].shape == t2[k].shape, k
            # gamma_hat's phi(L(t0)) integral amplifies float64 rounding of log L(t0), which
            # may differ in the last bit with a configuration's place in the batch
            tol = max(rtol, 1e-9) if k == "descent_margin" and rtol else rtol
            assert _rel(t1[k], t2[k]) <= tol, (k, _rel(t1[k], t2[k]))
        else:
            assert np.array_equal(t1[k], t2[k]), k


def _record_computed(monkeypatch, sweep):
    """The ids of the descent configurations the sweep computes from now on (a spy on its
    group runner)."""
    computed = []
    real = sweep._run_descent_group

    def spy(g, configs, ids, mesh, progress, size=None):
        computed.extend(ids)
        return real(g, configs, ids, mesh, progress, size)

    monkeypatch.setattr(sweep, "_run_descent_group", spy)
    return computed


def test_vmapped_sweep_reproduces_descent_for_each_step_size_policy_and_seed():
    # the loss-based scheduler (retries, traced alpha0, r_u, r_d) on two seeds; the constant
    # policy is compared in the sharding test, and through it the same engine step
    grid = {**TINY, "depth": 2, "policy": "loss_based", "seed": [0, 1], "alpha0": [0.05, 0.2]}
    table = sweep.sweep(grid, progress=False)
    assert len(table.meta["configs"]) == 4 and table.meta["statuses"] == ["completed"] * 4
    X, y = homoflow.data.linearly_separable(12, 3, 0)
    model = models.mlp((3, 5, 1))
    problem = homoflow.make_problem(model, losses.exponential(), X, y)
    policy = schedules.loss_based(0.05)  # one object: descent() compiles once
    for cfg, cols in table.runs():
        if cfg["alpha0"] != 0.05:
            assert not np.allclose(cols["log_loss"][1:], table.select(
                config=cfg["config"] - 1)["log_loss"][1:])  # alpha0 reached the program
            continue
        ref = homoflow.descent(problem, model.init(jax.random.PRNGKey(cfg["seed"])), policy,
                               300, n_records=12, progress=False, snapshots=False, kkt=False)
        for k in COLS:  # same iterations, same numbers (float64 reassociation only)
            assert _rel(cols[k], ref[k]) <= 1e-11, (cfg["policy"], cfg["seed"], k)


def test_one_compiled_program_per_model_shape():
    # the initialization scale is data of the program (vmapped), like the seeds
    configs = sweep.expand({"depth": [1, 2], "lr": [0.01, 0.02, 0.04], "seed": [0, 1],
                            "data_seed": [0, 3], "init_scale": [1.0, 0.1]})
    groups = sweep.plan(configs)
    assert len(configs) == 48 and len(groups) == 2
    assert sorted(len(g.ids) for g in groups) == [24, 24]


_SHARDED = textwrap.dedent("""
    import json, os, sys
    import jax, numpy as np
    from homoflow import sweep
    assert len(jax.devices()) == 8, jax.devices()
    grid = {"n": 12, "dim": 3, "width": 5, "steps": 200, "n_records": 10, "depth": 2,
            "lr": [0.01, 0.02, 0.05], "seed": [0, 1]}   # 6 configurations, padded to 8
    one = sweep.sweep(grid, devices=jax.devices()[:1], progress=False)
    eight = sweep.sweep(grid, progress=False)
    err = {}
    for k, v in one.columns.items():
        if v.dtype.kind == "f":
            a, b = v, eight[k]
            same = (a == b) | (np.isnan(a) & np.isnan(b))
            err[k] = float(np.max(np.where(same, 0, np.abs(a - b) / np.abs(b))))
        else:
            assert np.array_equal(v, eight[k]), k
    print(json.dumps({"devices": eight.meta["devices"], "rows": len(one), "max_rel": err}))
""")


def test_sharded_sweep_on_8_host_devices_equals_unsharded():
    env = {**host_devices_env(8), "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1"}
    res = subprocess.run([sys.executable, "-c", _SHARDED], env=env, capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["rows"] == 6 * 11
    # a device runs a batch of 1 instead of 6: XLA vectorizes differently, so float64
    # rounding may differ; gamma_hat's phi(L(t0)) integral amplifies that rounding of
    # log L(t0) to ~1e-10 (measured 6e-11), everything else agrees to ~1e-14
    err = out["max_rel"]
    assert err.pop("descent_margin") <= 1e-9
    assert max(err.values()) <= 1e-13, err


# one grid for the resume, table and CLI tests: same shapes, so one compiled program
GRID = {**TINY, "depth": 2, "lr": [0.01, 0.02, 0.03, 0.05], "seed": [0, 1]}


@pytest.fixture(scope="module")
def full():
    return sweep.sweep(GRID, progress=False, max_batch=3)   # batches of 3, 3, 2 (padded to 3)


def test_interrupted_sweep_resumes_computing_only_missing_configurations(tmp_path, monkeypatch,
                                                                         full):
    grid = GRID

    def stop_after(k):
        seen = []

        def cb(i):
            seen.append(i)
            if len(seen) == k:
                raise sweep.SweepInterrupted(f"injected failure after {k} configurations")
        return cb

    out = tmp_path / "sw"
    with pytest.raises(sweep.SweepInterrupted):
        sweep.sweep(grid, out=out, progress=False, max_batch=3, on_config=stop_after(4))
    # the second batch (configurations 3, 4, 5) had finished computing when the failure hit
    # after writing 3: 4 and 5 are lost, 0..3 are kept
    finished = sorted(int(p.stem) for p in (out / "configs").glob("*.npz"))
    assert finished == [0, 1, 2, 3]

    computed = _record_computed(monkeypatch, sweep)
    resumed = sweep.sweep(grid, out=out, progress=False, max_batch=3)
    assert sorted(computed) == sorted(set(range(8)) - set(finished))
    assert resumed.meta["reused"] == finished
    _tables_equal(resumed, full)
    # a third call computes nothing and reloads the same table
    computed.clear()
    again = sweep.sweep(grid, out=out, progress=False)
    assert computed == []
    _tables_equal(again, full, rtol=0.0)
    _tables_equal(sweep.SweepTable.load(out), full)


def test_table_saves_reloads_and_exports_to_pandas(tmp_path, full):
    table = full
    table.save(tmp_path)
    back = sweep.SweepTable.load(tmp_path)
    _tables_equal(back, table, rtol=0.0)
    df = back.to_pandas()
    assert df.shape == (len(table), len(table.columns))
    # tidy: each row carries its configuration's columns
    per = df.groupby("config")[["depth", "lr"]].nunique()
    assert (per.to_numpy() == 1).all()
    assert df.groupby(["lr", "seed"]).ngroups == 8
    assert (df.groupby("config").size().to_numpy() == 13).all()   # 12 records + iteration 0
    assert set(np.unique(back["order"])) == {2.0}


def _never_called(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("compute started")
    monkeypatch.setattr(sweep, "_run_descent_group", boom)
    monkeypatch.setattr(sweep, "_run_flow_group", boom)


def test_bad_grids_fail_before_any_compute(monkeypatch):
    _never_called(monkeypatch)
    with pytest.raises(ValueError, match="grid is empty"):
        sweep.sweep({})
    with pytest.raises(ValueError, match="'lr' is an empty list"):
        sweep.sweep({"lr": []})
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got -0.1"):
        sweep.sweep({**TINY, "lr": [0.1, -0.1]})
    with pytest.raises(ValueError, match=r"c_eta must be a finite number > 0, got 0"):
        sweep.sweep({**TINY, "policy": "h_bound", "c_eta": 0.0})
    with pytest.raises(ValueError, match="unknown grid keys"):
        sweep.sweep({"depht": [1]})
    with pytest.raises(ValueError, match="does not use them"):
        sweep.sweep({"policy": "constant", "alpha0": [0.1, 0.2]})
    with pytest.raises(ValueError, match=r"init_scale must be a finite number > 0, got inf"):
        sweep.sweep({**TINY, "init_scale": [1.0, math.inf]})


def test_init_scale_scales_the_initial_parameters_and_outputs_by_its_powers(full):
    # after the ``full`` fixture: the same static configuration, so its compiled program
    # and batch shape (3)
    table = sweep.sweep({**GRID, "lr": 0.01, "seed": 0, "init_scale": [1.0, 0.25, 4.0]},
                        progress=False, max_batch=3)
    (c1, one), (c2, quarter), _ = table.runs()
    assert (c1["init_scale"], c2["init_scale"]) == (1.0, 0.25)
    # at iteration 0: rho = ||theta|| scales by s; q = y f(theta; x) by s^L (L = 2), so the
    # normalized margin q_min / rho^L is unchanged (float64 rounding of a few operations)
    assert one["step"][0] == quarter["step"][0] == 0
    assert quarter["rho"][0] == pytest.approx(0.25 * one["rho"][0], rel=1e-14)
    assert quarter["normalized_margin"][0] == pytest.approx(one["normalized_margin"][0],
                                                            rel=1e-12)
    assert quarter["log_loss"][0] != one["log_loss"][0]   # a different starting point


def test_depth_whose_declared_order_fails_homogeneity_check_fails_before_compute(monkeypatch):
    _never_called(monkeypatch)

    def always_two(depth, width, dim, n_outputs):
        # declares L = 2 whatever the depth: right for depth 2, wrong for depth 3
        inner = models.deep_linear((dim,) + (width,) * (depth - 1) + (n_outputs,))
        return models.homogeneous_model(inner.apply, inner.init, 2.0, (2.0 / depth,) * depth,
                                        name="always_two")

    with pytest.raises(homoflow.HomogeneityError, match=r"depth 3.*declared 2 but measured 3"):
        sweep.sweep({**TINY, "model": always_two, "depth": [2, 3]})


def test_cli_sweep_from_toml_and_command_line(tmp_path, full):
    toml = tmp_path / "grid.toml"
    toml.write_text('depth = 2\nlr = [0.01, 0.02, 0.03, 0.05]\nsteps = 300\nn = 12\n'
                    'dim = 3\nwidth = 5\nn_records = 12\n')
    out = tmp_path / "run"
    assert main(["sweep", "--grid", str(toml), "--seed", "0", "1", "--out", str(out),
                 "--max-batch", "3", "--no-progress"]) == 0
    table = sweep.SweepTable.load(out)
    assert table.meta["n_configs"] == 8
    assert sorted(set(zip(table["lr"], table["seed"]))) == [
        (lr, s) for lr in (0.01, 0.02, 0.03, 0.05) for s in (0, 1)]
    _tables_equal(table, full)
    assert (out / "table.csv").read_text().splitlines()[0].startswith("config,")
    with pytest.raises(SystemExit) as exit_:   # refused before JAX is set up
        main(["sweep", "--lr", "-1", "--no-progress"])
    assert exit_.value.code == 2


@pytest.mark.slow
def test_flow_sweep_equals_flow_batch():
    grid = {"engine": "flow", "model": "deep_linear", "depth": 2, "n": 12, "dim": 3,
            "width": 4, "seed": [0, 1], "log_t_max": 50.0, "n_saves": 20}
    table = sweep.sweep(grid, progress=False)
    X, y = homoflow.data.linearly_separable(12, 3, 0)
    model = models.deep_linear((3, 4, 1))
    problem = homoflow.make_problem(model, losses.exponential(), X, y)
    params = jax.tree_util.tree_map(lambda *xs: np.stack(xs),
                                    *[model.init(jax.random.PRNGKey(s)) for s in (0, 1)])
    ref = homoflow.flow.flow_batch(problem, params, log_t_max=50.0, n_saves=20)
    for (cfg, cols), tr in zip(table.runs(), ref):
        assert _rel(cols["log_loss"], tr["log_loss"]) <= 1e-10
        assert math.isclose(cols["log_T"][-1], tr["log_T"][-1], rel_tol=1e-12)


# ---------------------------------------------------------------------------------------
# issue 16: per-configuration files carry their configuration; damaged ones are recomputed;
# a lock keeps a second sweep out


def test_resume_recomputes_damaged_files_and_files_of_another_configuration(tmp_path, full,
                                                                           monkeypatch):
    out = tmp_path / "sw"
    sweep.sweep(GRID, out=out, progress=False, max_batch=3)
    files = out / "configs"
    # configuration 1 gets configuration 0's file (another lr); 2 is truncated
    (files / "000001.npz").write_bytes((files / "000000.npz").read_bytes())
    blob = (files / "000002.npz").read_bytes()
    (files / "000002.npz").write_bytes(blob[: len(blob) // 3])
    computed = _record_computed(monkeypatch, sweep)
    with pytest.warns(UserWarning) as record:
        again = sweep.sweep(GRID, out=out, progress=False, max_batch=3)
    text = " ".join(str(w.message) for w in record)
    assert "000001.npz was computed for another configuration" in text
    assert "000002.npz: not a readable .npz archive" in text
    assert sorted(computed) == [1, 2]
    _tables_equal(again, full)


def test_a_locked_directory_is_refused_and_a_stale_lock_taken_over(tmp_path):
    out = tmp_path / "sw"
    out.mkdir()
    with homoflow.io.DirectoryLock(out):   # held by this (live) process
        with pytest.raises(ValueError, match=r"is locked by process \d+"):
            sweep.sweep({**TINY, "steps": 20}, out=out, progress=False)
    lock = out / homoflow.io.LOCK_NAME
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    import socket
    lock.write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    table = sweep.sweep({**TINY, "steps": 20}, out=out, progress=False)
    assert table.meta["status"] == "completed" and not lock.exists()
