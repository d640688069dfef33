"""``homoflow report DIR...``: compare recorded runs and sweeps.

A run directory (``homoflow run``: ``meta.json`` + ``columns.npz``) becomes one row of a
table (status, how far it went, its margins, 1 − β, the KKT residual, the fitted loss
exponent against 2 − 2/L) and one colour of an overlaid six-panel figure
(``plots.compare_figure``). A sweep directory (``homoflow sweep``: ``table.npz``) gets its
per-configuration status table (``status_table``) and its rate figure
(``plots.rate_figure``); the sweep itself writes both at its end (``write_sweep_report``).
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

import numpy as np

from . import io, theory

LN10 = math.log(10.0)

RUN_COLUMNS = ("run", "engine", "L", "status", "points", "log T", "log10 L", "gamma_bar",
               "gamma_tilde", "gamma_hat", "1 - beta", "kkt eps", "exponent", "2 - 2/L")


def _last(cols, name, mask=None) -> float:
    if name not in cols:
        return math.nan
    v = np.asarray(cols[name], np.float64)
    if mask is not None:
        v = v[mask]
    v = v[np.isfinite(v)]
    return float(v[-1]) if v.size else math.nan


def run_row(traj, name: str) -> dict:
    """One run's line of the comparison table (values at its last recorded point past
    t0; the fitted exponent of ``theory.rate_check`` with its standard error)."""
    c, m = traj.columns, traj.meta
    sep = np.asarray(c["separated"], bool) if "separated" in c else np.ones(len(c["step"]), bool)
    L = m.get("order")
    fit = theory.rate_check(c, float(L)) if L and sep.sum() >= 3 else None
    exponent = (f"{fit['fitted_exponent']:.3f} ± {fit['fit_stderr']:.2g}"
                if fit and np.isfinite(fit["fitted_exponent"]) else "–")
    return {
        "run": name, "engine": m.get("engine", "?"),
        "L": f"{float(L):g}" if L else "?", "status": m.get("status", "unknown"),
        "points": len(c["step"]),
        "log T": _fmt(_last(c, "log_T")),
        "log10 L": _fmt(_last(c, "log_loss") / LN10),
        "gamma_bar": _fmt(_last(c, "normalized_margin", sep), 8),
        "gamma_tilde": _fmt(_last(c, "smoothed_margin", sep), 8),
        "gamma_hat": _fmt(_last(c, "descent_margin", sep), 8),
        "1 - beta": _fmt(1.0 - _last(c, "beta", sep), 3),
        "kkt eps": _fmt(_last(c, "kkt_eps", sep), 3),
        "exponent": exponent,
        "2 - 2/L": f"{theory.loss_exponent(float(L)):.3f}" if L else "?",
    }


def _fmt(v: float, digits: int = 4) -> str:
    return "–" if not np.isfinite(v) else f"{v:.{digits}g}"


def markdown(rows: list[dict], columns=None) -> str:
    """Rows of equal keys as a markdown table."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(r[k]) for k in columns) + " |" for r in rows]
    return "\n".join(out)


def status_rows(table) -> list[dict]:
    """One row per configuration of a ``SweepTable``: the grid keys that vary across the
    sweep, its status, last iteration, log T, γ̄ and the fitted exponent vs 2 − 2/L."""
    configs = table.meta.get("configs", [])
    varying = [k for k in (configs[0] if configs else {})
               if len({repr(c.get(k)) for c in configs}) > 1]
    rows = []
    for cfg, cols in table.runs():
        L = float(cols["order"][0])
        sep = np.asarray(cols["separated"], bool) if "separated" in cols else None
        fit = theory.rate_check(cols, L) if sep is None or sep.sum() >= 3 else None
        row = {"config": cfg["config"]}
        row.update({k: cfg.get(k) for k in varying})
        row.update({
            "status": str(cols["status"][0]), "L": f"{L:g}",
            "step": int(np.asarray(cols["step"])[-1]),
            "log T": _fmt(_last(cols, "log_T")),
            "gamma_bar": _fmt(_last(cols, "normalized_margin", sep), 6),
            "exponent": (f"{fit['fitted_exponent']:.3f}" if fit
                         and np.isfinite(fit["fitted_exponent"]) else "–"),
            "2 - 2/L": f"{theory.loss_exponent(L):.3f}"})
        rows.append(row)
    return rows


