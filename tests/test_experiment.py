import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from homoflow import check_homogeneity, data, losses, make_problem, models
from homoflow.experiments import paper_cnn

from conftest import xla_optimized_env

try:  # MNIST is the optional mnist extra; without it the quick run uses the digits
    from homoflow import mnist as _mnist
    _mnist.locate()
    HAVE_MNIST = True
except ImportError:
    HAVE_MNIST = False
ROOT = str(Path(__file__).resolve().parents[1])
QUICK_DATA = [] if HAVE_MNIST else ["--data", "digits"]
# the configuration the quick run below uses (the digits variant trains for more epochs)
QUICK = paper_cnn.preset(quick=True, data=None if HAVE_MNIST else "digits")


def _read_csv(path):
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return [{k: float(v) if v not in ("", "None") else math.nan for k, v in r.items()
             if k != "model" and k != "split"} | {k: r[k] for k in ("model", "split") if k in r}
            for r in rows]


STOP_AT = QUICK.segment + 10   # the epoch the quick run is interrupted after


class _StopAfter:
    """A stand-in for ``homoflow.io.Interrupt`` whose signal lands during epoch ``epoch``:
    ``train`` polls it once before its first segment and once per recorded epoch (0, 1, ...)."""

    def __init__(self, epoch):
        self.left = epoch + 2

    def __call__(self):
        self.left -= 1
        return self.left <= 0


# the fixture's process: the quick run, interrupted after epoch STOP_AT (what it leaves is
# copied aside), then resumed to the end by the CLI; exit status 0 iff every CLI call
# returned what the fixture expects
_QUICK_RUN = r"""
import json, shutil, sys
from pathlib import Path
import jax
jax.config.update("jax_enable_x64", True)
from test_experiment import QUICK, QUICK_DATA, STOP_AT, _StopAfter
from homoflow.cli import main
from homoflow.experiments import paper_cnn
out, part_dir = Path(sys.argv[1]), Path(sys.argv[2])
part = paper_cnn.run(QUICK, out, progress=False, log=lambda _: None, stop=_StopAfter(STOP_AT))
shutil.copytree(out, part_dir)
(part_dir.parent / "part_status.json").write_text(json.dumps(part["status"]))
args = ["experiment", "paper-cnn", "--quick", "--out", str(out), "--no-progress", *QUICK_DATA]
codes = main(args), main(args + ["--resume"])
sys.exit(0 if codes == (2, 0) else f"CLI exit codes {codes}, expected (2, 0): a non-empty "
         "--out needs --resume, which then finishes the run")
"""


@pytest.fixture(scope="module")
def interrupted_then_quick(tmp_path_factory):
    """The quick experiment, interrupted after epoch STOP_AT of its first run (what the
    interrupted directory holds is copied aside), then resumed to the end by the CLI. It
    runs in a subprocess at XLA's own optimization level: this session compiles without
    LLVM's optimizations (tests/conftest.py), which makes a CNN's training ~4x slower."""
    base = tmp_path_factory.mktemp("paper_cnn")
    out, part_dir = base / "run", base / "interrupted"
    env = xla_optimized_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), ROOT,
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _QUICK_RUN, str(out), str(part_dir)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = {"result": {"status": json.loads((base / "part_status.json").read_text())},
             "summary": json.loads((part_dir / "summary.json").read_text()),
             "loaded": paper_cnn.load(part_dir),
             "files": sorted(p.name for p in part_dir.iterdir())}
    return saved, out


@pytest.fixture(scope="module")
def quick(interrupted_then_quick):
    return interrupted_then_quick[1]


def test_an_interrupted_experiment_writes_its_records_with_status_interrupted(
        interrupted_then_quick):
    saved, _ = interrupted_then_quick
    assert saved["result"]["status"] == saved["summary"]["status"] == "interrupted"
    run = saved["summary"]["runs"][paper_cnn.TABLE_RUN]
    assert run["status"] == "interrupted" and run["epochs"] == STOP_AT
    assert list(saved["summary"]["runs"]) == [paper_cnn.TABLE_RUN]   # the next never began
    assert "not started: bias/constant" in saved["summary"]["message"]
    rows = saved["loaded"]["records"][paper_cnn.TABLE_RUN]
    assert [int(r["epoch"]) for r in rows] == list(range(STOP_AT + 1))
    # the saved state is the last finished segment's: a resume restarts there
    assert f"saved state is at epoch {QUICK.segment}" in run["message"]
    assert {"summary.json", "checkpoints.npz", "state",
            "epochs_no_bias_loss_based.csv"} <= set(saved["files"])
    assert "table1.md" not in saved["files"] and saved["loaded"]["radii"] == {}


