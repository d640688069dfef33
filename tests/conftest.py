import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# One persistent compilation cache for the whole test session, shared by the pytest-xdist
# workers and every subprocess a test starts (JAX reads these variables when it is imported).
# XLA's compilation is about three quarters of this suite's time, and many programs recur:
# the same problem built again in another module (each module ends with jax.clear_caches()),
# in the other worker, or in a CLI subprocess. The directory is fresh for each session (a
# clean clone pays every first compilation) and removed at its end by the process that made
# it (the xdist controller, which imports this file before it starts the workers).
if "HOMOFLOW_TEST_JAX_CACHE" not in os.environ:
    os.environ["HOMOFLOW_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="homoflow-test-jax-")
    atexit.register(shutil.rmtree, os.environ["HOMOFLOW_TEST_JAX_CACHE"], True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["HOMOFLOW_TEST_JAX_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

# float64 for the whole test run, set where the program starts (as the CLI and the
# notebooks do): importing homoflow changes no JAX setting
jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.optimize  # noqa: E402

from homoflow import data, losses, models  # noqa: E402
from homoflow.problem import make_problem  # noqa: E402

# in-process CLI calls leave this process's JAX without a persistent compilation cache
os.environ.setdefault("HOMOFLOW_NO_COMPILE_CACHE", "1")

# XLA flags for the test session only (the library and the CLI leave XLA's defaults alone),
# measured with jaxlib 0.10.2 on 2 cores:
#  - the loop-and-elemental emitters instead of the newer fusion emitters: the same
#    programs compile ~25 % faster (tests/test_kkt.py on a cold cache 121 -> 91 s) and run
#    as fast;
#  - LLVM without its optimization passes: the default problem's Clarke KKT program
#    compiles in 1.5 s instead of 4.4 s, and XLA's compilation is most of this suite's
#    time (per file: test_kkt 131 -> 77 worker-s, test_descent 71 -> 41, test_cli 56 ->
#    28). The code it makes runs slower where a test really computes (the quick CNN
#    experiment 4x), so the checks that compute (-m slow) keep XLA's level, and the quick
#    experiment runs in a subprocess at XLA's level (``xla_optimized_env``).
# Set in the process that starts the xdist workers, before they start, and only where a
# child process accepts them (an XLA that does not know a flag aborts). A flag already in
# XLA_FLAGS (either value) is left as given; HOMOFLOW_TEST_XLA_DEFAULTS=1 sets none.
_FUSION, _OPT_LEVEL = "--xla_cpu_use_fusion_emitters", "--xla_backend_optimization_level"


def pytest_configure(config):
    if os.environ.get("HOMOFLOW_TEST_XLA_DEFAULTS", "") not in ("", "0"):
        return
    mark = config.option.markexpr or ""
    computes = "slow" in mark and "not slow" not in mark
    wanted = {_FUSION: "false"} if computes else {_FUSION: "false", _OPT_LEVEL: "0"}
    current = os.environ.get("XLA_FLAGS", "")
    flags = " ".join([current] + [f"{k}={v}" for k, v in wanted.items() if k not in current])
    if flags.strip() == current.strip():
        return
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1) + 1"],
                           env={**os.environ, "XLA_FLAGS": flags}, capture_output=True)
    if probe.returncode == 0:
        os.environ["XLA_FLAGS"] = flags.strip()


def host_devices_env(n: int | None, env=None) -> dict:
    """``env`` (default os.environ) whose XLA_FLAGS keep this session's flags but ask for
    ``n`` CPU devices (``None``: XLA's one), for a subprocess that shards or is one process
    of a distributed run."""
    env = dict(os.environ if env is None else env)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if n is not None:
        flags.append(f"--xla_force_host_platform_device_count={int(n)}")
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def xla_optimized_env(env=None) -> dict:
    """``env`` (default os.environ) with this session's optimization-level flag removed from
    XLA_FLAGS: for a subprocess whose test time is computing, not compiling."""
    env = dict(os.environ if env is None else env)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith(_OPT_LEVEL + "="))
    return env

# float64 tolerances used throughout (stated per test where they differ)
RTOL_F64 = 1e-9


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drop JAX's compiled programs after each test module. In one long default run, XLA
    aborted (twice with a segfault, once SIGABRT) while compiling the Clarke residual in
    tests/test_sliding.py after ~280 earlier tests, never when that file ran alone or after
    the notebooks; each module compiles what it needs anyway."""
    yield
    jax.clear_caches()


@pytest.fixture(scope="session")
def separable():
    return data.linearly_separable(40, 6, seed=3)


@pytest.fixture(scope="session")
def default_problem():
    X, y = data.linearly_separable(100, 10, 0)
    model = models.mlp((10, 100, 1))
    return make_problem(model, losses.exponential(), X, y), model.init(jax.random.PRNGKey(0))


def hard_margin_svm(X, y):
    """min ||w||^2 / 2 s.t. y_n <w, x_n> >= 1 (no bias), an independent reference: the dual
    min_{a >= 0} ||A^T a||^2 / 2 - sum a (A = y * X) by scipy's L-BFGS-B, then polished on
    its support set (A_S A_S^T a_S = 1 exactly) and checked for dual and primal feasibility.
    Returns (w, a)."""
    A = y[:, None] * X
    res = scipy.optimize.minimize(
        lambda a: (0.5 * np.sum((A.T @ a) ** 2) - a.sum(), A @ (A.T @ a) - 1.0),
        np.zeros(len(y)), jac=True, method="L-BFGS-B", bounds=[(0, None)] * len(y),
        options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 10_000})
    S = res.x > 1e-6 * res.x.max()
    alpha = np.zeros(len(y))
    alpha[S] = np.linalg.solve(A[S] @ A[S].T, np.ones(S.sum()))
    w = A.T @ alpha
    assert np.all(alpha[S] > 0) and (A @ w).min() > 1 - 1e-12
    return w, alpha


def all_models(dim=6, classes=3):
    """(model, input shape) for every model family, binary and multi-class."""
    return [
        (models.linear(dim), (dim,)),
        (models.linear(dim, classes), (dim,)),
        (models.deep_linear((dim, 5, 4, 1)), (dim,)),
        (models.deep_linear((dim, 5, classes)), (dim,)),
        (models.diagonal_linear(dim, 3), (dim,)),
        (models.mlp((dim, 16, 1)), (dim,)),
        (models.mlp((dim, 16, 8, classes)), (dim,)),
        (models.mlp((dim, 16, 1), models.leaky_relu(0.1)), (dim,)),
        (models.mlp((dim, 12, 12, 1), models.relu_power(3)), (dim,)),
        (models.mlp((dim, 12, 1), models.quadratic()), (dim,)),
        (models.cnn((8, 8), channels=(4, 4), hidden=8), (8, 8)),
        (models.cnn((8, 8, 2), channels=(3,), hidden=6, n_outputs=classes, bias_first=True),
         (8, 8, 2)),
        (models.mexican_hat(2.0), (dim,)),
    ]


def model_id(entry):
    m, _ = entry
    return f"{m.name}-C{m.n_outputs}-L{m.order:g}"
