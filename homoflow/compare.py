"""Comparisons between trajectories: a descent run against a flow run at equal time."""

from __future__ import annotations

import jax
import numpy as np

from .kkt import angle
from .trajectory import Trajectory


def align(descent_traj: Trajectory, flow_traj: Trajectory) -> dict:
    """Compare a descent run and a flow run at equal T = sum eta (descent) = t (flow).

    For every descent record whose log T lies in the flow's saved range, the flow's
    parameters at that T are those of a saved point with the same log T (to 1e-9), or
    else interpolated linearly in log t between the two neighbouring saved points.
    Returns arrays: log_T, param_distance ||theta_GD - theta_flow||, angle (radians,
    between directions) and margin_gap (gamma_bar_GD - gamma_bar_flow).
    """
    if descent_traj.snapshots is None or flow_traj.snapshots is None:
        raise ValueError("align needs both trajectories recorded with snapshots=True")
    flat_d = np.stack([np.concatenate([np.ravel(a[i]) for a in jax.tree_util.tree_leaves(
        descent_traj.snapshots)]) for i in range(len(descent_traj))])
    flat_f = np.stack([np.concatenate([np.ravel(a[i]) for a in jax.tree_util.tree_leaves(
        flow_traj.snapshots)]) for i in range(len(flow_traj))])
    ld, lf = descent_traj["log_T"], flow_traj["log_T"]
    keep = np.isfinite(lf)
    lf, flat_f, gf = lf[keep], flat_f[keep], flow_traj["normalized_margin"][keep]
    out = {"log_T": [], "param_distance": [], "angle": [], "margin_gap": []}
    for i, t in enumerate(ld):
        if not (np.isfinite(t) and lf[0] <= t <= lf[-1]):
            continue
        j = int(np.searchsorted(lf, t))
        if abs(lf[j] - t) <= 1e-9 * max(1.0, abs(t)):
            theta, gamma = flat_f[j], gf[j]
        else:
            a = (t - lf[j - 1]) / (lf[j] - lf[j - 1])
            theta = (1 - a) * flat_f[j - 1] + a * flat_f[j]
            gamma = (1 - a) * gf[j - 1] + a * gf[j]
        out["log_T"].append(t)
        out["param_distance"].append(np.linalg.norm(flat_d[i] - theta))
        out["angle"].append(angle(flat_d[i], theta))  # accurate near 0, unlike arccos(cos)
        out["margin_gap"].append(descent_traj["normalized_margin"][i] - gamma)
    return {k: np.asarray(v) for k, v in out.items()}
