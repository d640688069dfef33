"""PNG plots of a Trajectory (matplotlib ``Figure`` objects: no pyplot state, no backend
switch, so calling them from a notebook leaves its inline figures alone)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .trajectory import Trajectory


def _axes():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), constrained_layout=True)
    ax = fig.subplots()
    # log T spans decades (and is negative while T < 1): symlog shows every phase
    ax.set_xscale("symlog", linthresh=1.0)
    return fig, ax


def plot_trajectory(traj: Trajectory, directory) -> list[Path]:
    """Write loss.png, margins.png, rho.png and beta.png; return their paths."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    c = traj.columns
    ok = np.isfinite(c["log_T"])
    x = c["log_T"][ok]
    sep = c["separated"][ok].astype(bool)
    m = traj.meta
    title = f"{m.get('model', '')}, {m.get('loss', '')} loss, {m.get('engine', '')}"
    paths = []

    fig, ax = _axes()
    ax.plot(x, c["log_loss"][ok] / math.log(10), ".-", ms=3)
    ax.set(xlabel="log T  (T = sum of step sizes)", ylabel="log10 L", title=title)
    paths.append(d / "loss.png"); fig.savefig(paths[-1], dpi=110)

    fig, ax = _axes()
    for name, label in (("normalized_margin", r"$\bar\gamma$ = q_min / $\rho^L$"),
                        ("smoothed_margin", r"$\tilde\gamma$ = $\ell^{-1}$(L) / $\rho^L$"),
                        ("descent_margin", r"$\hat\gamma$ (App. E.2)")):
        y = c[name][ok]
        if np.any(np.isfinite(y[sep])):
            ax.plot(x[sep], y[sep], ".-", ms=3, label=label)
    ax.set(xlabel="log T", ylabel="margin", title="normalized margins after t0")
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "never separated: no margins to show", ha="center",
                transform=ax.transAxes)
    paths.append(d / "margins.png"); fig.savefig(paths[-1], dpi=110)

    fig, ax = _axes()
    ax.plot(x, c["log_rho"][ok], ".-", ms=3)
    ax.set(xlabel="log T", ylabel=r"log $\rho$ = log ||$\theta$||", title=title)
    paths.append(d / "rho.png"); fig.savefig(paths[-1], dpi=110)

    fig, ax = _axes()
    one_minus = np.clip(1.0 - c["beta"][ok], 1e-300, None)
    ax.semilogy(x, one_minus, ".-", ms=3)
    ax.set(xlabel="log T", ylabel=r"1 - $\beta$,  $\beta$ = cos($\theta$, -$\nabla$L)",
           title="alignment of parameters and negative gradient")
    paths.append(d / "beta.png"); fig.savefig(paths[-1], dpi=110)
    return paths