def test_an_interrupted_experiment_plots_every_figure_without_warnings(
        interrupted_then_quick, tmp_path):
    """The interrupted directory holds one run and no radii: every figure is still drawn,
    and no panel asks matplotlib for a legend without labelled lines (a UserWarning)."""
    import warnings

    saved, _ = interrupted_then_quick
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = paper_cnn.plot(saved["loaded"], tmp_path, np.linspace(0.0, 1.0, 5))
    assert len(paths) == 4 and all(p.stat().st_size > 0 for p in paths)


def test_quick_experiment_writes_table_records_curves_and_figures(quick):
    for name in ("table1.md", "table1.csv", "robustness.csv", "radii.npz", "summary.json",
                 "checkpoints.npz",
                 "epochs_no_bias_loss_based.csv", "epochs_bias_constant.csv",
                 "fig1_loss_margin.png", "fig3_4_accuracy_margin_alpha.png",
                 "fig7_accuracy.png", "fig8_robustness.png"):
        assert (quick / name).stat().st_size > 0, name
    summary = json.loads((quick / "summary.json").read_text())
    assert summary["runs"]["bias/constant"]["homogeneous"] is False
    assert summary["runs"]["no_bias/loss_based"]["homogeneous"] is True
    # a run directory can be read back and plotted again
    again = paper_cnn.load(quick)
    assert set(again["records"]) == set(QUICK.runs)
    assert len(again["radii"]) == 2 * (len(QUICK.thresholds) + 1)


def test_quick_records_are_finite_and_the_loss_based_run_separates(quick):
    rows = _read_csv(quick / "epochs_no_bias_loss_based.csv")
    assert len(rows) == QUICK.epochs + 1 or rows[-1]["log10_loss"] <= -800
    for r in rows[1:]:
        assert all(math.isfinite(v) for k, v in r.items() if isinstance(v, float)), r
    assert rows[-1]["train_acc"] == 1.0
    # alpha(t) of eq. (26) is eta(t) L(t-1): it never exceeds alpha0 r_u^t
    alphas = np.array([r["alpha"] for r in rows[1:]])
    t = np.arange(1, len(rows))
    assert np.all(alphas <= QUICK.alpha0 * 2 ** (t / 5) * (1 + 1e-9))


def test_table1_thresholds_are_crossed_in_order_and_first_time(quick):
    table = _read_csv(quick / "table1.csv")
    records = {int(r["epoch"]): r["log10_loss"] for r in
               _read_csv(quick / "epochs_no_bias_loss_based.csv")}
    thresholds = QUICK.thresholds
    assert [r["model"] for r in table] == [f"model-{k}" for k in range(1, len(thresholds) + 2)]
    epochs = [int(r["epochs"]) for r in table]
    assert all(a < b for a, b in zip(epochs, epochs[1:]))  # every threshold reached, in order
    for row, thr in zip(table, thresholds):
        e = int(row["epochs"])
        assert row["log10_train_loss"] < thr <= records[e - 1]  # the first epoch below it


def test_normalized_margin_of_the_bias_free_cnn_does_not_decrease_across_checkpoints(quick):
    table = _read_csv(quick / "table1.csv")
    margins = [r["normalized_margin"] for r in table]
    assert margins[0] > 0
    assert all(b >= a for a, b in zip(margins, margins[1:])), margins


def test_each_robustness_curve_lies_between_certificate_and_attack(quick):
    with np.load(quick / "radii.npz") as f:
        radii = {k: f[k] for k in f.files}
    labels = {k.rsplit("_", 2)[0] for k in radii}
    assert len(labels) == len(QUICK.thresholds) + 1
    failures = 0
    for label in labels:
        for split in ("train", "test"):
            att, cert = radii[f"{label}_{split}_attack"], radii[f"{label}_{split}_certified"]
            assert len(att) == QUICK.attack_points
            # +inf: the attack found no misclassified point inside the input box (eps_max)
            assert not np.any(np.isnan(att)) and np.all(att > 0) and np.all(cert >= 0)
            assert np.all(cert <= att)
            failures += int(np.sum(np.isinf(att)))
    checks = json.loads((quick / "summary.json").read_text())["checks"]
    assert checks["attack_failures"] == failures  # every failure is reported, none hidden
    assert failures <= len(radii) // 2 * QUICK.attack_points // 10  # the attack mostly works
    for r in _read_csv(quick / "robustness.csv"):
        assert 0 <= r["robust_acc_certified"] <= r["robust_acc_attack"] <= 1


