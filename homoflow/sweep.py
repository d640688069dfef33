"""Sweeps: a grid of configurations run as few compiled programs as possible.

A grid is a dict whose values are either one value or a list of values (an *axis*); the
configurations are the Cartesian product of the axes. Axes that keep every array shape —
the seed of the initialization, the seed of the data, and the step-size policy's numeric
hyperparameters (``lr``, ``alpha0``, ``r_u``, ``r_d``, ``c_eta``, ``fraction``, and the
norm ``p`` of steepest descent) — are *vmapped*: one compiled program per model shape runs
all of them at once. Axes that change shapes or code (``depth``, ``width``, ``model``,
``loss``, ``policy``, ``step``, ``engine``, ``n``, ``dim``, ...) loop over compiled programs.

The vmapped axis is sharded over every device of the run (``jax.sharding``: a 1-D device
mesh with axis ``"configs"``, named shardings on the inputs and ``jax.shard_map`` for the
loop, so each device runs its own ``while_loop`` over its configurations without talking
to the others). Across nodes call ``initialize_distributed()`` first (``jax.distributed``;
``homoflow sweep --distributed``): ``jax.devices()`` is then the devices of every process,
each process computes its share of the batch, and process 0 alone writes. Every process
runs the configurations process 0 finds unfinished, so a resumed distributed sweep needs
``out`` on a file system every process can read.

With ``out=DIR`` the sweep is resumable: ``DIR/manifest.json`` lists the grid's
configurations and each finished configuration is written to ``DIR/configs/NNNNNN.npz``
with its configuration and a hash (``homoflow.io``: a temporary file, then an atomic
rename); started again with the same ``DIR`` and grid, the sweep computes only the
configurations without a valid file of their own. ``DIR/.homoflow.lock`` keeps a second
sweep out while one computes.

Descent runs the engine's public step (``descent.attempt`` and ``descent.settle_t0``) and
initial state (``descent.init``), and its statuses come from ``descent.outcome``;
gradient flow runs through ``flow.flow_batch`` (vmapped over
the initialization seeds, on the default device: only descent is sharded). Results come
back as one tidy ``SweepTable``: one row per configuration x recorded point, with the
configuration's columns.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from . import configs as configs_mod
from . import io, losses, schedules
from .descent import RUNNING, StepConfig, attempt, engine_columns, outcome, record_grid, \
    settle_t0, step_config, t0_pending
from .descent import init as descent_init
from .diagnostics import diagnostics
from .flow import flow_batch
from .models import HomogeneityError
from .problem import Problem, make_problem
from .report import write_sweep_report
from .trajectory import package_versions

# every key a grid may hold, with its default: the configuration schema's sweep defaults
# (homoflow.configs: names, choices and checks shared with ``homoflow run``)
DEFAULTS: dict[str, Any] = configs_mod.defaults(sweep=True)
VMAPPED = ("seed", "data_seed", "init_scale", "lr", "alpha0", "r_u", "r_d", "c_eta", "fraction", "p")
POLICY_KEYS = configs_mod.POLICY_KEYS
STEEPEST = configs_mod.STEEPEST
_policy_keys = configs_mod.policy_keys
_AXIS = "configs"
_SCALAR_SKIP = ("margins", "rho_layers")


class SweepInterrupted(RuntimeError):
    """Raised by an ``on_config`` callback (or anything else) to stop a sweep; what was
    written to ``out`` stays and a later call with the same ``out`` resumes."""


# ---------------------------------------------------------------------------------------
# the grid


def expand(grid: dict) -> list[dict]:
    """The configurations of ``grid`` (every key filled in from ``DEFAULTS``), in a fixed
    order: the product of the list-valued axes, first axis slowest."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError("the grid is empty: give at least one axis, e.g. {'depth': [1, 2]}")
    unknown = sorted(set(grid) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown grid keys {unknown}; known: {sorted(DEFAULTS)}")
    axes = {}
    for k, default in DEFAULTS.items():
        v = grid.get(k, default)
        v = list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]
        if not v:
            raise ValueError(f"grid axis {k!r} is an empty list: the grid has no configurations")
        axes[k] = v
    configs = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    resolved = []
    for i, c in enumerate(configs):
        try:
            c = configs_mod.resolve(c, sweep=True, given=set(grid))
        except ValueError as e:
            raise ValueError(f"configuration {i}: {e}") from None
        _check_policy_axes(c, {k for k, v in axes.items() if len(v) > 1})
        resolved.append(c)
    return resolved


