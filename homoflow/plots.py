"""Figures that show the theorems on a recorded run (matplotlib ``Figure`` objects: no pyplot
state, no backend switch, so calling them from a notebook leaves its inline figures alone).

``summary_figure(traj)`` is the one-page dashboard of a run (``homoflow run`` writes it as
``summary.png``), ``compare_figure(trajs, labels)`` overlays several runs on the same six
panels (``homoflow report``), ``rate_figure(table)`` draws a sweep's rate ratios. The panels:

1. log(1/L) — the loss falls like 1/T up to logs (Theorem 4.3);
2. the normalized margins γ̄ = q_min/ρ^L, γ̃ = ℓ⁻¹(L)/ρ^L, γ̂ (Appendix E.2) after t0, with
   the margin of the polished KKT point (or an SVM) as the line they should approach;
3. L·T·(log T)^{2−2/L}, Θ(1) by Theorem 4.3, against its limit 1/(L² γ*^{2/L});
4. ρ/(log T)^{1/L}, Θ(1), against its limit γ*^{−1/L};
5. 1 − β (autodiff, and the minimum-norm Clarke β where recorded): β → 1 (Lemma C.12);
6. the KKT residual ε of (P) where recorded (Theorem 4.4: ε → 0).

The time axis is log T (T = Σ η for descent, t for the flow, and labelled so) on a
logarithmic scale once it spans more than a decade, linear otherwise: never symlog.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import io, theory
from .trajectory import Trajectory

LN10 = math.log(10.0)
_PANELS = ("loss", "margins", "loss_ratio", "norm_ratio", "beta", "kkt")


def _is_flow(meta: dict) -> bool:
    return str(meta.get("engine", "")).startswith("flow")


def _time_label(metas: Sequence[dict]) -> str:
    flows = [_is_flow(m) for m in metas]
    if all(flows):
        return "log t  (gradient flow: t is time)"
    if not any(flows):
        return "log T  (T = Σ η, the time descent has travelled)"
    return "log T  (t for the flow, Σ η for descent)"


def _order(traj: Trajectory) -> float | None:
    m = traj.meta
    for key in ("order", "L"):
        if m.get(key) is not None:
            return float(m[key])
    cfg = m.get("config") or {}
    if cfg.get("order") is not None:
        return float(cfg["order"])
    return None


def _columns(traj) -> dict:
    return traj.columns if hasattr(traj, "columns") else traj


def _use_log_x(xs: Sequence[np.ndarray]) -> bool:
    """log scale for log T when its positive part spans more than a decade."""
    pos = np.concatenate([x[np.isfinite(x) & (x > 0)] for x in xs] or [np.zeros(0)])
    return pos.size > 1 and pos.max() / pos.min() > 10.0


def _positive(v) -> np.ndarray:
    v = np.asarray(v, np.float64)
    return np.where(np.isfinite(v) & (v > 0), v, np.nan)


class _Dashboard:
    """Six axes sharing one time axis; ``draw(traj, ...)`` adds one run to every panel."""

    def __init__(self, title: str, log_x: bool, x_label: str):
        from matplotlib.figure import Figure

        # fixed margins: constrained layout costs ~1.3 s of a ~3 s dashboard (every run
        # writes one) and this grid's labels have fixed lengths
        self.fig = Figure(figsize=(14, 8))
        self.fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07, top=0.9, wspace=0.28,
                                 hspace=0.38)
        axes = self.fig.subplots(2, 3)
        self.ax = dict(zip(_PANELS, axes.ravel()))
        self.log_x = log_x
        self.fig.suptitle(title, fontsize=11)
        for name, ax in self.ax.items():
            if log_x:
                ax.set_xscale("log")
            ax.set_xlabel(x_label + ("" if log_x else "  (linear: < 1 decade)"), fontsize=8)
            ax.grid(True, which="major", alpha=0.3)
        a = self.ax
        a["loss"].set(ylabel=r"$\log_{10}(1/L)$",
                      title=r"loss: $\log(1/L) = \log T + (2-2/L)\log\log T + O(1)$")
        a["margins"].set(ylabel="normalized margin",
                         title="margins after t0: γ̃ ↑ (flow), γ̂ ↑ (descent) → γ*")
        a["loss_ratio"].set(ylabel=r"$L\cdot T\cdot(\log T)^{2-2/L}$",
                            title=r"Theorem 4.3: $\Theta(1)$, $\to 1/(L^2\gamma_*^{2/L})$")
        a["norm_ratio"].set(ylabel=r"$\rho\,/\,(\log T)^{1/L}$",
                            title=r"Theorem 4.3: $\Theta(1)$, $\to \gamma_*^{-1/L}$")
        a["beta"].set(ylabel="1 − β", title="alignment: β = cos(θ, −∇L) → 1",
                      yscale="log")
        a["kkt"].set(ylabel="ε (KKT residual of (P))", title="KKT: ε → 0 (Theorem 4.4)",
                     yscale="log")

    def _x(self, c) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(c["log_T"], np.float64)
        keep = np.isfinite(x) & ((x > 0) if self.log_x else True)
        return x, keep

    def draw(self, traj, label: str | None, color=None, *, reference: float | None = None,
             reference_label: str | None = None, order: float | None = None,
             many: bool = False) -> None:
        c = _columns(traj)
        x, keep = self._x(c)
        sep = np.asarray(c["separated"], bool) if "separated" in c else np.ones(len(x), bool)
        after = keep & sep
        a = self.ax
        kw = dict(ms=2.5, lw=1.2, color=color)
        tag = (lambda s: label if many else s)

        inv = -np.asarray(c["log_loss"], np.float64) / LN10
        a["loss"].plot(x[keep], inv[keep], ".-", label=label, **kw)
        if not many:
            first = np.flatnonzero(after)
            if first.size:
                a["loss"].axvline(x[first[0]], color="0.6", ls=":", lw=1)
                a["loss"].annotate("t0", (x[first[0]], 0.02), xycoords=("data", "axes fraction"),
                                   fontsize=7, color="0.4")

        styles = (("normalized_margin", r"$\bar\gamma = q_{\min}/\rho^L$", "-"),
                  ("smoothed_margin", r"$\tilde\gamma = \ell^{-1}(L)/\rho^L$", "--"),
                  ("descent_margin", "γ̂ (App. E.2)", ":"))
        for name, text, ls in styles:
            if name not in c or (many and name != "normalized_margin"):
                continue
            v = np.asarray(c[name], np.float64)
            ok = after & np.isfinite(v)
            if ok.any():
                a["margins"].plot(x[ok], v[ok], ls, marker=".", label=tag(text),
                                  **{**kw, "color": color})
        if reference is not None and np.isfinite(reference):
            a["margins"].axhline(reference, color=color or "k", lw=0.9, ls="-.",
                                 label=reference_label or f"γ* = {reference:.6g}")

        L = order if order is not None else _order(traj)
        gamma = reference
        if gamma is None and "normalized_margin" in c:
            v = np.asarray(c["normalized_margin"], np.float64)[after]
            v = v[np.isfinite(v)]
            gamma = float(v[-1]) if v.size else None
            gamma_text = "γ̄ (last)"
        else:
            gamma_text = "γ*"
        if L is not None and L > 0:
            lr = theory.loss_ratio(c["log_T"], c["log_loss"], L)
            nr = theory.norm_ratio(c["log_T"], c["log_rho"], L)
            ok = after & np.isfinite(lr) & (x >= 1.0)
            a["loss_ratio"].plot(x[ok], lr[ok], ".-", label=tag("measured"), **kw)
            ok = after & np.isfinite(nr) & (x >= 1.0)
            a["norm_ratio"].plot(x[ok], nr[ok], ".-", label=tag("measured"), **kw)
            if gamma is not None and gamma > 0:
                a["loss_ratio"].axhline(theory.limit_loss_ratio(gamma, L), color=color or "k",
                                        ls="-.", lw=0.9, label=None if many else
                                        f"limit $1/(L^2\\gamma^{{2/L}})$, γ = {gamma_text}")
                a["norm_ratio"].axhline(theory.limit_norm_ratio(gamma, L), color=color or "k",
                                        ls="-.", lw=0.9, label=None if many else
                                        f"limit $\\gamma^{{-1/L}}$, γ = {gamma_text}")
            a["loss_ratio"].set_yscale("log")
        for name, text, ls in (("beta", "autodiff β", "-"),
                               ("beta_clarke", "min-norm Clarke β", "--")):
            if name in c and not (many and name == "beta_clarke"):
                v = _positive(1.0 - np.asarray(c[name], np.float64))
                ok = after & np.isfinite(v)
                if ok.any():
                    a["beta"].plot(x[ok], v[ok], ls, marker=".", label=tag(text), **kw)
        for name, text, ls in (("kkt_eps", "ε", "-"), ("kkt_delta", "δ", "--")):
            if name in c and not (many and name == "kkt_delta"):
                v = _positive(c[name])
                ok = after & np.isfinite(v)
                if ok.any():
                    a["kkt"].plot(x[ok], v[ok], ls, marker=".", label=tag(text), **kw)

    def finish(self, no_separation: bool) -> None:
        from matplotlib.ticker import FuncFormatter

        ys = [np.asarray(ln.get_ydata(), np.float64) for ln in self.ax["loss"].lines]
        ys = np.concatenate(ys) if ys else np.zeros(0)
        ys = ys[np.isfinite(ys)]
        pos = ys[ys > 0]
        if pos.size > ys.size // 2 and pos.max() / pos.min() > 10:   # log(1/L) spans decades
            # Theorem 4.3's log(1/L) ~ log T is then a straight line of slope 1; points with
            # L >= 1 (before separation only) have no place on it and are not drawn
            self.ax["loss"].set_yscale("log")
            if pos.size < ys.size:
                self.ax["loss"].set_ylabel(r"$\log_{10}(1/L)$  (points with L < 1)")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        # 1-2 decades show one or two major ticks: label the minor 2s and 5s too
        two_five = FuncFormatter(lambda v, _: f"{v:g}" if v > 0 and round(
            v / 10.0 ** np.floor(np.log10(v) + 1e-9)) in (2, 5) else "")
        for name in ("loss_ratio", "beta", "kkt"):   # 4, not 4×10⁰, on a short log axis
            if self.ax[name].get_yscale() == "log":
                lo, hi = self.ax[name].get_ylim()
                if hi / lo < 100:
                    self.ax[name].yaxis.set_major_formatter(plain)
                    self.ax[name].yaxis.set_minor_formatter(plain if hi / lo < 10
                                                            else two_five)
        for name, ax in self.ax.items():
            if ax.lines:
                handles, labels = ax.get_legend_handles_labels()
                if labels:
                    ax.legend(fontsize=7, loc="best")
            else:
                msg = {"kkt": "no KKT columns recorded\n(descent: record_kkt; the flow's audit)",
                       "beta": "no point after t0"}.get(name, "no point after t0 with log T ≥ 1")
                if name == "margins" and no_separation:
                    msg = "never separated: no margin to show"
                ax.text(0.5, 0.5, msg, ha="center", va="center", fontsize=9, color="0.4",
                        transform=ax.transAxes)


def _title(traj) -> str:
    m = traj.meta
    cfg = m.get("config") or {}
    parts = [str(cfg.get("model", m.get("model", ""))),
             f"L = {_order(traj):g}" if _order(traj) is not None else "",
             f"{cfg.get('loss', m.get('loss', ''))} loss",
             "gradient flow" if _is_flow(m) else f"descent ({cfg.get('policy', '')})",
             f"status: {traj.status}"]
    return ", ".join(p for p in parts if p.strip(" ,()"))


def summary_figure(traj: Trajectory, *, reference: float | None = None,
                   reference_label: str | None = None, order: float | None = None):
    """The one-page dashboard of a run (six panels, see the module docstring).

    ``reference``: the normalized margin the run should approach (the polished KKT point's
    ``kkt.polish_kkt(...).normalized_margin``, or an SVM's margin) — drawn in the margin
    panel and used for the limits of the two rate ratios; without it the limits use the
    last γ̄ (labelled so). ``order``: L, if the trajectory's meta does not carry it."""
    x = np.asarray(traj.columns["log_T"], np.float64)
    board = _Dashboard(_title(traj), _use_log_x([x]), _time_label([traj.meta]))
    board.draw(traj, None, reference=reference, reference_label=reference_label, order=order)
    sep = traj.columns.get("separated")
    board.finish(no_separation=sep is not None and not np.any(sep))
    return board.fig


def compare_figure(trajs: Sequence[Trajectory], labels: Sequence[str], *,
                   references: Sequence[float | None] | None = None,
                   orders: Sequence[float | None] | None = None):
    """Several runs overlaid on the dashboard's six panels, one colour per run
    (log(1/L), γ̄, both rate ratios with their limits, 1 − β, KKT ε)."""
    if len(trajs) != len(labels):
        raise ValueError(f"compare_figure: {len(trajs)} trajectories but {len(labels)} labels")
    if not trajs:
        raise ValueError("compare_figure needs at least one trajectory")
    references = list(references) if references is not None else [None] * len(trajs)
    orders = list(orders) if orders is not None else [None] * len(trajs)
    xs = [np.asarray(t.columns["log_T"], np.float64) for t in trajs]
    board = _Dashboard(f"{len(trajs)} runs", _use_log_x(xs), _time_label([t.meta for t in trajs]))
    colors = [f"C{i % 10}" for i in range(len(trajs))]
    for t, lab, col, ref, L in zip(trajs, labels, colors, references, orders):
        board.draw(t, lab, col, reference=ref, order=L, many=True)
    board.finish(no_separation=False)
    return board.fig


def save_summary(traj: Trajectory, directory, report: dict | None = None) -> Path:
    """Write ``directory/summary.png``; ``report`` (``kkt.convergence_report``) supplies the
    polished KKT point's margin as the reference line."""
    polished = report.get("polished") if report else None
    fig = summary_figure(traj, reference=polished.normalized_margin if polished else None,
                         reference_label=(f"polished KKT point γ* = "
                                          f"{polished.normalized_margin:.6g}") if polished
                         else None)
    return io.write_figure(fig, Path(directory) / "summary.png", dpi=100)


def rate_figure(table, *, by: str = "order"):
    """A sweep's rate ratios: L·T·(log T)^{2−2/L} and ρ/(log T)^{1/L} against log T for every
    configuration (one colour per value of ``by``, default the order L), and the fitted
    exponent of log(1/L) − log T against log log T per configuration beside 2 − 2/L."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.3), constrained_layout=True)
    ax_l, ax_n, ax_e = fig.subplots(1, 3)
    runs = list(table.runs())
    values = sorted({str(cols[by][0]) for _, cols in runs}) if runs and by in table.columns \
        else []
    color = {v: f"C{i % 10}" for i, v in enumerate(values)}
    xs = [np.asarray(cols["log_T"], np.float64) for _, cols in runs]
    log_x = _use_log_x(xs)
    seen = set()
    for cfg, cols in runs:
        L = float(cols["order"][0])
        key = str(cols[by][0]) if by in cols else ""
        x = np.asarray(cols["log_T"], np.float64)
        sep = np.asarray(cols.get("separated", np.ones(len(x))), bool)
        keep = sep & np.isfinite(x) & (x >= 1.0)
        lab = None if key in seen else f"{by} = {key}"
        seen.add(key)
        c = color.get(key)
        lr = theory.loss_ratio(x, cols["log_loss"], L)
        nr = theory.norm_ratio(x, cols["log_rho"], L)
        ax_l.plot(x[keep], lr[keep], ".-", ms=2, lw=0.8, color=c, alpha=0.8, label=lab)
        ax_n.plot(x[keep], nr[keep], ".-", ms=2, lw=0.8, color=c, alpha=0.8)
        fit = theory.rate_check(cols, L)
        if np.isfinite(fit["fitted_exponent"]):
            ax_e.errorbar(L, fit["fitted_exponent"], yerr=fit["fit_stderr"], fmt="o", ms=4,
                          color=c, alpha=0.8)
    if values and runs:
        orders = np.unique([float(cols["order"][0]) for _, cols in runs])
        grid = np.linspace(max(orders.min() * 0.9, 0.5), orders.max() * 1.1 + 0.1, 100)
        ax_e.plot(grid, 2 - 2 / grid, "k-.", lw=0.9, label="2 − 2/L (Theorem 4.3)")
    for ax in (ax_l, ax_n):
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel("log T  (t for the flow, Σ η for descent)")
        ax.grid(True, alpha=0.3)
    ax_l.set(yscale="log", ylabel=r"$L\cdot T\cdot(\log T)^{2-2/L}$", title="loss ratio: Θ(1)")
    ax_n.set(ylabel=r"$\rho\,/\,(\log T)^{1/L}$", title="norm ratio: Θ(1)")
    ax_e.set(xlabel="order L", ylabel="fitted exponent of log log T",
             title="log(1/L) − log T vs log log T: slope 2 − 2/L")
    ax_e.grid(True, alpha=0.3)
    for ax in (ax_l, ax_e):
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7)
    if not runs:
        ax_l.text(0.5, 0.5, "no configuration", ha="center", transform=ax_l.transAxes)
    return fig
