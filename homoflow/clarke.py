"""KKT residuals over Clarke's subdifferential on (leaky) ReLU networks (Appendix C.1,
Definitions C.5 / C.6; DESIGN §6).

At theta~ = theta / q_min^{1/L} the residual of Definition C.6 is
eps = min over lambda >= 0 and h_k in the Clarke subdifferential of constraint c_k of
||theta~ - sum_k lambda_k h_k||, with delta = sum_k lambda_k (c_k(theta~) - 1); homoflow
minimizes eps^2 + delta^2 jointly (as ``kkt.kkt_residual``). A kink is *active* when its
pre-activation satisfies |z| <= kink_tol * scale (``kink_scales``); both bounds below are
exact statements about the point theta~' that differs from theta~ only in moving the active
kinks exactly onto 0 (for kink_tol = 1e-9 a relative perturbation ~1e-9 of the weights).

One hidden layer (``Kinks.exact``): the Clarke set of c_k is {h_k^lo + sum_s (sigma_s - lo)
g_ks : sigma in [lo, hi]^(active kinks)}, g_ks = e_ks grad z_s (e_ks the cotangent at kink
s, grad z_s = x_n in unit j's weight column). With mu_ks = lambda_k (sigma_s - lo) the
residual is the convex QP
    min ||b - A lambda - B mu||^2,  lambda >= 0,  0 <= mu_ks <= (hi - lo) lambda_k,
solved by ``box_cone_qp``: a primal-dual interior-point method (Mehrotra) whose Newton
systems use the structure (B^T B is block diagonal by hidden unit, generators of different
units live in disjoint weight columns), then an active-set refinement that solves the
equality-constrained least squares of the identified active bounds exactly, so eps is exact
to round-off. eps_lower = eps.

Deeper MLPs (``Kinks.exact == False``): q_n is multilinear in the per-kink derivatives
sigma, and the Clarke set of c_k is conv of the gradients at the realizable vertices
sigma in {lo, hi}^(active kinks) — for a bias-free (leaky) ReLU MLP every vertex is
realizable (the limit of gradients at theta~ + t Delta) when each active kink's layer input
h_n is nonzero, which holds at every theta~ with q_min > 0 (h_n = 0 would make the output 0).
``mlp_bracket`` runs column generation over vertex gradients: the master is an NNLS over the
columns found so far (``kkt.nnls_gram``), the pricing enumerates all 2^r vertices of each
constraint's r <= ``max_vertex_kinks`` active kinks. eps (upper) is the master's value, a
feasible selection; eps_lower equals it when pricing finds no improving vertex (then the
master is optimal over conv of all vertex images, which contains the Clarke set — a valid
lower bound even without realizability), and is NaN when a constraint has more active kinks
than can be enumerated or the rounds ran out.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# A kink is active when |z_s| <= KINK_TOL * ||h_n|| ||w_u|| (layer input times the unit's
# weight column at theta~; |z_s| <= ||h_n|| ||w_u|| always). A kink sitting exactly on 0 is
# computed with round-off ~d 1e-16 relative; separations that descent leaves are >= 1e-7
# relative (default problem, 3000 loss-based steps: smallest 1.7e-7), and issue 13's
# independent solve found the same Clarke eps for bands 1e-9 ... 1e-4 at the default flow's
# saved points. 1e-9 sits orders of magnitude from both.
KINK_TOL = 1e-9


class QPInfo(NamedTuple):
    iterations: jax.Array
    gap: jax.Array        # the IPM's last complementarity gap (scaled)
    refined: jax.Array    # whether the active-set refinement gave the returned point


def _seg(values, owner, m):
    """sum over slots s with owner(s) = k of values[s], for k < m (slots are (W, T))."""
    return jax.ops.segment_sum(values.ravel(), owner.ravel(), num_segments=m)


def _schur_solver(Nll, Nlm, Nmm):
    """Factor the block system [[Nll, Nlm], [Nlm^T, blockdiag(Nmm)]]: Nmm is (W, T, T)
    (one block per hidden unit), Nlm is (m, W, T). Returns solve(r_l, r_m).

    With Nmm = L L^T blockwise and Z = L^-1 Nlm^T, the Schur complement onto lambda is
    S = Nll - Z^T Z. The T x T blocks use their Cholesky factors' explicit inverses:
    XLA-CPU runs a batch of small triangular solves with many right-hand sides ~10x slower
    than the batched inverse plus an einsum (W = 100, T = 8, m = 100: 2.0 ms against
    0.2 ms), and a triangular inverse is as accurate as substitution."""
    m, W, T = Nlm.shape
    Lm = jnp.linalg.cholesky(Nmm)
    eye = jnp.broadcast_to(jnp.eye(T, dtype=Nmm.dtype), Nmm.shape)
    Li = jax.lax.linalg.triangular_solve(Lm, eye, left_side=True, lower=True)   # L^-1
    Z = jnp.einsum("jts,ljs->jtl", Li, Nlm).reshape(W * T, m)
    Ls = jnp.linalg.cholesky(Nll - Z.T @ Z)

    def solve(rl, rm):
        w = jnp.einsum("jts,js->jt", Li, rm).ravel()
        dl = jax.scipy.linalg.cho_solve((Ls, True), rl - Z.T @ w)
        return dl, jnp.einsum("jst,js->jt", Li, (w - Z @ dl).reshape(W, T))

    return solve


def box_cone_qp(Qll, ql, Qlm, Qmm, qm, owner, mask, c, max_iter: int = 80, rank=None):
    """min 1/2 x^T Q x - q^T x over x = (lambda, mu) with lambda >= 0 and
    0 <= mu_s <= c lambda_owner(s) for the slots with ``mask`` (others fixed at mu = 0).

    Q = [[Qll, Qlm], [Qlm^T, blockdiag(Qmm)]] must be positive semidefinite: Qll (m, m),
    Qlm (m, W, T), Qmm (W, T, T) (slots grouped in W blocks of T), ql (m,), qm (W, T),
    owner (W, T) ints in [0, m). Jittable and vmappable (fixed shapes, while_loop).

    Mehrotra's predictor-corrector interior-point method, each Newton system solved by a
    Schur complement onto lambda (W Cholesky factors of T x T, one of m x m), then an
    active-set refinement: the bounds the IPM finds active (slack < dual, or primal within
    1e-4 / 1e-7 / 1e-10 of the bound) are imposed as equalities and the reduced least squares is
    solved exactly (four proximal-point steps from the IPM point, ridge 1e-9); of the IPM point
    and the refined points, all projected onto the feasible set, the one of smallest
    ``rank(lam, mu)`` is returned (default: the objective from Q; pass the residual computed
    from the design itself where the objective's round-off, ~1e-16 ||b||^2, matters)."""
    m = Qll.shape[0]
    W, T = qm.shape
    dt = Qll.dtype
    mask = mask.astype(bool)
    cm = jnp.where(mask, c, 0.0)
    free_box = jnp.where(mask, 0.0, 1.0)         # masked slots: 0 <= mu <= 1, no coupling
    Qmm = jnp.where(mask[:, :, None] & mask[:, None, :], Qmm, 0.0)
    Qlm = jnp.where(mask[None], Qlm, 0.0)
    qm = jnp.where(mask, qm, 0.0)
    alpha = jnp.maximum(jnp.maximum(jnp.max(jnp.diag(Qll)),
                                    jnp.max(jnp.diagonal(Qmm, axis1=1, axis2=2))),
                        jnp.finfo(dt).tiny)
    Qll, Qlm, Qmm, ql, qm = Qll / alpha, Qlm / alpha, Qmm / alpha, ql / alpha, qm / alpha
    Qmm = Qmm + jnp.where(mask, 0.0, 1.0)[:, :, None] * jnp.eye(T, dtype=dt)  # pin masked
    onehot = jax.nn.one_hot(owner, m, dtype=dt)                                # (W, T, m)
    n_c = m + 2 * W * T

    def Qx(lam, mu):
        return (Qll @ lam + jnp.einsum("kjt,jt->k", Qlm, mu),
                jnp.einsum("kjt,k->jt", Qlm, lam) + jnp.einsum("jts,js->jt", Qmm, mu))

    def Cx(lam, mu):
        return lam, mu, cm * lam[owner] - mu + free_box

    def CTz(z1, z2, z3):
        return z1 + _seg(cm * z3, owner, m), z2 - z3

    def objective(lam, mu):
        gl, gm = Qx(lam, mu)
        return 0.5 * (lam @ gl + jnp.sum(mu * gm)) - lam @ ql - jnp.sum(mu * qm)

    # start: the best common multiple of lambda = 1, mu at mid-box; unit duals
    ones = jnp.ones(m, dt)
    beta = jnp.clip(jnp.sum(ql) / jnp.maximum(ones @ Qll @ ones, jnp.finfo(dt).tiny), 1e-6, 1e6)
    lam0 = beta * ones
    mu0 = 0.5 * (cm * lam0[owner] + free_box)
    s0 = Cx(lam0, mu0)
    z0 = tuple(jnp.ones_like(s) for s in s0)

    def newton_parts(lam, mu, s, z):
        gl, gm = Qx(lam, mu)
        ctl, ctm = CTz(*z)
        rd = (gl - ql - ctl, gm - qm - ctm)
        rp = tuple(a - b for a, b in zip(Cx(lam, mu), s))
        D = tuple(zi / si for zi, si in zip(z, s))
        Nll = Qll + jnp.diag(D[0] + _seg(cm * cm * D[2], owner, m))
        Nlm = Qlm - jnp.transpose(onehot * (cm * D[2])[:, :, None], (2, 0, 1))
        Nmm = Qmm + (D[1] + D[2])[:, :, None] * jnp.eye(T, dtype=dt)
        return rd, rp, _schur_solver(Nll, Nlm, Nmm)

    def direction(solve, rd, rp, s, z, rc):
        v = tuple((rci + zi * rpi) / si for rci, zi, rpi, si in zip(rc, z, rp, s))
        vl, vm = CTz(*v)
        dl, dm = solve(-rd[0] - vl, -rd[1] - vm)
        ds = tuple(a + b for a, b in zip(Cx(dl, dm), rp))
        dz = tuple(-(rci + zi * dsi) / si for rci, zi, dsi, si in zip(rc, z, ds, s))
        return dl, dm, ds, dz

    def max_step(v, dv):
        return jnp.min(jnp.stack([jnp.min(jnp.where(d < 0, -x / jnp.where(d < 0, d, -1.0), 1.0))
                                  for x, d in zip(v, dv)] + [jnp.ones((), dt)]))

    def gap(s, z):
        return sum(jnp.sum(si * zi) for si, zi in zip(s, z)) / n_c

    def step(carry):
        lam, mu, s, z, it = carry
        rd, rp, solve = newton_parts(lam, mu, s, z)
        mu_c = gap(s, z)
        rc = tuple(si * zi for si, zi in zip(s, z))
        _, _, ds, dz = direction(solve, rd, rp, s, z, rc)
        a = max_step(s + z, ds + dz)
        mu_aff = sum(jnp.sum((si + a * dsi) * (zi + a * dzi))
                     for si, dsi, zi, dzi in zip(s, ds, z, dz)) / n_c
        sigma = (mu_aff / mu_c) ** 3
        rc = tuple(si * zi + dsi * dzi - sigma * mu_c for si, zi, dsi, dzi in zip(s, z, ds, dz))
        dl, dm, ds, dz = direction(solve, rd, rp, s, z, rc)
        a = 0.99 * max_step(s + z, ds + dz)
        s = tuple(si + a * dsi for si, dsi in zip(s, ds))
        z = tuple(zi + a * dzi for zi, dzi in zip(z, dz))
        return lam + a * dl, mu + a * dm, s, z, it + 1

    def cond(carry):
        lam, mu, s, z, it = carry
        scale = 1.0 + jnp.abs(objective(lam, mu))
        return (it < max_iter) & (gap(s, z) > 1e-15 * scale) & jnp.all(jnp.isfinite(lam))

    lam, mu, s, z, it = jax.lax.while_loop(cond, step, (lam0, mu0, s0, z0, 0))

    def project(lam, mu):
        lam = jnp.maximum(lam, 0.0)
        return lam, jnp.where(mask, jnp.clip(mu, 0.0, cm * lam[owner]), 0.0)

    def refine(free_l, lower, upper):
        """Impose the identified bounds as equalities; solve the reduced least squares."""
        upper = upper & ~lower & mask
        inter = mask & ~lower & ~upper
        # mu = E lambda on the upper slots, E[s, l] = c [owner(s) = l]: the products with
        # E are segment sums over the slots' owners (a dense (m, W, T) E costs 100x more)
        cu = jnp.where(upper, cm, 0.0)

        def seg_rows(a):  # (W, T, m) -> (m, m): row l sums the slots owned by l
            return jax.ops.segment_sum(a.reshape(W * T, m), owner.ravel(), num_segments=m)

        QmmEU = jnp.einsum("jts,jsl->jtl", Qmm * cu[:, None, :], onehot)       # (W, T, m)
        QlmE = seg_rows(jnp.transpose(Qlm * cu[None], (1, 2, 0)))              # (l, k)
        Rll = Qll + QlmE + QlmE.T + seg_rows(cu[:, :, None] * QmmEU)
        Rlm = Qlm + jnp.transpose(QmmEU, (2, 0, 1))
        rl = ql + _seg(cu * qm, owner, m)
        fl, fm = free_l, inter
        Rll = jnp.where(fl[:, None] & fl[None, :], Rll, 0.0) + jnp.diag(jnp.where(fl, 0.0, 1.0))
        Rlm = jnp.where(fl[:, None, None] & fm[None], Rlm, 0.0)
        Rmm = jnp.where(fm[:, :, None] & fm[:, None, :], Qmm, 0.0) \
            + jnp.where(fm, 0.0, 1.0)[:, :, None] * jnp.eye(T, dtype=dt)
        rl, rm = jnp.where(fl, rl, 0.0), jnp.where(fm, qm, 0.0)
        # proximal-point steps from the IPM point: (R + rho I) dx = r - R x. Where R is
        # singular (a site's slots for several constraints have parallel generators) the
        # split along its null space stays the IPM's, which is feasible
        ridge = 1e-9 * jnp.maximum(jnp.max(jnp.diag(Rll)), 1.0)
        solve = _schur_solver(Rll + ridge * jnp.eye(m, dtype=dt), Rlm,
                              Rmm + ridge * jnp.eye(T, dtype=dt))
        xl, xm = jnp.where(fl, lam, 0.0), jnp.where(fm, mu, 0.0)
        for _ in range(4):
            gl = Rll @ xl + jnp.einsum("kjt,jt->k", Rlm, xm)
            gm = jnp.einsum("kjt,k->jt", Rlm, xl) + jnp.einsum("jts,js->jt", Rmm, xm)
            dl, dm = solve(rl - gl, rm - gm)
            xl, xm = xl + dl, xm + dm
        lam_r = jnp.where(fl, xl, 0.0)
        return project(lam_r, jnp.where(fm, xm, 0.0) + jnp.where(upper, cm, 0.0) * lam_r[owner])

    # active-set refinement from three identifications of the active bounds: slack below
    # its dual (strict complementarity), and primal values within 1e-4 / 1e-7 / 1e-10 of a
    # bound (weakly active bounds defeat the first; at an exact KKT point the IPM's point can
    # be 1e-5 off a bound: a polished point had eps 5e-7 without 1e-4, 4e-15 with it, cvxpy
    # 5e-15); the best projected candidate is returned
    big = jnp.maximum(jnp.max(lam), jnp.finfo(dt).tiny)
    rules = [(s[0] > z[0], s[1] <= z[1], s[2] <= z[2])] + [
        (lam > tau * big, mu <= tau * big, mu >= cm * lam[owner] - tau * big)
        for tau in (1e-4, 1e-7, 1e-10)]
    ref_l, ref_m = jax.vmap(refine)(*(jnp.stack(r) for r in zip(*rules)))
    ipm_l, ipm_m = project(lam, mu)
    cand_l = jnp.concatenate([ipm_l[None], ref_l])
    cand_m = jnp.concatenate([ipm_m[None], ref_m])
    score = rank if rank is not None else objective
    obj = jax.vmap(score)(cand_l, cand_m)
    obj = jnp.where(jnp.isfinite(obj), obj, jnp.inf)
    best = jnp.argmin(obj)
    lam_o, mu_o = cand_l[best], cand_m[best]
    use_r = best > 0
    return lam_o, mu_o, QPInfo(it, gap(s, z), use_r)


# --- active kinks ---------------------------------------------------------------------------

def is_mlp(model) -> bool:
    """A bias-free dense (leaky) ReLU MLP (``models.mlp``): the kinks of every layer sit on
    weight columns of their own, which the bracket's realizability argument needs."""
    return (model.kinks is not None and model.kinks.first_dense
            and "widths" in model.config)


def kink_scales(problem, params):
    """Per kinked layer: (z, scale, input_norm), each shaped like the pre-activations on X.
    For an MLP scale = ||h_n|| ||w_u|| (the layer's input at data point n times unit u's
    weight column: |z| <= scale by Cauchy-Schwarz) and input_norm = ||h_n||; otherwise
    (CNN) scale = the largest |z| of the layer at data point n and input_norm = NaN.

    An MLP unit whose outgoing weights are all 0 (a dead unit, a_j = 0) gets scale NaN,
    so none of its sites counts as active: q_n does not depend on its activation, and at
    z = 0 it is differentiable there (a act(z) = O(|a| |z|)), so the site is no kink and
    its generators e x_n would be exact zeros, which only degrade the QP's accuracy
    (a polished point with 24 dead units: eps 2.5e-6 with their 960 sites, 1e-12
    without)."""
    kinks = problem.model.kinks
    zs = kinks.pre(params, problem.X)
    if not is_mlp(problem.model):
        return tuple((z, jnp.max(jnp.abs(z.reshape(z.shape[0], -1)), axis=1).reshape(
            (-1,) + (1,) * (z.ndim - 1)) * jnp.ones_like(z), jnp.full(z.shape, jnp.nan))
            for z in zs)
    h = problem.X.reshape(problem.X.shape[0], -1)
    out = []
    for W, after, z in zip(params[:-1], params[1:], zs):
        hn = jnp.linalg.norm(h, axis=1)[:, None]
        scale = hn * jnp.linalg.norm(W, axis=0)[None, :]
        scale = jnp.where(jnp.all(after == 0, axis=1)[None, :], jnp.nan, scale)
        out.append((z, scale, hn * jnp.ones_like(z)))
        h = jnp.maximum(z, kinks.lo * z)  # (leaky) ReLU: slope lo below 0, 1 above (lo < 1)
    return tuple(out)


def _relative(z, scale):
    return jnp.abs(z) / jnp.maximum(scale, jnp.finfo(z.dtype).tiny)


# --- one hidden layer: the exact convex QP ------------------------------------------------

class ClarkeSolution(NamedTuple):
    eps: jax.Array
    delta: jax.Array
    lam: jax.Array
    n_kinks: jax.Array     # active kinks (sites with |z| <= kink_tol scale) of used points
    capped: jax.Array      # True: some active kinks did not fit and were held at sigma = lo
    H: jax.Array           # rows h_k^lo (derivative lo at every active kink)
    iterations: jax.Array


class Slots(NamedTuple):
    """One hidden layer's active kinks as QP slots, grouped by hidden unit (W, T)."""
    H: jax.Array        # rows h_k^lo (derivative lo at every active kink), (m, P)
    V: jax.Array        # generator of slot (j, t) in unit j's weight column, (W, T, d)
    owner: jax.Array    # the row of ``index`` each slot belongs to, (W, T)
    mask: jax.Array     # slot in use, (W, T)
    n_kinks: jax.Array
    capped: jax.Array


def one_hidden_slots(problem, flat, unravel, index, kink_tol, max_kinks_per_unit: int) -> Slots:
    """The gradients h_k^lo and, per hidden unit, up to ``max_kinks_per_unit`` active kinks
    (smallest |z| / scale first) times the constraints of their data point: slot (j, t) has
    generator g = e_k x_n in unit j's weight column (e_k = d c_k / d act at the site), so
    h_k(sigma) = h_k^lo + sum over k's slots of (sigma - lo) g."""
    model = problem.model
    lo = model.kinks.lo
    params = unravel(flat)
    N = problem.X.shape[0]
    X2 = problem.X.reshape(N, -1)
    dim = X2.shape[1]
    C = model.n_outputs
    rows = 1 if C == 1 else C - 1
    m = index.shape[0]
    (z, scale, _), = kink_scales(problem, params)
    Wn = z.shape[1]
    pos = jnp.full(N * rows, -1).at[index].set(jnp.arange(m))
    cons_of = pos.reshape(N, rows)
    used = jnp.any(cons_of >= 0, axis=1)
    active = (_relative(z, scale) <= kink_tol) & used[:, None]
    n_kinks = jnp.sum(active)
    slopes = (jnp.where(active, lo, jnp.nan),)
    H, (e,) = _kkt()._constraint_grads(problem, flat, unravel, index, slopes, cotangents=True)
    T = min(int(max_kinks_per_unit), N)
    key = jnp.where(active, _relative(z, scale), jnp.inf)
    neg, site = jax.lax.top_k(-key.T, T)                                   # (W, T)
    kept = jnp.isfinite(neg)
    capped = n_kinks > jnp.sum(kept)
    owner = cons_of[site]                                                  # (W, T, rows)
    mask = kept[..., None] & (owner >= 0)
    owner = jnp.where(mask, owner, 0)
    e_slot = jnp.where(mask, e[owner, jnp.arange(Wn)[:, None, None]], 0.0)
    V = (e_slot[..., None] * X2[site][:, :, None, :]).reshape(Wn, T * rows, dim)
    return Slots(H, V, owner.reshape(Wn, T * rows), mask.reshape(Wn, T * rows), n_kinks, capped)


def _scatter_units(u, V, P):
    """sum_t u_jt V_jt placed in unit j's weight column, as a flat parameter vector."""
    gW = jnp.einsum("jt,jtd->dj", u, V).ravel()
    return jnp.concatenate([gW, jnp.zeros(P - gW.shape[0], gW.dtype)])


def one_hidden_residual(problem, flat, unravel, index, d, kink_tol, max_kinks_per_unit: int):
    """The exact Clarke residual of a one-hidden-layer net (``Kinks.exact``) at the flat
    parameters ``flat`` (theta~) on the constraints ``index`` (``d`` = c_k(theta~) - 1).

    Active kinks of a hidden unit beyond ``max_kinks_per_unit`` (the ones with the largest
    |z| / scale) keep sigma = lo: the result is then still a certificate (an upper bound)
    and ``capped`` says so."""
    kinks = problem.model.kinks
    lo, hi = kinks.lo, kinks.hi
    H, V, owner, mask, n_kinks, capped = one_hidden_slots(problem, flat, unravel, index,
                                                          kink_tol, max_kinks_per_unit)
    m = index.shape[0]
    Wn, _, dim = V.shape
    HW = H[:, : dim * Wn].reshape(m, dim, Wn)
    bW = flat[: dim * Wn].reshape(dim, Wn)
    Qll = H @ H.T + d[:, None] * d[None, :]

    def residual(lam, mu):  # theta~ - H^T lam - G^T mu, from the design itself
        return flat - H.T @ lam - _scatter_units(mu, V, flat.shape[0])

    def rank(lam, mu):
        return jnp.sum(residual(lam, mu) ** 2) + jnp.sum(lam * d) ** 2

    lam, mu, info = box_cone_qp(Qll, H @ flat, jnp.einsum("kdj,jtd->kjt", HW, V),
                                jnp.einsum("jtd,jsd->jts", V, V),
                                jnp.einsum("jtd,dj->jt", V, bW), owner, mask, hi - lo, rank=rank)
    r = residual(lam, mu)
    return ClarkeSolution(jnp.linalg.norm(r), jnp.sum(lam * d), lam, n_kinks, capped, H,
                          info.iterations)


def _kkt():
    from . import kkt  # kkt imports this module lazily too: one home for the constraints
    return kkt


def count_active(problem, params, index, kink_tol):
    """The number of active kinks (|z| <= kink_tol * scale) at data points of ``index``."""
    rows = 1 if problem.model.n_outputs == 1 else problem.model.n_outputs - 1
    used = jnp.zeros(problem.X.shape[0], bool).at[index // rows].set(True)
    return sum(jnp.sum((_relative(z, s) <= kink_tol)
                       & used.reshape((-1,) + (1,) * (z.ndim - 1)))
               for z, s, _ in kink_scales(problem, params))


# --- deeper MLPs: a bracket by column generation over vertex gradients --------------------

class Bracket(NamedTuple):
    eps: jax.Array        # upper: a feasible selection (NaN if a vertex is not realizable)
    eps_lower: jax.Array  # = eps where optimality over all vertices is proven, else NaN
    lam: jax.Array        # lambda_k = sum of the weights of constraint k's columns
    n_kinks: jax.Array
    capped: jax.Array     # some data point has more active kinks than max_vertex_kinks
    converged: jax.Array  # pricing found no improving vertex
    H: jax.Array          # rows h_k^lo (derivative lo at every active kink)


def mlp_bracket(problem, flat, unravel, index, d, kink_tol, max_vertex_kinks: int = 4,
                rounds: int = 4) -> Bracket:
    """The Clarke residual of a deep bias-free (leaky) ReLU MLP as a bracket (module
    docstring). Columns are [h_k(sigma); d_k] for vertices sigma in {lo, hi} of the active
    kinks of c_k's data point (its ``max_vertex_kinks`` ones of smallest |z| / scale; any
    others held at lo). Round 0 takes sigma = lo; each of ``rounds`` rounds solves the
    master NNLS (``kkt.nnls_gram``) and adds, per constraint, the vertex of largest reduced
    cost <column, residual> found by enumerating all 2^max_vertex_kinks vertices (a
    forward-mode derivative each). Jittable; fixed shapes."""
    kkt = _kkt()
    model = problem.model
    lo, hi = model.kinks.lo, model.kinks.hi
    params = unravel(flat)
    N = problem.X.shape[0]
    rows = 1 if model.n_outputs == 1 else model.n_outputs - 1
    m = index.shape[0]
    layers = kink_scales(problem, params)
    shapes = [z.shape[1:] for z, _, _ in layers]
    splits = np.cumsum([int(np.prod(s)) for s in shapes])[:-1].tolist()
    rel = jnp.concatenate([_relative(z, s).reshape(N, -1) for z, s, _ in layers], axis=1)
    hin = jnp.concatenate([h.reshape(N, -1) for _, _, h in layers], axis=1)
    used = jnp.zeros(N, bool).at[index // rows].set(True)
    active = (rel <= kink_tol) & used[:, None]
    n_kinks = jnp.sum(active)
    realizable = jnp.all(~active | (hin > 0))
    V = int(max_vertex_kinks)
    neg, site = jax.lax.top_k(-jnp.where(active, rel, jnp.inf), V)         # (N, V)
    kept = jnp.isfinite(neg)
    capped = jnp.any(jnp.sum(active, axis=1) > V)
    base = jnp.where(active, lo, jnp.nan)
    bits = ((jnp.arange(2 ** V)[:, None] >> jnp.arange(V)[None, :]) & 1).astype(flat.dtype)
    nk, jk = index // rows, index % rows

    def slopes_of(n, bit):
        s = base[n].at[site[n]].set(jnp.where(kept[n], lo + (hi - lo) * bit, base[n][site[n]]))
        return tuple(a.reshape(sh) for a, sh in
                     zip(jnp.split(s, splits), shapes))

    def columns(bit_rows):  # (m, V) bits -> (m, P) gradients
        sl = jax.vmap(slopes_of)(nk, bit_rows)
        return kkt._constraint_grads(problem, flat, unravel, index, sl, per_row=True)

    def price(r_theta, r_d):  # (m,) best vertex bits and its reduced cost
        def one(n, j, dk):
            def val(bit):
                f = lambda z: kkt.row_constraint(problem, unravel, n, j, slopes_of(n, bit), z)
                return jax.jvp(f, (flat,), (r_theta,))[1] + dk * r_d
            v = jax.vmap(val)(bits)
            return bits[jnp.argmax(v)], jnp.max(v)
        return jax.vmap(one)(nk, jk, d)

    H0 = columns(jnp.zeros((m, V), flat.dtype))
    Hc = jnp.zeros((m, rounds + 1, flat.shape[0]), flat.dtype).at[:, 0].set(H0)
    dc = jnp.zeros((m, rounds + 1), flat.dtype).at[:, 0].set(d)
    bnorm = jnp.linalg.norm(flat)
    tol = 1e-9 * jnp.max(jnp.linalg.norm(H0, axis=1)) * jnp.maximum(bnorm, 1.0)

    def master(Hc, dc):
        A, a = Hc.reshape(-1, flat.shape[0]), dc.ravel()
        x = kkt.nnls_gram(A @ A.T + a[:, None] * a[None, :], A @ flat, bnorm)
        return x.reshape(m, rounds + 1), flat - A.T @ x, -(a @ x)

    def body(r, carry):
        Hc, dc = carry
        _, r_theta, r_d = master(Hc, dc)
        bit, cost = price(r_theta, r_d)
        add = cost > tol
        Hn = jnp.where(add[:, None], columns(bit), 0.0)
        return Hc.at[:, r + 1].set(Hn), dc.at[:, r + 1].set(jnp.where(add, d, 0.0))

    Hc, dc = jax.lax.fori_loop(0, rounds, body, (Hc, dc))
    x, r_theta, r_d = master(Hc, dc)
    _, cost = price(r_theta, r_d)
    converged = jnp.max(cost) <= tol
    lam = jnp.sum(x, axis=1)
    eps = jnp.where(realizable, jnp.linalg.norm(r_theta), jnp.nan)
    eps_lower = jnp.where(converged & ~capped, jnp.linalg.norm(r_theta), jnp.nan)
    return Bracket(eps, eps_lower, lam, n_kinks, capped, converged, H0)


# --- the minimum-norm Clarke element (the velocity the flow follows) -------------------

def box_qp(Q, c, ub, max_iter: int = 60):
    """min 1/2 u^T Q u + c^T u s.t. 0 <= u <= ub (Q positive semidefinite, ub >= 0; entries
    with ub = 0 are fixed at 0). A primal-dual interior-point method (Mehrotra), jittable
    and vmappable; the result is projected onto the box, its objective accurate to ~1e-15
    relative (no active-set refinement)."""
    n = c.shape[0]
    dt = c.dtype
    fixed = ub <= 0
    ub1 = jnp.where(fixed, 1.0, ub)
    Q = jnp.where(fixed[:, None] | fixed[None, :], 0.0, Q) + jnp.diag(jnp.where(fixed, 1.0, 0.0))
    c = jnp.where(fixed, 0.0, c)
    alpha = jnp.maximum(jnp.max(jnp.abs(jnp.diag(Q))), jnp.finfo(dt).tiny)
    Q, c = Q / alpha, c / alpha

    def resid(u, z1, z2):
        return Q @ u + c - z1 + z2

    def step(carry):
        u, z1, z2, it = carry
        s1, s2 = u, ub1 - u
        mu_c = (s1 @ z1 + s2 @ z2) / (2 * n)
        rd = resid(u, z1, z2)
        L = jnp.linalg.cholesky(Q + jnp.diag(z1 / s1 + z2 / s2))

        def direction(r1, r2):  # complementarity targets s1 z1 = r1, s2 z2 = r2
            rhs = -rd + (r1 - s1 * z1) / s1 - (r2 - s2 * z2) / s2
            du = jax.scipy.linalg.cho_solve((L, True), rhs)
            dz1 = (r1 - s1 * z1 - z1 * du) / s1
            dz2 = (r2 - s2 * z2 + z2 * du) / s2
            return du, dz1, dz2

        def max_step(du, dz1, dz2):
            pairs = [(s1, du), (s2, -du), (z1, dz1), (z2, dz2)]
            return jnp.min(jnp.stack([jnp.min(jnp.where(d < 0, -x / jnp.where(d < 0, d, -1.0), 1.0))
                                      for x, d in pairs] + [jnp.ones((), dt)]))

        du, dz1, dz2 = direction(jnp.zeros(n, dt), jnp.zeros(n, dt))
        a = max_step(du, dz1, dz2)
        mu_aff = ((s1 + a * du) @ (z1 + a * dz1) + (s2 - a * du) @ (z2 + a * dz2)) / (2 * n)
        sigma = (mu_aff / mu_c) ** 3
        du, dz1, dz2 = direction(sigma * mu_c - du * dz1, sigma * mu_c + du * dz2)
        a = 0.99 * max_step(du, dz1, dz2)
        return u + a * du, z1 + a * dz1, z2 + a * dz2, it + 1

    def cond(carry):
        u, z1, z2, it = carry
        gap = (u @ z1 + (ub1 - u) @ z2) / (2 * n)
        return (it < max_iter) & (gap > 1e-16) & jnp.all(jnp.isfinite(u))

    u, _, _, _ = jax.lax.while_loop(cond, step, (0.5 * ub1, jnp.ones(n, dt), jnp.ones(n, dt), 0))
    return jnp.where(fixed, 0.0, jnp.clip(u, 0.0, ub1))


class MinNormElement(NamedTuple):
    element: object       # the minimum-norm element, a params pytree
    sigma_lo_gap: jax.Array  # u_jt = w_k (sigma - lo) per slot (W, T)
    n_kinks: jax.Array
    capped: jax.Array


def min_norm_element(problem, params, weights, kink_tol=KINK_TOL,
                     max_kinks_per_unit: int = 8) -> MinNormElement:
    """The minimum-norm element of {sum_k w_k h_k(sigma_k) : sigma_k in [lo, hi] at each
    active kink of constraint k} for weights w >= 0 on the constraints (``kkt.constraints``
    order; w = the weights of -grad log L on them gives the velocity the flow follows), at
    ``params`` itself (no rescaling), for a one-hidden-layer net (``Kinks.exact``), where
    the Clarke subdifferential of the weighted sum is exactly this set. With u = w (sigma
    - lo) the problem separates by hidden unit (disjoint weight columns): per unit a
    box-constrained least squares min ||b_j + V_j^T u_j|| over 0 <= u_j <= (hi - lo) w,
    solved by ``box_qp`` (vmapped over units). Jittable and vmappable."""
    kinks = problem.model.kinks
    if kinks is None or not kinks.exact:
        raise ValueError(f"min_norm_element needs a one-hidden-layer (leaky) ReLU model "
                         f"(Kinks.exact); got model {problem.model.name!r}")
    flat, unravel = _ravel(params)
    K = _kkt().constraints(problem, params).shape[0]
    weights = jnp.asarray(weights, flat.dtype)
    if weights.shape != (K,):
        raise ValueError(f"weights must have one entry per constraint, shape ({K},); got "
                         f"shape {weights.shape}")
    index = jnp.arange(K)
    sl = one_hidden_slots(problem, flat, unravel, index, jnp.asarray(kink_tol, flat.dtype),
                          max_kinks_per_unit)
    b0 = sl.H.T @ weights
    Wn, _, dim = sl.V.shape
    bW = b0[: dim * Wn].reshape(dim, Wn)
    Q = jnp.einsum("jtd,jsd->jts", sl.V, sl.V)
    c = jnp.einsum("jtd,dj->jt", sl.V, bW)
    ub = jnp.where(sl.mask, (kinks.hi - kinks.lo) * weights[sl.owner], 0.0)
    # no active kink (the usual case off the kinks, e.g. along descent): the set is the
    # one point b0; skipping the QP saves ~4.5 of ~5 ms on the default problem
    u = jax.lax.cond(jnp.any(ub > 0), lambda: jax.vmap(box_qp)(Q, c, ub),
                     lambda: jnp.zeros_like(ub))
    return MinNormElement(unravel(b0 + _scatter_units(u, sl.V, flat.shape[0])), u,
                          sl.n_kinks, sl.capped)


def _ravel(params):
    from jax.flatten_util import ravel_pytree
    return ravel_pytree(params)
