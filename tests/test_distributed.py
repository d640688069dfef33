"""``homoflow sweep --distributed`` with two processes on loopback (jax.distributed, gloo
collectives on CPU): the table equals the one-process table, only process 0 writes, and a
sweep whose worker was killed recomputes exactly the unfinished configurations on resume."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from homoflow import sweep

from conftest import host_devices_env

ROOT = Path(__file__).resolve().parent.parent
# 6 configurations in 3 batches of 2 (one per process): a kill after the first batch
# leaves 4 to recompute
GRID = {"model": "linear", "depth": 1, "n": 12, "dim": 3, "steps": 150, "n_records": 6,
        "policy": "constant", "lr": [0.05, 0.1, 0.2], "seed": [0, 1]}
MAX_BATCH = 2

# One process of the sweep. It records every file it opens for writing (or renames, makes)
# under the sweep directory; with KILL process 1 SIGKILLs itself once configuration 1 is
# finished.
_WORKER = """
import builtins, io, json, os, signal, sys
out, kill = os.path.abspath(sys.argv[1]), sys.argv[2] == "1"
writes = []

def under(path):
    try:
        return os.path.abspath(os.fspath(path)).startswith(out)
    except TypeError:
        return False

_open = builtins.open
def spy_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+") and under(file):
        writes.append(("open", str(file)))
    return _open(file, mode, *a, **k)
def spy(name):
    real = getattr(os, name)
    def f(src, *a, **k):
        if under(src) or (a and under(a[0])):
            writes.append((name, str(src)))
        return real(src, *a, **k)
    return f

import jax
jax.config.update("jax_enable_x64", True)
from homoflow import sweep
sweep.initialize_distributed()    # JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
me = jax.process_index()
builtins.open = io.open = spy_open
for name in ("replace", "rename", "mkdir", "makedirs"):
    setattr(os, name, spy(name))

def on_config(i):
    if kill and me == 1 and i == 1:
        os.kill(os.getpid(), signal.SIGKILL)

grid = json.loads(os.environ["GRID"])
t = sweep.sweep(grid, out=out, max_batch=int(os.environ["MAX_BATCH"]), progress=False,
                on_config=on_config)
print(json.dumps({"process": me, "devices": t.meta["devices"], "rows": len(t),
                  "computed": t.meta["computed"], "reused": t.meta["reused"],
                  "writes": writes}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, kill: bool = False):
    port = _free_port()
    procs = []
    for pid in (0, 1):
        # one CPU device per process, compiled with this session's other XLA flags (the
        # one-process table was, and the tables are compared bit for bit)
        env = {**host_devices_env(None), "JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "1",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid), "GRID": json.dumps(GRID),
               "MAX_BATCH": str(MAX_BATCH), "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(out), "1" if kill else "0"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT))
    return procs


def _finish(procs, timeout=300):
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    return outs


def _assert_same_table(a: sweep.SweepTable, b: sweep.SweepTable):
    assert list(a.columns) == list(b.columns)
    for k in a.columns:
        x, y = a.columns[k], b.columns[k]
        if x.dtype.kind == "f":
            # every device runs a batch of one configuration in both runs: the same program
            # per device, so the numbers agree to the bit
            np.testing.assert_array_equal(x, y, err_msg=k)
        else:
            assert np.array_equal(x, y), k


@pytest.fixture(scope="module")
def one_process():
    return sweep.sweep(GRID, max_batch=1, progress=False)


def test_two_process_sweep_equals_the_one_process_table_and_only_process_0_writes(
        tmp_path, one_process):
    out = tmp_path / "sw"
    p0, p1 = _finish(_launch(out))
    assert p0["devices"] == p1["devices"] == 2 and p0["rows"] == p1["rows"] == len(one_process)
    assert p0["computed"] == p1["computed"] == list(range(6))
    assert p1["writes"] == [], p1["writes"]
    written = " ".join(Path(w[1]).name for w in p0["writes"])   # the spy sees process 0's
    for name in ("manifest.json", "000005.npz", "table.npz", "status.md", "rates.png"):
        assert name in written, (name, written)
    assert sorted(f.name for f in (out / "configs").iterdir()) == [f"{i:06d}.npz"
                                                                   for i in range(6)]
    table = sweep.SweepTable.load(out)
    assert table.meta["processes"] == 2
    _assert_same_table(table, one_process)


@pytest.mark.slow   # three more process pairs (~40 s on a quiet 2-core machine)
def test_a_killed_worker_s_share_is_recomputed_on_resume(tmp_path, one_process):
    out = tmp_path / "sw"
    procs = _launch(out, kill=True)
    assert procs[1].wait(timeout=300) == -signal.SIGKILL
    # process 0 wrote what the two had finished together, then waits for its dead peer
    done = [out / "configs" / f"{i:06d}.npz" for i in (0, 1)]
    deadline = time.monotonic() + 60
    while not all(f.exists() for f in done) and time.monotonic() < deadline:
        time.sleep(0.2)
    procs[0].kill()
    procs[0].wait(timeout=60)
    assert sorted(f.name for f in (out / "configs").glob("*.npz")) == ["000000.npz",
                                                                       "000001.npz"]
    assert not (out / "table.npz").exists()
    p0, p1 = _finish(_launch(out))
    assert p0["reused"] == p1["reused"] == [0, 1]
    assert p0["computed"] == p1["computed"] == [2, 3, 4, 5]
    assert p1["writes"] == []
    _assert_same_table(sweep.SweepTable.load(out), one_process)
