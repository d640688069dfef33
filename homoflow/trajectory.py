"""Trajectory: one columnar record of a run plus parameter snapshots (DESIGN §5)."""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np

# scalar columns in the order tables and CSV files show them
COLUMNS = (
    "step", "attempts", "log_T", "log_lr", "log_loss", "rho", "log_rho", "q_min",
    "normalized_margin", "layer_normalized_margin", "smoothed_margin",
    "layer_smoothed_margin", "descent_margin", "beta", "nu_over_loss", "n_support",
    "separated",
)


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

    ``meta`` holds: engine, status ("completed", "not_separated", or why it stopped),
    message, t0_step / log_loss_t0 (None if never separated), config, seed, versions.
    """

    columns: dict[str, np.ndarray]
    snapshots: Any = None
    meta: dict = field(default_factory=dict)

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

    def save(self, directory) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        np.savez(d / "columns.npz", **self.columns)
        if self.snapshots is not None:
            np.savez(d / "snapshots.npz", **_flatten_with_names(self.snapshots))
        with open(d / "meta.json", "w") as fh:
            json.dump(_jsonable(self.meta), fh, indent=2)
        with open(d / "summary.json", "w") as fh:
            json.dump(_jsonable(self.summary()), fh, indent=2)
        scalar = [k for k in self.columns if self.columns[k].ndim == 1]
        np.savetxt(d / "trajectory.csv", np.column_stack([self.columns[k] for k in scalar]),
                   delimiter=",", header=",".join(scalar), comments="")
        return d

    @classmethod
    def load(cls, directory) -> "Trajectory":
        d = Path(directory)
        with np.load(d / "columns.npz") as f:
            columns = {k: f[k] for k in f.files}
        snapshots = None
        if (d / "snapshots.npz").exists():
            with np.load(d / "snapshots.npz") as f:
                snapshots = _unflatten_from_names({k: f[k] for k in f.files})
        with open(d / "meta.json") as fh:
            meta = json.load(fh)
        return cls(columns, snapshots, meta)


class RunStopped(RuntimeError):
    """A run stopped early. ``trajectory`` holds every point recorded up to the stop,
    including the last good state; ``step`` is the iteration at which it stopped."""

    def __init__(self, message: str, trajectory: "Trajectory", step: int, reason: str):
        super().__init__(message)
        self.trajectory, self.step, self.reason = trajectory, step, reason


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return repr(obj)
