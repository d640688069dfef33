import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import homoflow
from homoflow import Trajectory, configs, losses
from homoflow.cli import build_parser, main

ROOT = str(Path(__file__).resolve().parents[1])


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
    # in-process CLI calls must not point this test process's JAX at a cache directory
    monkeypatch.setenv("HOMOFLOW_NO_COMPILE_CACHE", "1")


def test_run_writes_the_run_directory_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    # (the KKT report, ~half of this run's time, is checked on the flow run below)
    code = main(["run", "--steps", "300", "--width", "20", "--init-scale", "0.5", "--out",
                 str(out), "--no-progress", "--no-kkt-report"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "normalized margin gamma_bar" in printed and str(out) in printed
    for name in ("trajectory.csv", "columns.npz", "snapshots.npz", "meta.json", "summary.json",
                 "summary.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    traj = Trajectory.load(out)
    assert summary["steps"] == 300 == int(traj["step"][-1])
    assert traj.meta["config"]["width"] == 20 and traj.meta["seed"] == 0
    # --init-scale: the recorded starting point is 0.5 x the default initialization
    assert traj.meta["config"]["init_scale"] == 0.5 and traj["step"][0] == 0
    default = configs.build_model(traj.meta["config"]).init(jax.random.PRNGKey(0))
    for a, b in zip(jax.tree_util.tree_leaves(traj.snapshots),
                    jax.tree_util.tree_leaves(default)):
        np.testing.assert_array_equal(a[0], 0.5 * np.asarray(b))   # exact: a power of 2


def test_a_diverging_run_still_writes_everything_and_exits_nonzero(tmp_path, capsys):
    out = tmp_path / "div"
    # width 20 and the default data, as the run above: its compiled programs are reused
    code = main(["run", "--policy", "constant", "--lr", "1.0", "--steps", "50", "--width", "20",
                 "--out", str(out), "--no-progress", "--no-kkt-report"])
    assert code == 2
    assert "blew up at iteration 1" in capsys.readouterr().err
    assert Trajectory.load(out).status == "diverged"


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--loss", "--data", "--policy", "--steps", "--out"):
        assert option in text


def test_h_bound_without_c_eta_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--policy", "h_bound"])
    assert "--c-eta" in capsys.readouterr().err


def test_run_with_the_flow_engine_writes_the_same_run_directory(tmp_path, capsys):
    out = tmp_path / "flow"
    code = main(["run", "--engine", "flow", "--model", "linear", "--log-t-max", "20",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "gradient flow to log t = 20" in printed
    traj = Trajectory.load(out)
    assert traj.meta["engine"] == "flow" and traj["log_T"][-1] >= 20
    # the run's KKT report (kkt.convergence_report) is printed and written
    assert "convergence to a KKT point of (P)" in printed
    for name in ("trajectory.csv", "summary.png", "convergence.md", "convergence.png"):
        assert (out / name).stat().st_size > 0, name


# ---------------------------------------------------------------------------------------
# issue 16: every option checked before set-up, --out before compute, one schema


@pytest.fixture
def no_setup(monkeypatch):
    """Fail if a command gets as far as importing JAX for its computation."""
    from homoflow import cli

    def boom(*a, **k):
        raise AssertionError("set-up started")
    monkeypatch.setattr(cli, "_setup_jax", boom)


@pytest.mark.parametrize("argv, message", [
    (["--depth", "0"], r"depth must be >= 1, got '0' \(option --depth\)"),
    (["--model", "linear", "--depth", "5"], r"depth must be 1 for the linear model .*got 5"),
    (["--steps", "-5"], r"steps must be >= 1, got '-5'"),
    (["--init-scale", "0"], r"init_scale must be a finite number > 0, got '0' "
                            r"\(option --init-scale\)"),
    (["--init-scale", "inf"], r"init_scale must be a finite number > 0, got 'inf'"),
    (["--lr", "nan"], r"lr must be a number, not NaN"),
    (["--policy", "h_bound"], r"c_eta must be given for --policy h_bound"),
    (["--loss", "cross_entropy"], r"loss needs several classes.*got 'cross_entropy'"),
    (["--model", "diagonal_linear", "--data", "gaussian_classes", "--loss", "cross_entropy"],
     r"model needs binary data.*got 'diagonal_linear'"),
    (["--batch-size", "101"], r"batch_size must be <= N = 100"),
    (["--model", "linear", "--activation", "quadratic"], r"applies to --model mlp only"),
])
def test_bad_options_are_refused_before_any_set_up(argv, message, no_setup, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", *argv, "--out", str(tmp_path / "never")])
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "never").exists()


def test_out_is_checked_before_compute(no_setup, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["run", "--out", str(a_file)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert main(["run", "--out", "/proc/homoflow-x"]) == 2
    assert "not a writable directory" in capsys.readouterr().err
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    assert main(["run", "--out", str(old)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # --overwrite clears only a directory homoflow wrote
    assert main(["run", "--out", str(old), "--overwrite"]) == 2
    assert "holds no homoflow output" in capsys.readouterr().err
    assert (old / "notes.txt").read_text() == "mine"


def test_overwrite_replaces_the_old_run_entirely(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "meta.json").write_text("{}")
    (out / "convergence.md").write_text("an earlier run's report")
    args = ["run", "--model", "linear", "--n", "12", "--dim", "3", "--steps", "50",
            "--n-records", "5", "--no-progress", "--no-kkt-report", "--out", str(out)]
    assert main(args + ["--overwrite"]) == 0
    assert not (out / "convergence.md").exists()
    assert Trajectory.load(out).meta["config"]["steps"] == 50


def test_sweep_with_a_missing_grid_or_bad_value_is_a_clear_error(no_setup, tmp_path, capsys):
    assert main(["sweep", "--grid", str(tmp_path / "missing.toml")]) == 2
    err = capsys.readouterr().err
    assert "missing.toml: no such file" in err and "Traceback" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text("depth = [1, 0]\n")
    with pytest.raises(SystemExit):
        main(["sweep", "--grid", str(bad)])
    assert re.search(r"bad.toml: depth must be >= 1, got 0", capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["sweep", "--steps", "-5"])
    assert "steps must be >= 1" in capsys.readouterr().err


def test_version_and_help_do_not_import_jax():
    code = ("import sys\nfrom homoflow.cli import build_parser, main\n"
            "try:\n    build_parser().parse_args(['run', '--help'])\nexcept SystemExit:\n"
            "    pass\nassert 'jax' not in sys.modules, 'JAX was imported'\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stderr
    assert "--data-file" in p.stdout and "--resume" in p.stdout
    v = subprocess.run([sys.executable, "-m", "homoflow.cli", "--version"], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": ROOT})
    assert v.stdout.strip() == f"homoflow {homoflow.__version__}"


def test_config_file_and_data_file(tmp_path, capsys):
    X, y = homoflow.data.linearly_separable(14, 3, 5)
    for name in ("d.csv", "d.npy", "d.npz"):
        path = tmp_path / name
        if name.endswith(".npz"):
            np.savez(path, X=X, y=y)
        elif name.endswith(".npy"):
            np.save(path, np.column_stack([X, y]))
        else:
            np.savetxt(path, np.column_stack([X, (y > 0).astype(int)]), delimiter=",",
                       header="a,b,c,label", comments="")   # labels 0/1 -> -1/+1
        Xb, yb = configs.read_data_file(str(path))
        np.testing.assert_allclose(Xb, X, rtol=1e-15)
        np.testing.assert_array_equal(yb, y)
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'model = "linear"\nsteps = 40\nn_records = 5\n'
                   f'data_file = "{tmp_path / "d.npz"}"\npolicy = "constant"\nlr = 0.5\n')
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--lr", "0.25", "--out", str(out),
                 "--no-progress", "--no-kkt-report"]) == 0
    meta = Trajectory.load(out).meta
    assert meta["config"]["lr"] == 0.25 and meta["config"]["steps"] == 40   # CLI wins
    assert meta["config"]["n"] == 14 and meta["config"]["dim"] == 3 and meta["n"] == 14
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,0.5\n3,4,1\n")
    with pytest.raises(SystemExit):
        main(["run", "--data-file", str(bad), "--out", str(tmp_path / "b")])
    assert "bad.csv: labels must be integers" in capsys.readouterr().err


def test_schema_matches_the_library():
    assert configs.LOSSES == tuple(sorted(losses.LOSSES))
    assert configs.DATASETS == tuple(sorted(homoflow.data.DATASETS))
    assert set(configs.SWEEP_KEYS) <= set(configs.OPTIONS)


def test_optax_divergence_message_is_readable(tmp_path, capsys):
    code = main(["run", "--policy", "sgd_optax", "--lr", "100", "--steps", "30", "--width",
                 "20", "--n-records", "5", "--out",
                 str(tmp_path / "r"), "--no-progress", "--no-kkt-report"])
    err = capsys.readouterr().err
    assert code == 2 and "optax.sgd(learning_rate=100)" in err
    assert "<function" not in err and "GradientTransformation" not in err
