"""Trajectory: one columnar record of a run plus parameter snapshots (DESIGN §5)."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import io

# scalar columns in the order tables and CSV files show them
COLUMNS = (
    "step", "attempts", "log_T", "log_lr", "log_loss", "rho", "log_rho", "q_min",
    "normalized_margin", "layer_normalized_margin", "smoothed_margin",
    "layer_smoothed_margin", "descent_margin", "beta", "nu_over_loss", "n_support",
    "separated",
)
REQUIRED = ("step", "log_T", "log_loss")   # what every engine records, and load checks
_LOAD_ADVICE = ("rerun into a fresh directory (or with --overwrite); a run directory is "
                "meta.json, columns.npz, snapshots.npz and summary.json as homoflow wrote them")


def package_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("homoflow", "jax", "jaxlib", "optax", "diffrax", "equinox", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["jax_backend"] = jax.default_backend()
    return out


def _flatten_with_names(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _unflatten_from_names(arrays: dict[str, np.ndarray]):
    """Rebuild nested tuples / dicts from keystr paths like ``[0]['w']``."""
    import ast
    import re

    root: dict = {}
    for name, value in arrays.items():
        keys = [ast.literal_eval(k) for k in re.findall(r"\[([^\]]+)\]", name)]
        node = root
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value

    def build(node):
        if not isinstance(node, dict):
            return node
        if all(isinstance(k, int) for k in node):
            return tuple(build(node[k]) for k in sorted(node))
        return {k: build(v) for k, v in node.items()}

    return build(root)


@dataclass
class Trajectory:
    """Columns (1-D arrays over recorded points, ``rho_layers`` and ``margins`` 2-D),
    parameter snapshots stacked along a leading axis, and the run's metadata.

    ``meta`` holds: engine, status ("completed", "not_separated", "interrupted", or why it
    stopped), message, t0_step / log_loss_t0 (None if never separated), config, seed,
    versions. ``state`` is the engine's loop state at the last row (descent: its
    ``DescentState``, or after ``load`` its leaves), saved as ``state.npz`` so that
    ``descent(..., resume=traj)`` continues the run bit for bit.
    """

    columns: dict[str, np.ndarray]
    snapshots: Any = None
    meta: dict = field(default_factory=dict)
    state: Any = None

    @classmethod
    def from_rows(cls, rows: list[dict], snaps: list, meta: dict) -> "Trajectory":
        """Stack per-record dicts of values and per-record parameter pytrees."""
        columns = {k: np.stack([np.asarray(r[k]) for r in rows]) for k in rows[0]}
        snapshots = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *snaps) if snaps else None
        return cls(columns, snapshots, meta)

    def __len__(self) -> int:
        return len(self.columns["step"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def status(self) -> str:
        return self.meta.get("status", "unknown")

    def last(self) -> dict:
        return {k: (v[-1] if v.ndim == 1 else v[-1].tolist()) for k, v in self.columns.items()
                if len(v)}

    def count_decreases(self, name: str, rtol: float = 1e-10) -> int:
        """Times ``name`` decreased by more than rtol (relative) between recorded points
        after t0; used for the monotonicity reports of gamma_tilde and gamma_hat."""
        v = self.columns[name]
        after = self.columns["separated"].astype(bool) & np.isfinite(v)
        v = v[after]
        if len(v) < 2:
            return 0
        return int(np.sum(v[1:] < v[:-1] - rtol * np.abs(v[:-1])))

    def summary(self) -> dict:
        last = self.last() if len(self) else {}
        out = {
            "engine": self.meta.get("engine"),
            "status": self.status,
            "message": self.meta.get("message", ""),
            "steps": int(last.get("step", 0)),
            "t0_step": self.meta.get("t0_step"),  # descent: the iteration of t0
            "t0_time": self.meta.get("t0"),       # flow: the time t0
            "log_T": float(last.get("log_T", math.nan)),
            "log10_loss": float(last.get("log_loss", math.nan)) / math.log(10),
            "rho": float(last.get("rho", math.nan)),
            "separated": bool(last.get("separated", False)),
            "wall_time_s": self.meta.get("wall_time_s"),
        }
        if out["separated"]:
            out.update({
                "normalized_margin": float(last["normalized_margin"]),
                "smoothed_margin": float(last["smoothed_margin"]),
                "descent_margin": float(last["descent_margin"]),
                "one_minus_beta": float(1.0 - last["beta"]),
                "n_support": int(last["n_support"]),
                "smoothed_margin_decreases": self.count_decreases("smoothed_margin"),
                "descent_margin_decreases": self.count_decreases("descent_margin"),
            })
        return out

    def to_pandas(self):
        """The scalar columns as a pandas DataFrame (needs pandas installed)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("Trajectory.to_pandas needs pandas: pip install pandas") from e
        return pd.DataFrame({k: v for k, v in self.columns.items() if v.ndim == 1})

    def rows(self) -> list[dict]:
        """The recorded points as per-record dicts (``from_rows``'s input)."""
        return [{k: v[i] for k, v in self.columns.items()} for i in range(len(self))]

    def snapshot_list(self) -> list:
        """The parameter snapshots as one pytree per recorded point."""
        if self.snapshots is None:
            return []
        n = len(jax.tree_util.tree_leaves(self.snapshots)[0])
        return [jax.tree_util.tree_map(lambda x: x[i], self.snapshots) for i in range(n)]

    def save(self, directory) -> Path:
        """Write the run directory; every file atomically, ``meta.json`` last (a directory
        with a readable meta.json holds a whole run)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        io.write_npz(d / "columns.npz", **self.columns)
        if self.snapshots is not None:
            io.write_npz(d / "snapshots.npz", **_flatten_with_names(self.snapshots))
        if self.state is not None:
            io.write_npz(d / "state.npz", **_state_arrays(self.state))
        else:
            (d / "state.npz").unlink(missing_ok=True)
        scalar = [k for k in self.columns if self.columns[k].ndim == 1]
        io.write_csv(d / "trajectory.csv", scalar,   # booleans as 0/1: every column numeric
                     [self.columns[k].astype(np.int64) if self.columns[k].dtype == bool
                      else self.columns[k] for k in scalar])
        io.write_json(d / "summary.json", self.summary())
        io.write_json(d / "meta.json", self.meta)
        return d

    @classmethod
    def load(cls, directory) -> "Trajectory":
        """Read a run directory back, checking each file: a missing, truncated or
        incomplete file raises ``io.CorruptFileError`` naming it."""
        d = Path(directory)
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: no such run directory")
        meta = io.read_json(d / "meta.json", _LOAD_ADVICE)
        if not isinstance(meta, dict) or "engine" not in meta or "status" not in meta:
            raise io.CorruptFileError(f"{d / 'meta.json'}: not a run's metadata (no 'engine' "
                                      f"and 'status'); {_LOAD_ADVICE}")
        columns = io.read_npz(d / "columns.npz", REQUIRED, _LOAD_ADVICE)
        n = len(columns["step"])
        short = {k: len(v) for k, v in columns.items() if v.ndim == 0 or len(v) != n}
        if short:
            raise io.CorruptFileError(f"{d / 'columns.npz'}: columns of unequal length ({n} "
                                      f"steps, but {short}); {_LOAD_ADVICE}")
        snapshots = None
        if (d / "snapshots.npz").exists():
            arrays = io.read_npz(d / "snapshots.npz", advice=_LOAD_ADVICE)
            bad = {k: v.shape for k, v in arrays.items() if v.ndim == 0 or len(v) != n}
            if bad:
                raise io.CorruptFileError(f"{d / 'snapshots.npz'}: snapshots do not match "
                                          f"the {n} recorded points ({bad}); {_LOAD_ADVICE}")
            snapshots = _unflatten_from_names(arrays)
        state = None
        if (d / "state.npz").exists():
            arrays = io.read_npz(d / "state.npz", advice=_LOAD_ADVICE)
            state = [arrays[f"leaf_{i:04d}"] for i in range(len(arrays))
                     if f"leaf_{i:04d}" in arrays]
            if len(state) != len(arrays):
                raise io.CorruptFileError(f"{d / 'state.npz'}: leaves are not numbered "
                                          f"leaf_0000.. ({sorted(arrays)[:5]}); {_LOAD_ADVICE}")
        return cls(columns, snapshots, meta, state)


class RunStopped(RuntimeError):
    """A run stopped early. ``trajectory`` holds every point recorded up to the stop,
    including the last good state; ``step`` is the iteration at which it stopped."""

    def __init__(self, message: str, trajectory: "Trajectory", step: int, reason: str):
        super().__init__(message)
        self.trajectory, self.step, self.reason = trajectory, step, reason


def _state_arrays(state) -> dict[str, np.ndarray]:
    """An engine state's leaves as ``leaf_0000, leaf_0001, ...`` (typed PRNG keys as their
    key data); the engine rebuilds the structure from its own initial state."""
    def raw(x):
        if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)

    leaves = state if isinstance(state, list) else jax.tree_util.tree_leaves(state)
    return {f"leaf_{i:04d}": raw(x) for i, x in enumerate(leaves)}