def status_table(table, max_rows: int | None = None) -> str:
    """The per-configuration status table of a sweep, as markdown (with ``max_rows``: the
    first rows, and a count of the statuses of all)."""
    rows = status_rows(table)
    if max_rows is None or len(rows) <= max_rows:
        return markdown(rows)
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return (markdown(rows[:max_rows]) + f"\n... {len(rows) - max_rows} more configurations "
            f"(all in status.md); statuses: "
            + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def write_sweep_report(table, out) -> list[Path]:
    """Write ``out/status.md`` (the per-configuration table) and ``out/rates.png``
    (``plots.rate_figure``); return their paths."""
    from .plots import rate_figure

    out = Path(out)
    status = out / "status.md"
    io.write_text(status, status_table(table) + "\n")
    rates = out / "rates.png"
    io.write_figure(rate_figure(table), rates, dpi=100)
    return [status, rates]


def load(path):
    """A run directory as a ``Trajectory``, a sweep directory as a ``SweepTable``."""
    p = Path(path)
    if (p / "table.npz").exists():
        from .sweep import SweepTable
        return SweepTable.load(p)
    if (p / "meta.json").exists() and (p / "columns.npz").exists():
        from .trajectory import Trajectory
        return Trajectory.load(p)
    raise ValueError(f"{p} is neither a run directory (meta.json, columns.npz: homoflow run) "
                     f"nor a sweep directory (table.npz: homoflow sweep)")


def report(dirs: list, out, labels: list[str] | None = None) -> str:
    """Compare the runs and sweeps in ``dirs``; write ``out/report.md``, ``out/compare.png``
    (the runs overlaid) and ``out/rates-<name>.png`` per sweep; return the markdown."""
    from .plots import compare_figure, rate_figure

    if labels is not None and len(labels) != len(dirs):
        raise ValueError(f"--labels gives {len(labels)} names for {len(dirs)} directories")
    names = labels or [Path(d).name or str(d) for d in dirs]
    loaded = [load(d) for d in dirs]   # every path checked before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(n, x) for n, x in zip(names, loaded) if hasattr(x, "snapshots")]
    sweeps = [(n, x) for n, x in zip(names, loaded) if not hasattr(x, "snapshots")]
    parts = []
    if runs:
        parts.append("## runs\n\n" + markdown([run_row(t, n) for n, t in runs], RUN_COLUMNS))
        fig = compare_figure([t for _, t in runs], [n for n, _ in runs])
        io.write_figure(fig, out / "compare.png", dpi=100)
        parts.append("figure: compare.png")
    for n, table in sweeps:
        parts.append(f"## sweep {n}\n\n" + status_table(table))
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in n)
        io.write_figure(rate_figure(table), out / f"rates-{safe}.png", dpi=100)
        parts.append(f"figure: rates-{safe}.png")
    text = "\n\n".join(parts) + "\n"
    io.write_text(out / "report.md", text)
    return text


def add_parser(subparsers):
    p = subparsers.add_parser(
        "report", help="compare run and sweep directories (a table and overlaid figures)",
        description="Compare run directories (homoflow run) and sweep directories (homoflow "
                    "sweep): a table of each run's status, log T, margins, 1 - beta, KKT "
                    "residual and fitted loss exponent against 2 - 2/L; the runs overlaid "
                    "on the six panels of summary.png (compare.png); each sweep's "
                    "per-configuration status table and rate figure (rates-NAME.png).")
    p.add_argument("dirs", nargs="+", help="run or sweep directories")
    p.add_argument("--labels", nargs="+", default=None, help="one name per directory")
    p.add_argument("--out", default=None,
                   help="report directory (default: a fresh directory under runs/)")
    p.set_defaults(func=main)
    return p


def main(args) -> int:
    out = Path(args.out) if args.out else Path("runs") / _dt.datetime.now().strftime(
        "report-%Y%m%d-%H%M%S-%f")
    print(report(args.dirs, out, args.labels))
    print(f"report directory: {out}")
    return 0