def _check_policy_axes(c: dict, swept: set):
    used = set(_policy_keys(c)) if c["engine"] == "descent" else set()
    unused = sorted((swept & set(VMAPPED[3:])) - used)   # the policies' keys
    if unused:
        what = f"policy {c['policy']!r}" if c["engine"] == "descent" else "the flow engine"
        raise ValueError(f"grid axes {unused} are swept but {what} does not use them")


def _static_key(c: dict) -> tuple:
    # a given C_eta and one built from estimated constants are different programs
    return tuple((k, v) for k, v in c.items() if k not in VMAPPED) + (
        ("c_eta_estimated", c["c_eta"] == "estimate"),)


def _name(v):
    return getattr(v, "__name__", v) if callable(v) else v


_MODELS: dict = {}   # one Model / Loss object per description: jit caches key on identity
_LOSSES: dict = {}


def _model(c: dict):
    key = tuple(_name(c[k]) for k in ("model", "activation", "slope", "alpha_power", "depth",
                                      "width", "dim", "data", "data_file", "loss", "classes")) + (c["model"] if callable(c["model"]) else None,)
    if key not in _MODELS:
        _MODELS[key] = _build_model(c)
    return _MODELS[key]


def _loss(name: str):
    if name not in _LOSSES:
        _LOSSES[name] = losses.get_loss(name)
    return _LOSSES[name]


def _build_model(c: dict):
    return configs_mod.build_model(c)


def _data(c: dict, data_seed: int):
    return configs_mod.load_data(c, data_seed)


def _policy(c: dict, problem: Problem | None):
    """The configuration's policy (validates its hyperparameters eagerly). Without a
    problem, C_eta "estimate" is validated with placeholder constants (sampling B0, B1, B2
    is compute, left to the run)."""
    constants = None
    if c["policy"] == "h_bound" or (c["policy"] in STEEPEST and c["step"] == "h_bound"):
        if c["c_eta"] == "estimate":
            est = _estimate(problem) if problem is not None else {"B0": 1, "B1": 1, "B2": 0}
            constants = (est["B0"], est["B1"], est["B2"])
    return configs_mod.build_policy(c, constants)


_ESTIMATES: dict = {}


def _estimate(problem: Problem) -> dict:
    key = id(problem)
    if key not in _ESTIMATES:
        _ESTIMATES[key] = (problem, schedules.estimate_smoothness_constants(
            problem, jax.random.PRNGKey(0)))
    return _ESTIMATES[key][1]


@dataclass
class _Group:
    """Configurations that share one compiled program."""
    static: dict
    model: Any
    problems: dict                 # data_seed -> Problem
    ids: list = field(default_factory=list)
    key: tuple = ()


def plan(configs: list[dict]) -> list[_Group]:
    """Build every model, data set, problem and policy of the grid, so that bad input (an
    unknown name, a non-positive step size, a declared order that the homogeneity check
    refutes) raises before any compute starts."""
    groups: dict[tuple, _Group] = {}
    for i, c in enumerate(configs):
        if c["engine"] not in ("descent", "flow"):
            raise ValueError(f"unknown engine {c['engine']!r}; use descent or flow")
        key = _static_key(c)
        if key not in groups:
            model = _model(c)
            groups[key] = _Group({k: c[k] for k in c if k not in VMAPPED}, model, {}, key=key)
        g = groups[key]
        ds = int(c["data_seed"])
        if ds not in g.problems:
            X, y = _data(c, ds)
            try:
                g.problems[ds] = make_problem(g.model, _loss(c["loss"]), X, y)
            except HomogeneityError as e:
                raise HomogeneityError(f"configuration {i} (model {_name(c['model'])!r}, "
                                       f"depth {c['depth']}, width {c['width']}): {e}") from e
        if c["engine"] == "descent":
            try:
                _policy(c, None)
            except ValueError as e:
                raise ValueError(f"configuration {i} ({_describe(c)}): {e}") from e
        g.ids.append(i)
    return list(groups.values())