def test_the_cnn_with_every_bias_is_refused_as_homogeneous_and_measurably_is_not():
    model = models.cnn((8, 8), channels=(2, 3), hidden=4, n_outputs=3, all_biases=True)
    X = np.random.default_rng(0).uniform(size=(10, 8, 8))
    y = np.arange(10) % 3
    with pytest.raises(ValueError, match="not homogeneous"):
        make_problem(model, losses.cross_entropy(), X, y)
    problem = make_problem(model, losses.cross_entropy(), X, y, allow_nonhomogeneous=True)
    assert not problem.model.homogeneous
    params = model.init(jax.random.PRNGKey(0))
    params = tuple(dict(g, b=g["b"] + 0.3) for g in params)  # nonzero biases
    with pytest.raises(models.HomogeneityError):
        check_homogeneity(model, params, X)


def test_one_dimensional_bias_free_cnn_is_homogeneous_of_order_four():
    model = models.cnn((40,), channels=(3, 4), kernel=(5, 3), hidden=6, n_outputs=10,
                       bias_first=True)
    params = model.init(jax.random.PRNGKey(1))
    params = (dict(params[0], b=params[0]["b"] + 0.2), *params[1:])
    X = np.random.default_rng(1).normal(size=(12, 40))
    report = check_homogeneity(model, params, X)
    assert abs(report.order - 4.0) < 1e-9


def _weights(groups):
    return [g["w"] if isinstance(g, dict) else g for g in groups]


def test_paper_cnn_presets_structure_and_multi_homogeneity():
    # the exact model's layer shapes (abstractly: 4.2 M parameters need not be drawn here)
    full = jax.eval_shape(models.paper_cnn().init, jax.random.PRNGKey(0))
    assert [w.shape for w in _weights(full)] == [(5, 5, 1, 32), (3, 3, 32, 64),
                                                  (8 * 8 * 64, 1024), (1024, 10)]
    assert isinstance(full[0], dict) and not any(isinstance(g, dict) for g in full[1:])
    c1, c2, h = widths = (4, 6, 8)
    model = models.paper_cnn(widths=widths)
    params = jax.jit(model.init)(jax.random.PRNGKey(2))  # one compile, not one per op
    # conv-c1 5x5, conv-c2 3x3, fc (8*8*c2 -> h), fc (h -> 10): SAME convs, two 2x2 pools
    assert [w.shape for w in _weights(params)] == [(5, 5, 1, c1), (3, 3, c1, c2),
                                                   (8 * 8 * c2, h), (h, 10)]
    # He-normal: std sqrt(2 / fan_in) per layer, within 4 standard errors of the sample std
    for w, fan_in in zip(_weights(params), (25, 9 * c1, 64 * c2, h)):
        assert abs(float(np.std(w)) / math.sqrt(2 / fan_in) - 1) < 4 / math.sqrt(2 * w.size)
    assert float(np.max(np.abs(params[0]["b"]))) == 0.0  # biases start at zero
    assert model.layer_orders == (1.0,) * 4 and model.order == 4.0 and model.homogeneous
    X = np.random.default_rng(3).uniform(size=(2, 32, 32, 1))
    params = (dict(params[0], b=params[0]["b"] + 0.1), *params[1:])
    report = check_homogeneity(model, params, X)
    assert abs(report.order - 4.0) < 1e-9
    assert all(abs(k - 1.0) < 1e-9 for k in report.layer_orders)
    with_bias = jax.eval_shape(models.paper_cnn(bias="all", widths=widths).init,
                               jax.random.PRNGKey(0))
    assert not models.paper_cnn(bias="all").homogeneous
    assert all(isinstance(g, dict) for g in with_bias)


def test_paper_cnn_refuses_bad_presets():
    with pytest.raises(ValueError, match="bias must be 'first'"):
        models.paper_cnn(bias="none")
    with pytest.raises(ValueError, match="three positive sizes"):
        models.paper_cnn(widths=(32, 64))


