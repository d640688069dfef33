import json

import pytest

from homoflow import Trajectory
from homoflow.cli import build_parser, main


def test_run_writes_the_run_directory_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--steps", "300", "--width", "20", "--out", str(out), "--no-progress"])
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


def test_a_diverging_run_still_writes_everything_and_exits_nonzero(tmp_path, capsys):
    out = tmp_path / "div"
    code = main(["run", "--policy", "constant", "--lr", "1.0", "--steps", "50", "--width", "10",
                 "--out", str(out), "--no-progress"])
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
    assert "gradient flow to log t = 20" in capsys.readouterr().out
    traj = Trajectory.load(out)
    assert traj.meta["engine"] == "flow" and traj["log_T"][-1] >= 20
    for name in ("trajectory.csv", "summary.png"):
        assert (out / name).stat().st_size > 0, name
