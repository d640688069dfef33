"""Predicted rates and checks against recorded trajectories.

Theorem 4.3 (Corollary A.11 for gradient flow with the exponential or logistic loss,
Theorem E.5 for gradient descent under (S5)):

    L(T) = Theta(1 / (T (log T)^{2 - 2/L}))      and      rho(T) = Theta((log T)^{1/L}),

with T = t for the flow and T = sum eta for descent. So the *rate ratios*
L(T) T (log T)^{2-2/L} and rho / (log T)^{1/L} stay between two constants, and
log(1/L) - log T = (2 - 2/L) log log T + O(1): the slope of log(1/L) - log T against
log log T estimates the exponent 2 - 2/L (equivalently, log(L T) has slope -(2 - 2/L)).

Everything here takes arrays (or any mapping with the columns ``log_T``, ``log_loss``,
``log_rho``, ``separated``: a ``Trajectory``, a dict, a pandas frame, one run of a
``SweepTable``) and works in logs, so T = e^(10^8) is no harder than T = 10.
Monotonicity (Theorems A.7 and E.2): gamma_tilde never decreases along the flow after t0,
gamma_hat never decreases along descent after t0 under (S5); ``monotonicity_audit`` lists
every violation.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

LN10 = math.log(10.0)


def loss_exponent(L: float) -> float:
    """2 - 2/L, the power of log T in the loss rate (Theorem 4.3)."""
    if not L > 0:
        raise ValueError(f"the order L must be > 0, got {L}")
    return 2.0 - 2.0 / L


def _arr(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def log_loss_ratio(log_T, log_loss, L: float) -> np.ndarray:
    """log of L(T) T (log T)^{2-2/L}; NaN where log T <= 0 (the rate is asymptotic)."""
    log_T, log_loss = _arr(log_T), _arr(log_loss)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(log_T > 0, log_loss + log_T + loss_exponent(L) * np.log(log_T), np.nan)


def loss_ratio(log_T, log_loss, L: float) -> np.ndarray:
    """L(T) T (log T)^{2-2/L} (Corollary A.11 / Theorem E.5): Theta(1) if the theory holds."""
    return np.exp(log_loss_ratio(log_T, log_loss, L))


def norm_ratio(log_T, log_rho, L: float) -> np.ndarray:
    """rho / (log T)^{1/L}: Theta(1) if the theory holds."""
    log_T, log_rho = _arr(log_T), _arr(log_rho)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(log_T > 0, np.exp(log_rho - np.log(log_T) / L), np.nan)


def limit_loss_ratio(gamma: float, L: float) -> float:
    """The limit of L(T) T (log T)^{2-2/L} for the exponential loss (and the logistic,
    whose tail is the same) when the normalized margin tends to ``gamma``: 1/(L^2 gamma^{2/L}).

    Why: past t0, d log(1/L)/dt = |grad L|^2 / L, and with beta -> 1 and the loss carried
    by the support points (nu -> L q_min, q_min ~ u = log(1/L), rho^L ~ u / gamma) this is
    L^2 gamma^{2/L} e^{-u} u^{2-2/L}; integrating, e^u u^{-(2-2/L)} ~ L^2 gamma^{2/L} t. The
    corrections are relative O(log N / log T) and O(log log T / log T), so a run approaches
    the line slowly. For descent T = sum eta plays the role of t."""
    if not (gamma > 0 and L > 0):
        raise ValueError(f"need gamma > 0 and L > 0, got gamma = {gamma}, L = {L}")
    return 1.0 / (L * L * gamma ** (2.0 / L))


def limit_norm_ratio(gamma: float, L: float) -> float:
    """The limit of rho / (log T)^{1/L}: gamma^{-1/L} (rho^L gamma ~ log(1/L) ~ log T)."""
    if not (gamma > 0 and L > 0):
        raise ValueError(f"need gamma > 0 and L > 0, got gamma = {gamma}, L = {L}")
    return gamma ** (-1.0 / L)


def window(log_T, *, decades: float | None = None, log_T_min: float | None = 1.0,
           separated=None, of: str = "T") -> np.ndarray:
    """Mask of the points used for a rate: finite log T, past t0 where ``separated`` is
    given, log T >= ``log_T_min`` (default 1: the rates are asymptotic, and near T = 1
    the factor (log T)^{2-2/L} vanishes), and — with ``decades`` — within the last ``decades``
    decades of T recorded (log10 T >= max log10 T - decades), or of log T with
    ``of="log T"`` (for the flow, whose saves are log-spaced in log t and reach log t =
    10^8: its last decades of T are a sliver of the run)."""
    if of not in ("T", "log T"):
        raise ValueError(f"of must be 'T' or 'log T', got {of!r}")
    log_T = _arr(log_T)
    keep = np.isfinite(log_T) & (log_T > 0)
    if separated is not None:
        keep &= np.asarray(separated, bool)
    if log_T_min is not None:
        keep &= log_T >= log_T_min
    if decades is not None and keep.any():
        if of == "T":
            keep &= log_T >= log_T[keep].max() - decades * LN10
        else:
            keep &= log_T >= log_T[keep].max() * 10.0 ** (-decades)
    return keep


def spread(values, mask=None) -> float:
    """max / min of positive ``values`` over ``mask`` (NaN if fewer than two points)."""
    v = _arr(values)
    v = v[mask] if mask is not None else v
    v = v[np.isfinite(v)]
    if len(v) < 2:
        return math.nan
    return float(v.max() / v.min())


def fitted_exponent(log_T, log_loss, mask=None) -> dict:
    """Least-squares slope of log(1/L) - log T against log log T (predicted 2 - 2/L;
    the slope of log(L T) is its negative), with its standard error and the number of
    points used."""
    log_T, log_loss = _arr(log_T), _arr(log_loss)
    keep = np.isfinite(log_T) & (log_T > 0) & np.isfinite(log_loss)
    if mask is not None:
        keep &= np.asarray(mask, bool)
    x = np.log(log_T[keep])
    y = -log_loss[keep] - log_T[keep]
    if len(x) < 3 or np.ptp(x) == 0:
        return {"exponent": math.nan, "stderr": math.nan, "n": len(x),
                "log_log_T_range": (math.nan, math.nan)}
    A = np.column_stack([x, np.ones_like(x)])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    dof = max(len(x) - 2, 1)
    se = math.sqrt(float(resid @ resid) / dof / float(np.sum((x - x.mean()) ** 2)))
    return {"exponent": float(coef[0]), "stderr": se, "n": len(x),
            "log_log_T_range": (float(x.min()), float(x.max()))}


def monotonicity_audit(columns: Any, name: str, rtol: float = 1e-10) -> list[dict]:
    """Every decrease of ``name`` by more than ``rtol`` (relative) between consecutive
    recorded points past t0 (``separated`` and finite): index, step, log_T, the value
    before and after, and the relative drop. An empty list means monotone."""
    v = _arr(columns[name])
    keep = np.isfinite(v)
    sep = _optional(columns, "separated")
    if sep is not None:
        keep &= np.asarray(sep, bool)
    idx = np.flatnonzero(keep)
    out = []
    for a, b in itertools.pairwise(idx):
        if v[b] < v[a] - rtol * abs(v[a]):
            out.append({"index": int(b), "step": _item(columns, "step", b),
                        "log_T": _item(columns, "log_T", b), "before": float(v[a]),
                        "after": float(v[b]), "relative_drop": float((v[a] - v[b]) / abs(v[a]))})
    return out


def _optional(columns, key):
    """columns[key], or None where there is no such column (dicts, frames, Trajectory)."""
    try:
        return columns[key]
    except (KeyError, IndexError):
        return None


def _item(columns, key, i):
    col = _optional(columns, key)
    return None if col is None else float(np.asarray(col)[i])


def audit_margin(columns: Any, engine: str, rtol: float = 1e-10) -> list[dict]:
    """The monotonicity the theory promises for the engine: gamma_tilde (smoothed_margin)
    along the flow (Theorem A.7), gamma_hat (descent_margin) along descent (Theorem E.2)."""
    name = "smoothed_margin" if engine.startswith("flow") else "descent_margin"
    return monotonicity_audit(columns, name, rtol)


def rate_check(columns: Any, L: float, *, decades: float = 6.0, of: str = "T",
               fit_log_T_min: float | None = None) -> dict:
    """Theorem 4.3 against one run: the loss and norm ratios over the last ``decades``
    decades of T recorded (their spread max/min) and over all points past t0, the decades
    of T (or of log T, ``of="log T"``) recorded past t0, and the fitted exponent against
    2 - 2/L.

    The fit uses the points past t0 with log T >= ``fit_log_T_min``, by default the upper
    half of the recorded range of log log T (log T >= sqrt(max log T)): the exponent is an
    asymptotic statement and its O(1/log T) corrections bias a fit that starts early."""
    log_T, log_loss = _arr(columns["log_T"]), _arr(columns["log_loss"])
    sep = _optional(columns, "separated")
    after = window(log_T, separated=sep)
    if fit_log_T_min is None and after.any():
        fit_log_T_min = math.sqrt(max(log_T[after].max(), 1.0))
    last = window(log_T, decades=decades, separated=sep, of=of)
    ratio = loss_ratio(log_T, log_loss, L)
    nratio = norm_ratio(log_T, columns["log_rho"], L)
    fit = fitted_exponent(log_T, log_loss, window(log_T, separated=sep, log_T_min=fit_log_T_min))
    decades_recorded = (float((log_T[after].max() - log_T[after].min()) / LN10)
                        if after.sum() > 1 else 0.0)
    return {
        "order": L, "predicted_exponent": loss_exponent(L),
        "fitted_exponent": fit["exponent"], "fit_stderr": fit["stderr"], "fit_points": fit["n"],
        "fit_log_T_min": fit_log_T_min,
        "exponent_error": fit["exponent"] - loss_exponent(L),
        "decades_recorded": decades_recorded,
        "log10_T_max": float(log_T[after].max() / LN10) if after.any() else math.nan,
        "ratio_spread_last": spread(ratio, last), "ratio_spread_all": spread(ratio, after),
        "ratio_last": float(ratio[last][-1]) if last.any() else math.nan,
        "norm_ratio_spread_last": spread(nratio, last),
        "norm_ratio_spread_all": spread(nratio, after),
        "window_decades": decades, "window_of": of,
        "window_points": int(last.sum()),
    }