def _tiny(**changes):
    """A few epochs of the quick configuration on 100 training images."""
    config = dataclasses.replace(paper_cnn.QUICK, train_size=100, test_size=50, **changes)
    if not HAVE_MNIST:
        config = dataclasses.replace(config, data="digits", train_size=None, test_size=None)
    extra = ({"train_size": config.train_size, "test_size": config.test_size}
             if config.data == "mnist" else {})
    return config, data.load(config.data, classes=config.classes, **extra)


def _same_rows(rows_a, rows_b):
    assert len(rows_a) == len(rows_b)
    for a, b in zip(rows_a, rows_b):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])), (a["epoch"], k)


@pytest.mark.slow  # three short training runs: ~10 min at a load of 17 on 2 cores
def test_an_interrupted_run_resumes_and_ends_exactly_as_an_uninterrupted_one(tmp_path,
                                                                            monkeypatch):
    config, split = _tiny(epochs=9, segment=3)
    name = paper_cnn.TABLE_RUN
    whole = paper_cnn.train(name, config, split, progress=False, state_dir=tmp_path / "a")
    real, calls = paper_cnn.descent, {"n": 0}

    def killed_in_the_third_segment(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(paper_cnn, "descent", killed_in_the_third_segment)
    with pytest.raises(KeyboardInterrupt):
        paper_cnn.train(name, config, split, progress=False, state_dir=tmp_path / "b")
    monkeypatch.setattr(paper_cnn, "descent", real)
    resumed = paper_cnn.train(name, config, split, progress=False, state_dir=tmp_path / "b")
    assert [r["epoch"] for r in resumed["rows"]] == list(range(10))
    # bit for bit: same batches (key folded with the segment's first epoch), same alpha
    _same_rows(whole["rows"], resumed["rows"])
    for x, y in zip(jax.tree_util.tree_leaves(whole["final"]["params"]),
                    jax.tree_util.tree_leaves(resumed["final"]["params"])):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # a finished run is read back, not retrained; another configuration is refused
    again = paper_cnn.train(name, config, split, progress=False, state_dir=tmp_path / "b")
    _same_rows(again["rows"], resumed["rows"])
    other = dataclasses.replace(config, seed=1)
    with pytest.raises(ValueError, match="another configuration"):
        paper_cnn.train(name, other, split, progress=False, state_dir=tmp_path / "b")


@pytest.mark.slow  # two more compiled training programs (float32 and float64)
def test_float32_forward_tracks_the_float64_run():
    config, split = _tiny(epochs=4)
    name = paper_cnn.TABLE_RUN
    r64 = paper_cnn.train(name, config, split, progress=False)
    r32 = paper_cnn.train(name, dataclasses.replace(config, dtype="float32"), split,
                          progress=False)
    a = np.array([r["log10_loss"] for r in r64["rows"]])
    b = np.array([r["log10_loss"] for r in r32["rows"]])
    # float32 rounds each output to ~6e-8 relative; over 4 epochs of 1-2 SGD steps the
    # parameters drift by a few 1e-6 relative, which moves log10 L by far less than 1e-3
    assert np.all(np.abs(a - b) <= 1e-3 * np.maximum(1.0, np.abs(a))), (a, b)
    assert a[-1] < a[0] and b[-1] < b[0]


def test_margin_ablation_reads_the_first_epoch_below_each_threshold(tmp_path, capsys):
    """benchmarks/margin_ablation.py: the margin at the first epoch below each threshold,
    ratios against the first threshold, '-' for a threshold a run never reached."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "margin_ablation.py"
    spec = importlib.util.spec_from_file_location("margin_ablation", path)
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "epochs_no_bias_loss_based.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["epoch", "log10_loss", "normalized_margin"])
        w.writeheader()
        w.writerows([{"epoch": e, "log10_loss": -e, "normalized_margin": 0.001 * e}
                     for e in range(0, 31)])   # log10 L = -epoch: 10^-10 first below at 11
    assert ablation.main([f"toy={run}", "--thresholds", "-10", "-20", "-40",
                          "--out", str(tmp_path / "r.json")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| toy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["toy", "0.011 (11)", "0.021 (21)", "-", "×1.91", "-"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["runs"]["toy"]["-10.0"] == [11, 0.011]
    # bad input names the bad value
    with pytest.raises(SystemExit, match="run 'nolabel': expected LABEL=DIR"):
        ablation.main(["nolabel"])
    with pytest.raises(SystemExit, match=r"empty[/\\]epochs_no_bias_loss_based\.csv: no Table 1"):
        ablation.main([f"x={tmp_path / 'empty'}"])
