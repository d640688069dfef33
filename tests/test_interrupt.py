"""Nothing is lost (issue 16, items 1-2): SIGINT to a real ``homoflow`` process mid-run
writes everything recorded with status "interrupted" and exits 130; ``run --resume``
continues the run bit for bit; an interrupted sweep keeps its finished configurations."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from homoflow import Trajectory
from homoflow.cli import main
from homoflow.sweep import SweepTable

ROOT = str(Path(__file__).resolve().parents[1])
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
ENV.pop("HOMOFLOW_NO_COMPILE_CACHE", None)
# a small problem with far more iterations than can run before the signal lands
RUN = ["--model", "mlp", "--width", "6", "--n", "16", "--dim", "3", "--loss", "logistic",
       "--policy", "constant", "--lr", "0.2", "--steps", "5000", "--n-records", "15",
       "--no-progress", "--no-kkt-report"]


def _env(tmp_path):
    # the processes of one test share a fresh compilation cache: the later ones load the
    # first one's programs (and this exercises the CLI's cache)
    return {**ENV, "HOMOFLOW_CACHE_DIR": str(tmp_path / "jax-cache")}


def _homoflow(args, tmp_path) -> int:
    p = subprocess.run([sys.executable, "-m", "homoflow.cli", *args], env=_env(tmp_path),
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    return p.returncode


def _interrupt(args, tmp_path, header: str, sig=signal.SIGINT):
    """Start ``homoflow ARGS``, send ``sig`` once it printed ``header`` (its signal handler
    is in place by then, and compilation has not finished), return (code, stdout, stderr)."""
    p = subprocess.Popen([sys.executable, "-m", "homoflow.cli", *args], env=_env(tmp_path),
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    first = p.stdout.readline()
    assert first.startswith(header), (first, p.stderr.read() if p.poll() is not None else "")
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    return p.returncode, first + out, err


def test_sigint_saves_the_run_and_resume_equals_the_uninterrupted_run(tmp_path):
    d = tmp_path / "run"
    code, out, err = _interrupt(["run", *RUN, "--out", str(d)], tmp_path, "homoflow run:")
    assert code == 130, (out, err)
    assert "SIGINT" in err and "Traceback" not in err
    part = Trajectory.load(d)
    assert part.status == "interrupted" and part.meta["interrupted_by"] == "SIGINT"
    assert "homoflow run --resume" in part.meta["message"]
    assert 1 <= len(part) and int(part["step"][-1]) < 5000
    assert (d / "state.npz").exists() and (d / "summary.png").exists()

    assert _homoflow(["run", "--resume", str(d), "--no-progress", "--no-kkt-report"],
                     tmp_path) == 0
    resumed = Trajectory.load(d)
    full_dir = tmp_path / "full"
    assert _homoflow(["run", *RUN, "--out", str(full_dir)], tmp_path) == 0
    full = Trajectory.load(full_dir)
    assert resumed.status == full.status == "completed"
    assert not (d / "state.npz").exists()   # finished: nothing left to resume
    assert set(resumed.columns) == set(full.columns)
    for k in full.columns:   # bitwise: same grid, same chunks, same compiled step
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    for a, b in zip(jax.tree_util.tree_leaves(resumed.snapshots),
                    jax.tree_util.tree_leaves(full.snapshots)):
        np.testing.assert_array_equal(a, b)


def test_sigterm_stops_a_sweep_after_its_batch_and_resume_computes_the_rest(tmp_path):
    d = tmp_path / "sweep"
    args = ["sweep", "--model", "linear", "--n", "12", "--dim", "3", "--steps", "200",
            "--n-records", "5", "--lr", "0.1", "0.2", "0.3", "--max-batch", "1",
            "--no-progress", "--out", str(d)]
    code, out, err = _interrupt(args, tmp_path, "homoflow sweep:", signal.SIGTERM)
    assert code == 130, (out, err)
    assert "SIGTERM" in err and "Traceback" not in err and "--resume" in err
    part = SweepTable.load(d)
    assert part.meta["status"] == "interrupted"
    done = sorted(set(part["config"].tolist()))
    assert done and len(done) < 3 and part.meta["missing"] == [i for i in range(3)
                                                               if i not in done]
    assert main(args) == 2   # a non-empty --out needs --resume (refused before compute)
    assert _homoflow(args + ["--resume"], tmp_path) == 0
    full = SweepTable.load(d)
    assert full.meta["status"] == "completed" and full.meta["reused"] == done
    assert sorted(set(full["config"].tolist())) == [0, 1, 2]


@pytest.mark.slow   # ~20-35 s: a CNN compiled in a fresh process (the default check of the
# same code path interrupts the quick experiment in-process: tests/test_experiment.py)
def test_sigint_stops_the_experiment_after_its_epoch_and_writes_every_record(tmp_path):
    import json
    import time

    from homoflow.experiments import paper_cnn

    d = tmp_path / "cnn"
    args = ["experiment", "paper-cnn", "--quick", "--data", "digits", "--epochs", "100000",
            "--no-progress", "--out", str(d)]
    p = subprocess.Popen([sys.executable, "-m", "homoflow.cli", *args], env=_env(tmp_path),
                         text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    state = d / "state" / "no_bias_loss_based.npz"
    deadline = time.monotonic() + 300
    while not state.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)   # the first segment (QUICK.segment epochs) is saved: training is under way
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 130, (out, err)
    assert "SIGINT" in err and "Traceback" not in err and "--resume" in err
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    run = summary["runs"]["no_bias/loss_based"]
    assert run["status"] == "interrupted" and paper_cnn.QUICK.segment <= run["epochs"] < 100000
    rows = paper_cnn.load(d)["records"]["no_bias/loss_based"]
    assert [int(r["epoch"]) for r in rows] == list(range(run["epochs"] + 1))
