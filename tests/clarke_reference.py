"""An independent reference for the Clarke KKT residual of a bias-free two-layer (leaky)
ReLU network (``homoflow.clarke``): gradients from the explicit formulas (NumPy, not
autodiff), all constraints, the joint eps^2 + delta^2, and the convex program solved by
cvxpy with Clarabel from a dense design matrix. For tests and benchmark figures only
(cvxpy is a test dependency)."""

from __future__ import annotations

import numpy as np


def _act(z, lo):
    return np.where(z >= 0, z, lo * z)


def clarke_eps_reference(problem, params, kink_tol=1e-9):
    """(eps, delta, n_kinks) at theta~ = theta / q_min^{1/2} for ``models.mlp((d, W, C))``
    with ReLU or leaky ReLU (Clarke interval [lo, 1] at 0): min over lambda >= 0 and, per
    constraint k and active kink s = (n(k), j) (|z| <= kink_tol ||x_n|| ||w_j||), over
    mu_ks in [0, (1 - lo) lambda_k] of || [theta~; 0] - sum_k lambda_k [h_k^lo; c_k - 1]
    - sum_ks mu_ks [g_ks; 0] || (a second-order cone program, so eps is accurate to the
    solver's tolerance and not to its square root)."""
    import cvxpy as cp

    model = problem.model
    lo, hi = model.kinks.lo, model.kinks.hi
    X = np.asarray(problem.X, np.float64).reshape(problem.X.shape[0], -1)
    y = np.asarray(problem.y)
    W1, A = (np.asarray(p, np.float64) for p in params)
    N, d = X.shape
    Wn, C = A.shape
    Z = X @ W1
    out = _act(Z, lo) @ A                                              # (N, C)
    if C == 1:
        rows = [(n, None) for n in range(N)]
        c = y * out[:, 0]
    else:
        rows = [(n, j) for n in range(N) for j in range(C) if j != y[n]]
        c = np.array([out[n, y[n]] - out[n, j] for n, j in rows])
    q_min = c.min()
    if not q_min > 0:
        raise ValueError(f"q_min = {q_min} <= 0: no KKT residual")
    s = q_min ** -0.5
    W1, A, Z, c = s * W1, s * A, s * Z, c / q_min
    theta = np.concatenate([W1.ravel(), A.ravel()])
    # a unit without outgoing weights (A_j = 0) has no kink: q does not depend on it
    active = (np.abs(Z) <= kink_tol * np.linalg.norm(X, axis=1)[:, None]
              * np.linalg.norm(W1, axis=0)[None, :]) & np.any(A != 0, axis=1)[None, :]
    slope = np.where(active, lo, np.where(Z > 0, hi, lo))               # (N, W)
    cols_l, cols_m, owner = [], [], []
    for k, (n, j) in enumerate(rows):
        # output cotangent of the constraint: y_n (binary), e_y - e_j (classes)
        v = np.array([y[n]]) if C == 1 else np.eye(C)[y[n]] - np.eye(C)[j]
        e = A @ v                                                      # (W,): d c / d act_j
        gW = np.outer(X[n], e * slope[n])                              # (d, W)
        gA = np.outer(_act(Z[n], lo), v)                               # (W, C)
        cols_l.append(np.concatenate([gW.ravel(), gA.ravel(), [c[k] - 1.0]]))
        for u in np.nonzero(active[n])[0]:
            g = np.zeros((d, Wn))
            g[:, u] = e[u] * X[n]
            cols_m.append(np.concatenate([g.ravel(), np.zeros(A.size + 1)]))
            owner.append(k)
    Al = np.array(cols_l).T
    b = np.concatenate([theta, [0.0]])
    lam = cp.Variable(len(rows))
    cons = [lam >= 0]
    fit = Al @ lam
    if cols_m:
        Bm = np.array(cols_m).T
        mu = cp.Variable(len(cols_m))
        cons += [mu >= 0, mu <= (hi - lo) * lam[np.array(owner)]]
        fit = fit + Bm @ mu
    prob = cp.Problem(cp.Minimize(cp.norm(b - fit)), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-13, tol_gap_rel=1e-13, tol_feas=1e-13)
    Bm = np.array(cols_m).T if cols_m else np.zeros((b.size, 0))
    own = np.array(owner, int)
    x_l = np.maximum(lam.value, 0.0)
    x_m = np.clip(mu.value, 0.0, (hi - lo) * x_l[own]) if cols_m else np.zeros(0)
    # candidates: Clarabel's point and its polish for each activity threshold, each from
    # Clarabel's point; the feasible one of smallest residual wins
    best = (x_l, x_m)
    for rel in 10.0 ** -np.arange(2, 12):
        y_l, y_m = _polish(Al, Bm, b, own, hi - lo, x_l, x_m, rel)
        def norm(x_l, x_m):
            return np.linalg.norm(b - Al @ x_l - Bm @ x_m)
        if norm(y_l, y_m) < norm(*best):
            best = (y_l, y_m)
    x_l, x_m = best
    r = b - Al @ x_l - Bm @ x_m
    return float(np.linalg.norm(r[:-1])), float(-r[-1]), int(active.sum())


def _polish(Al, Bm, b, own, width, x_l, x_m, rel):
    """Clarabel's point is accurate to ~1e-8; impose the bounds it finds active as
    equalities and solve that least squares exactly (``lstsq``); keep the result when it
    is feasible and no worse (any feasible point is a certificate, so this only sharpens).
    ``rel``: the activity threshold, relative to the largest multiplier."""
    scale = max(x_l.max(initial=0.0), 1e-300)
    free = x_l > rel * scale
    lower = x_m <= rel * scale
    upper = ~lower & (x_m >= width * x_l[own] - rel * scale)
    inter = ~lower & ~upper
    cols = [Al[:, k] + width * Bm[:, upper & (own == k)].sum(axis=1) for k in np.nonzero(free)[0]]
    D = np.column_stack(cols + [Bm[:, inter]]) if cols or inter.any() else np.zeros((b.size, 0))
    z = np.linalg.lstsq(D, b, rcond=None)[0]
    y_l = np.zeros_like(x_l)
    y_l[free] = z[: free.sum()]
    y_m = np.where(upper, width * y_l[own], 0.0)
    y_m[inter] = z[free.sum():]
    feasible = (y_l >= 0).all() and (y_m >= 0).all() and (y_m <= width * y_l[own]).all()
    if feasible and np.linalg.norm(b - Al @ y_l - Bm @ y_m) <= np.linalg.norm(
            b - Al @ x_l - Bm @ x_m):
        return y_l, y_m
    return x_l, x_m