def _describe(c: dict) -> str:
    keys = ("engine", "model", "depth", "loss", "policy", *_policy_keys(c),
            "seed")
    return ", ".join(f"{k}={_name(c[k])}" for k in keys)


# ---------------------------------------------------------------------------------------
# devices


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` for a multi-process sweep. On a managed cluster
    (SLURM, Open MPI, Kubernetes, Cloud TPU) JAX finds everything itself; elsewhere give the
    coordinator ``host:port``, the number of processes and this process's id, as arguments
    or as the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
    JAX_PROCESS_ID (JAX reads only the first). Call it before anything else touches JAX's
    devices. On CPUs the processes exchange their results through gloo collectives."""
    env = os.environ
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def _from_process_0(mask: np.ndarray) -> np.ndarray:
    """Process 0's value of a boolean mask, on every process: which configurations a
    resumed sweep reuses must not depend on what each process happens to see on disk,
    or the processes would run different batches and wait for each other forever."""
    if jax.process_count() == 1:
        return mask
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.broadcast_one_to_all(mask)).astype(bool)


def _mesh(devices) -> Mesh:
    devs = jax.devices() if devices is None else list(devices)
    if not devs:
        raise ValueError("devices is empty")
    return Mesh(np.asarray(devs), (_AXIS,))


def _put(tree, mesh: Mesh):
    """Host arrays with a leading config axis -> global arrays sharded along it (works for
    one process and for several, since every process holds the whole host batch)."""
    sharding = NamedSharding(mesh, PartitionSpec(_AXIS))

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(one, tree)


def _get(tree):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(tree,
                                                                                   tiled=True))
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _stack(trees):
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


# ---------------------------------------------------------------------------------------
# descent, vmapped over configurations


def _where(mask, a, b):
    return jax.tree_util.tree_map(
        lambda x, y: jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y), a, b)


def _batched_advance(policy, config: StepConfig, order):
    """advance(problems, states, n) for a batch: each configuration takes ``n`` more
    accepted iterations of the engine's public ``attempt``; phi(L(t0)) (``settle_t0``) is
    evaluated only at an iteration where some configuration crosses t0."""

    def advance(problem, S, n):
        target = S.step + n

        def active(S):
            return (S.step < target) & (S.status == RUNNING)

        def body(S):
            act = active(S)
            N = jax.vmap(lambda p, s: attempt(p, policy, config, s))(problem, S)
            N = jax.lax.cond(jnp.any(t0_pending(N)),
                             lambda: jax.vmap(lambda s: settle_t0(s, order))(N),
                             lambda: N)
            return _where(act, N, S)

        return jax.lax.while_loop(lambda S: jnp.any(active(S)), body, S)

    return advance


def _shard(fn, mesh, n_batched: int, n_shared: int = 0):
    spec = PartitionSpec(_AXIS)
    return jax.jit(jax.shard_map(fn, mesh=mesh,
                                 in_specs=(spec,) * n_batched + (PartitionSpec(),) * n_shared,
                                 out_specs=spec, check_vma=False))


_PROGRAMS: dict = {}


def _descent_programs(g: _Group, policy, log_t0: float, mesh: Mesh):
    """(init, advance, diagnostics), jitted and sharded, cached per group and mesh: the
    policy's code serves every batch of the group since its values live in the states."""
    # the run length is not part of the program: one compilation serves every `steps`
    key = (tuple(kv for kv in g.key if kv[0] not in ("steps", "n_records", "chunk")),
           tuple(d.id for d in mesh.devices.flat))
    if key not in _PROGRAMS:
        config = StepConfig(log_t0, None, math.log(float(g.static["divergence_factor"])))
        init = jax.vmap(lambda pb, p, s, k: descent_init(pb, p, policy, config, k, s))
        _PROGRAMS[key] = (
            _shard(init, mesh, 4),
            _shard(_batched_advance(policy, config, g.model.order), mesh, 2, 1),
            _shard(jax.vmap(lambda pb, p, l0: diagnostics(pb, p, l0)), mesh, 3))
    return _PROGRAMS[key]


def _run_descent_group(g: _Group, configs: list[dict], ids: list[int], mesh: Mesh,
                       progress: Callable[[int], None], size: int | None = None
                       ) -> dict[int, tuple[dict, dict]]:
    """Run the descent configurations ``ids`` of group ``g`` in one vmapped, sharded
    program, the batch padded to ``size`` (a multiple of the device count: the same shape,
    hence the same compiled program, whichever configurations are left to run); returns
    {id: (columns, meta)}."""
    st = g.static
    size = max(len(ids), size or 0)
    cs = [configs[i] for i in ids + [ids[0]] * (-size % mesh.size + size - len(ids))]
    problems = [g.problems[int(c["data_seed"])] for c in cs]
    policies = [_policy(c, p) for c, p in zip(cs, problems)]
    log_t0 = step_config(problems[0], t0_log_loss=st["t0_log_loss"],
                                divergence_factor=float(st["divergence_factor"])).log_t0
    order = g.model.order
    init, advance, diag = _descent_programs(g, policies[0], log_t0, mesh)
    keys = [jax.random.PRNGKey(int(c["seed"])) for c in cs]
    params0 = [jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64),
                                      g.model.init(k, scale=float(c["init_scale"])))
               for k, c in zip(keys, cs)]
    prob_b = _put(_stack([(p.X, p.y) for p in problems]), mesh)
    prob_b = Problem(prob_b[0], prob_b[1], g.model, problems[0].loss)
    host = (_stack(params0), _stack([p.init() for p in policies]), _stack(keys))
    S = init(prob_b, *_put(host, mesh))

    B = len(cs)
    rows: list[list[dict]] = [[] for _ in range(B)]
    done = np.zeros(B, bool)   # stopped and its last state recorded
    grad_norm = np.full(B, np.nan)

    def record(S):
        d, h, status = _get((diag(prob_b, S.params, S.t0.log_loss), engine_columns(S),
                             S.status))
        cols = {**{k: v for k, v in d.columns().items() if k not in _SCALAR_SKIP}, **h}
        for b in range(B):
            if done[b]:
                continue
            row = {k: v[b] for k, v in cols.items()}
            grad_norm[b] = d.grad_norm_log_loss[b]
            if not rows[b] or rows[b][-1]["step"] != row["step"]:
                rows[b].append(row)
            done[b] = status[b] != RUNNING

    start = time.perf_counter()
    record(S)
    steps, chunk = int(st["steps"]), int(st["chunk"])
    for target in record_grid(steps, int(st["n_records"]))[1:]:
        while True:
            step, status = _get((S.step, S.status))
            live = status == RUNNING
            if not np.any(live & (step < target)):
                break
            n = int(min(target - step[live].min(), chunk))
            S = advance(prob_b, S, jnp.asarray(n))
            progress(int(_get(S.step)[live].min()))
        record(S)
        if done.all():
            break
    wall = time.perf_counter() - start
    final = _get((S.status, S.t0_step, S.t0.log_loss, S.min_log_loss, S.bad_step, S.step,
                  S.log_loss, S.log_T))
    out = {}
    for b, i in enumerate(ids):
        code = int(final[0][b])
        status, message = outcome(
            problems[b], policies[b], code, step=int(final[5][b]), bad_step=int(final[4][b]),
            log_loss=float(final[6][b]), min_log_loss=float(final[3][b]),
            log_T=float(final[7][b]), grad_norm=float(grad_norm[b]), steps=steps,
            divergence_factor=float(st["divergence_factor"]))
        cols = {k: np.asarray([r[k] for r in rows[b]]) for k in rows[b][0]}
        meta = {"status": status, "message": message,
                "t0_step": int(final[1][b]) if final[1][b] >= 0 else None,
                "log_loss_t0": float(final[2][b]) if final[1][b] >= 0 else None,
                "stopped_at_step": int(final[4][b]) if code != RUNNING else None,
                "order": order, "batch_wall_s": wall, "batch_size": len(ids),
                "policy_config": policies[b].config}
        out[i] = (cols, meta)
    return out


def _run_flow_group(g: _Group, configs: list[dict], ids: list[int], mesh: Mesh,
                    progress: Callable[[int], None], size: int | None = None
                    ) -> dict[int, tuple[dict, dict]]:
    """Gradient flow for the configurations ``ids`` (one ``flow_batch`` call, vmapped over
    the initialization seeds, per data seed)."""
    st = g.static
    out = {}
    by_data: dict[int, list[int]] = {}
    for i in ids:
        by_data.setdefault(int(configs[i]["data_seed"]), []).append(i)
    for ds, batch in by_data.items():
        problem = g.problems[ds]
        params0 = _stack([g.model.init(jax.random.PRNGKey(int(configs[i]["seed"])),
                                       scale=float(configs[i]["init_scale"])) for i in batch])
        start = time.perf_counter()
        trajs = flow_batch(problem, params0, log_t_max=float(st["log_t_max"]),
                           n_saves=int(st["n_saves"]), h_max=float(st["h_max"]),
                           max_steps=int(st["max_steps"]))
        wall = time.perf_counter() - start
        for i, tr in zip(batch, trajs):
            cols = {k: v for k, v in tr.columns.items() if v.ndim == 1}
            status = tr.meta["status"]
            if (status == "completed" and cols["step"][-1] >= int(st["max_steps"])
                    and cols["log_T"][-1] < float(st["log_t_max"])):
                status = "max_steps"  # flow_batch stops at the step budget without saying so
            out[i] = (cols, {"status": status, "t0": tr.meta["t0"],
                             "phase1_steps": tr.meta["phase1"]["steps"],
                             "order": g.model.order, "batch_wall_s": wall,
                             "batch_size": len(batch)})
        progress(int(st["max_steps"]))
    return out


# ---------------------------------------------------------------------------------------
# the table


def _column(values: list) -> np.ndarray:
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, bool)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, np.int64)
    if all(v is None or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool))
           for v in values):
        return np.asarray([math.nan if v is None else float(v) for v in values], np.float64)
    return np.asarray([str(_name(v)) for v in values])


@dataclass
class SweepTable:
    """One row per configuration x recorded point: the configuration's columns (every grid
    key, plus ``config``, its index in the grid, ``order`` and ``status``) and the
    trajectory's scalar columns (``step, log_T, log_loss, rho, smoothed_margin, ...``)."""

    columns: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.columns["config"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def select(self, **equal) -> SweepTable:
        """Rows whose columns equal the given values, e.g. ``select(depth=2, loss="logistic")``."""
        keep = np.ones(len(self), bool)
        for k, v in equal.items():
            keep &= self.columns[k] == v
        return SweepTable({k: c[keep] for k, c in self.columns.items()}, self.meta)

    def runs(self) -> Iterator[tuple[dict, dict]]:
        """(configuration, columns) per configuration, in grid order."""
        configs = self.meta.get("configs", [])
        for cid in np.unique(self.columns["config"]):
            rows = self.columns["config"] == cid
            cfg = {"config": int(cid), **(configs[int(cid)] if int(cid) < len(configs) else {})}
            yield cfg, {k: c[rows] for k, c in self.columns.items()}

    def to_pandas(self):
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("SweepTable.to_pandas needs pandas: pip install pandas") from e
        return pd.DataFrame(self.columns)

    def save(self, directory) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        io.write_npz(d / "table.npz", **self.columns)
        names = list(self.columns)
        io.write_csv(d / "table.csv", names, [self.columns[k] for k in names])
        io.write_json(d / "sweep.json", self.meta, indent=1)
        return d

    @classmethod
    def load(cls, directory) -> SweepTable:
        d = Path(directory)
        advice = "rerun the sweep with the same --out: it rebuilds the table from configs/"
        meta = io.read_json(d / "sweep.json", advice)
        columns = io.read_npz(d / "table.npz", ("config", "status", "step"), advice)
        n = len(columns["config"])
        bad = {k: v.shape for k, v in columns.items() if v.ndim != 1 or len(v) != n}
        if bad:
            raise io.CorruptFileError(f"{d / 'table.npz'}: columns of unequal length ({n} "
                                      f"rows, but {bad}); {advice}")
        return cls(columns, meta)


_jsonable = io.jsonable


def _config_file(out: Path, i: int) -> Path:
    return out / "configs" / f"{i:06d}.npz"


def _save_config(out: Path, i: int, cols: dict, meta: dict, config: dict) -> None:
    """Configuration ``i``'s rows, with the configuration itself and its hash: a resume
    reuses the file only for the same configuration."""
    blob = json.dumps(io.jsonable({**meta, "config": config,
                                   "config_hash": io.config_hash(config)}))
    io.write_npz(_config_file(out, i), __meta__=np.asarray(blob), **cols)


def _load_config(out: Path, i: int, config: dict) -> tuple[dict, dict] | None:
    """Configuration ``i``'s saved rows, or None (with a warning) when the file is damaged
    or was computed for another configuration: then it is computed again."""
    import warnings

    path = _config_file(out, i)
    try:
        arrays = io.read_npz(path, ("__meta__", "step"))
        meta = json.loads(str(arrays.pop("__meta__")))
    except (io.CorruptFileError, ValueError) as e:
        warnings.warn(f"configuration {i}: {e}; computing it again", stacklevel=3)
        return None
    want = io.config_hash(config)
    if meta.get("config_hash") != want or meta.get("config") != io.jsonable(config):
        warnings.warn(f"{path} was computed for another configuration (hash "
                      f"{meta.get('config_hash')}, this one {want}); computing it again",
                      stacklevel=3)
        return None
    return arrays, meta


def _manifest(out: Path, configs: list[dict]) -> None:
    spec = io.jsonable(configs)
    path = out / "manifest.json"
    if path.exists():
        old = io.read_json(path, "delete the directory's manifest.json (its configs/ "
                                 "files are checked one by one) or use a new --out")
        if old.get("configs") != spec:
            raise ValueError(f"{out} holds a different sweep ({len(old.get('configs', []))} "
                             f"configurations); use a new output directory or --overwrite")
        return
    (out / "configs").mkdir(parents=True, exist_ok=True)
    io.write_json(path, {"configs": spec, "hashes": [io.config_hash(c) for c in configs]},
                  indent=1)


def _assemble(configs: list[dict], results: dict, meta: dict) -> SweepTable:
    """The table of the configurations in ``results`` (all of them, unless interrupted)."""
    parts, statuses = [], []
    for i, c in enumerate(configs):
        if i not in results:
            continue
        cols, m = results[i]
        n = len(next(iter(cols.values())))
        statuses.append(m["status"])
        parts.append((i, c, cols, m, n))
    if not parts:   # interrupted before any configuration finished
        return SweepTable({"config": np.zeros(0, np.int64), "status": np.zeros(0, str),
                           "step": np.zeros(0, np.int64)},
                          {**meta, "configs": _jsonable(configs), "statuses": [],
                           "config_meta": []})
    traj_keys = [k for k in parts[0][2]]
    for _, _, cols, _, _ in parts[1:]:
        traj_keys += [k for k in cols if k not in traj_keys]
    columns: dict[str, np.ndarray] = {"config": np.concatenate(
        [np.full(n, i, np.int64) for i, _, _, _, n in parts])}
    for k in DEFAULTS:
        columns[k] = np.repeat(_column([c[k] for _, c, _, _, _ in parts]),
                               [n for *_, n in parts])
    columns["order"] = np.concatenate([np.full(n, float(m["order"])) for *_, m, n in parts])
    columns["status"] = np.concatenate([np.full(n, m["status"]) for *_, m, n in parts])
    for k in traj_keys:
        columns[k] = np.concatenate([
            np.asarray(cols[k], np.float64) if k in cols else np.full(n, np.nan)
            for _, _, cols, _, n in parts])
    meta = {**meta, "configs": _jsonable(configs), "statuses": statuses,
            "config_meta": [_jsonable(results[i][1]) for i in sorted(results)]}
    return SweepTable(columns, meta)


# ---------------------------------------------------------------------------------------


def _show_step(bar, n_configs: int, step: int) -> None:
    bar.set_postfix(step=step, configs=n_configs)


def sweep(grid: dict, *, out=None, devices=None, max_batch: int = 4096,
          progress: bool = True, on_config: Callable[[int], None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> SweepTable:
    """Run every configuration of ``grid`` (see ``DEFAULTS`` for the keys) and return the
    tidy table.

    Configurations that share a model shape run as one jitted, vmapped program (at most
    ``max_batch`` at a time), sharded along the configuration axis over ``devices``
    (default: all of ``jax.devices()``). With ``out`` the finished configurations are
    written one file each (with the configuration and its hash) and a repeated call
    computes only the missing ones -- a file that is damaged or belongs to another
    configuration is computed again, with a warning; the table is written to
    ``out/table.npz``, ``table.csv`` and ``sweep.json``. While it computes, ``out`` is
    locked (``io.DirectoryLock``): a second sweep on the same directory is refused.
    ``on_config(i)`` is called after configuration ``i`` is finished (and written); an
    exception raised there stops the sweep with everything finished so far kept.
    ``should_stop()`` is polled after every batch: when it returns True the sweep stops
    there and returns (and writes) the table of the finished configurations with
    ``meta["status"] = "interrupted"`` and ``meta["missing"]``.

    Bad input raises before any compute: an empty grid or axis, unknown keys or names, a
    non-positive step size or policy parameter, a model whose declared order the
    homogeneity check refutes (``HomogeneityError``, naming the depth).
    """
    configs = expand(grid)
    groups = plan(configs)
    mesh = _mesh(devices)
    out = Path(out) if out is not None else None
    writer = out is not None and jax.process_index() == 0
    lock = io.DirectoryLock(out) if writer else contextlib.nullcontext()
    if writer:
        out.mkdir(parents=True, exist_ok=True)
    with lock:
        return _sweep(configs, groups, mesh, out, writer, max_batch, progress, on_config,
                      should_stop)


def _sweep(configs, groups, mesh, out, writer, max_batch, progress, on_config, should_stop):
    results: dict[int, tuple[dict, dict]] = {}
    if out is not None:
        if writer:
            _manifest(out, configs)
        # every process reuses what process 0 finds valid (a file that is damaged or of
        # another configuration is computed again), so all run the same batches
        loaded = {i: _load_config(out, i, configs[i]) for i in range(len(configs))
                  if _config_file(out, i).exists()}
        finished = _from_process_0(np.asarray([loaded.get(i) is not None
                                               for i in range(len(configs))]))
        for i in np.flatnonzero(finished):
            if loaded.get(int(i)) is None:
                raise RuntimeError(f"process {jax.process_index()} cannot read "
                                   f"{_config_file(out, int(i))}, which process 0 reuses: "
                                   f"do all processes see the same directory?")
            results[int(i)] = loaded[int(i)]
    reused = sorted(results)
    todo = [(g, [i for i in g.ids if i not in results]) for g in groups]
    todo = [(g, ids) for g, ids in todo if ids]
    bar = tqdm(total=len(configs), initial=len(reused), disable=not progress, unit="config",
               leave=False, mininterval=0.5)
    start = time.perf_counter()
    computed = []
    stopped = False
    try:
        for gi, (g, ids) in enumerate(todo):
            run = _run_descent_group if g.static["engine"] == "descent" else _run_flow_group
            for lo in range(0, len(ids), max_batch):
                batch = ids[lo:lo + max_batch]
                label = (f"group {gi + 1}/{len(todo)}: {_name(g.static['model'])} depth "
                         f"{g.static['depth']} {g.static['loss']} {g.static['engine']}")
                bar.set_description(label)
                show = functools.partial(_show_step, bar, len(batch))
                done = run(g, configs, batch, mesh, show, size=min(max_batch, len(g.ids)))
                for i in batch:
                    results[i] = done[i]
                    computed.append(i)
                    if writer:
                        _save_config(out, i, *done[i], configs[i])
                    bar.update(1)
                    if on_config is not None:
                        on_config(i)
                if should_stop is not None and should_stop():
                    stopped = True
                    break
            if stopped:
                break
    finally:
        bar.close()
    meta = {"status": "interrupted" if stopped else "completed",
            "n_configs": len(configs), "computed": computed, "reused": reused,
            "missing": [i for i in range(len(configs)) if i not in results],
            "wall_time_s": time.perf_counter() - start, "devices": mesh.size,
            "device_kind": jax.devices()[0].device_kind, "processes": jax.process_count(),
            "vmapped": list(VMAPPED), "versions": package_versions()}
    table = _assemble(configs, results, meta)
    if writer:
        table.save(out)
        write_sweep_report(table, out)   # status.md (per configuration) and rates.png
    return table
