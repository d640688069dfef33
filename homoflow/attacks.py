"""L2 robustness: an attack (an upper bound on the distance to the decision boundary) and a
certificate (a lower bound), for the robustness experiment of Appendix J.2.

For a point z = (x, y) the robustness is R(z) = inf {||x - x'|| : x' in the data domain,
(x', y) misclassified}. ``l2_attack`` finds misclassified points x' near x, so each
distance it returns is >= R(z); ``certified_radius`` returns margin / Lipschitz constant,
which is <= R(z) (Appendix J.2: R(z) >= q(z) / beta for a beta-Lipschitz margin). Robust
accuracy curves from the two bracket the true one.

The attack is Carlini & Wagner's L2 objective ||x' - x||^2 + c max(m(x') / g, -kappa)
(m the multi-class margin Phi_y - max_{j != y} Phi_j, g = ||grad_x m(x)|| so that c is
scale-free) minimized with Adam and a binary search over c per point, as in their code;
the box constraint is kept by projection instead of their tanh change of variables (which
freezes pixels at 0 or 1). Each adversarial point found is then pushed back to the
decision boundary along the segment to x (bisection), and polished by DeepFool-style
projections onto the linearized boundary, accepted only when they stay misclassified and
get closer. For a linear classifier without an active box the polish is exact.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .models import conv_same
from .problem import class_gaps as gaps_and_mask


class AttackResult(NamedTuple):
    distance: np.ndarray    # ||x_adv - x||_2 per point; 0 if misclassified, inf if none found
    x_adv: np.ndarray       # the closest misclassified point found (x itself if none)
    clean_margin: np.ndarray  # m(x); <= 0 means misclassified before any attack


def multiclass_margin(outputs: jax.Array, y: jax.Array) -> jax.Array:
    """m_n = Phi_y - max_{j != y} Phi_j for (N, C) outputs, y_n Phi_n for (N,) outputs."""
    if outputs.ndim == 1:
        return y * outputs
    return jnp.min(class_gaps(outputs, y), axis=1)


def _norms(d):
    return jnp.sqrt(jnp.sum(d.reshape(d.shape[0], -1) ** 2, axis=1))


def _bcast(v, x):
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _project(x, box):
    return x if box is None else jnp.clip(x, box[0], box[1])


def _bisect(margin, x, x_adv, found, iters):
    """Smallest t found by bisection with x + t (x_adv - x) misclassified (t = 1 is)."""
    d = x_adv - x

    def halve(_, lohi):
        lo, hi = lohi
        mid = 0.5 * (lo + hi)
        bad = margin(x + _bcast(mid, x) * d) < 0
        return jnp.where(bad, lo, mid), jnp.where(bad, mid, hi)

    n = x.shape[0]
    _, hi = jax.lax.fori_loop(0, iters, halve, (jnp.zeros(n), jnp.ones(n)))
    hi = jnp.where(found, hi, 1.0)
    return x + _bcast(hi, x) * d


def class_gaps(outputs: jax.Array, y: jax.Array) -> jax.Array:
    """s_nj = Phi_y - Phi_j, +inf at j = y (shape (N, C)); binary outputs give (N, 1) = y Phi."""
    if outputs.ndim == 1:
        return (y * outputs)[:, None]
    return gaps_and_mask(outputs, y, jnp.inf)[0]


def _polish(apply, params, y, x, x_adv, found, box, steps, bisect_iters):
    """Multi-class DeepFool refinement: for every class j, project x onto the boundary
    s_j = 0 linearized at the current adversarial point, bisect back to the decision
    boundary, and keep the closest candidate that is misclassified and closer than before."""
    margin = lambda z: multiclass_margin(apply(params, z), y)

    def gaps_one(xi, yi):
        return class_gaps(apply(params, xi[None]), yi[None])[0]

    jac = jax.vmap(jax.jacrev(gaps_one))  # (N, C, *x)

    def one(_, xa):
        s, J = class_gaps(apply(params, xa), y), jac(xa, y)
        flatJ = J.reshape(J.shape[:2] + (-1,))
        g2 = jnp.sum(flatJ ** 2, axis=2)
        dx = (x - xa).reshape(x.shape[0], 1, -1)
        lin = jnp.where(jnp.isfinite(s), s + jnp.sum(flatJ * dx, axis=2), jnp.inf)
        step = lin / jnp.where(g2 > 0, g2, 1.0)  # (N, C)
        z = x[:, None] - (step * 1.0001).reshape(step.shape + (1,) * (x.ndim - 1)) * J
        z = _project(jnp.where(jnp.isfinite(z), z, x[:, None]), box)
        best = xa
        for j in range(z.shape[1]):  # C is small and static
            zj = z[:, j]
            ok = found & jnp.isfinite(lin[:, j]) & (g2[:, j] > 0) & (margin(zj) < 0)
            zj = _bisect(margin, x, zj, ok, bisect_iters)
            better = ok & (margin(zj) < 0) & (_norms(zj - x) < _norms(best - x))
            best = jnp.where(_bcast(better, x), zj, best)
        return best

    return jax.lax.fori_loop(0, steps, one, x_adv)


def l2_attack(apply: Callable, params, X, y, *, box=(0.0, 1.0), binary_steps: int = 6,
              steps: int = 100, lr: float = 0.05, c0: float = 10.0, kappa: float = 0.0,
              polish_steps: int = 10, bisect_iters: int = 40, batch: int | None = None
              ) -> AttackResult:
    """Carlini–Wagner L2 attack (Adam, binary search on c), then boundary refinement.

    ``apply(params, X)`` gives outputs (N, C) (or (N,) with y in {-1, +1}); ``box`` is the
    data domain ([0, 1] for images) or None. Returns per point the distance to the closest
    misclassified point found: an upper bound on the robustness R(z). Points already
    misclassified get distance 0; a point for which nothing was found gets inf.
    ``batch`` splits X into chunks of that many points (memory).
    """
    X = jnp.asarray(X, jnp.float64)
    y = jnp.asarray(y)
    if batch is not None and X.shape[0] > batch:
        parts = [l2_attack(apply, params, X[i:i + batch], y[i:i + batch], box=box,
                           binary_steps=binary_steps, steps=steps, lr=lr, c0=c0, kappa=kappa,
                           polish_steps=polish_steps, bisect_iters=bisect_iters)
                 for i in range(0, X.shape[0], batch)]
        return AttackResult(*(np.concatenate(f) for f in zip(*parts)))
    out = _attack(apply, params, X, y, box, binary_steps, steps, lr, c0, kappa,
                  polish_steps, bisect_iters)
    return AttackResult(*(np.asarray(o) for o in out))


@functools.partial(jax.jit, static_argnames=("apply", "box", "binary_steps", "steps",
                                             "polish_steps", "bisect_iters"))
def _attack(apply, params, X, y, box, binary_steps, steps, lr, c0, kappa, polish_steps,
            bisect_iters):
    n = X.shape[0]
    margin = lambda z: multiclass_margin(apply(params, z), y)
    m0, g0 = margin(X), jax.grad(lambda z: jnp.sum(margin(z)))(X)
    scale = jnp.maximum(_norms(g0), 1e-30)
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=1e-3)
    opt = optax.adam(schedule)

    def objective(z, c):
        dist2 = jnp.sum(((z - X) ** 2).reshape(n, -1), axis=1)
        hinge = jnp.maximum(margin(z) / scale, -kappa)
        return jnp.sum(dist2 + c * hinge), (dist2, margin(z))

    def inner(carry, _):
        z, opt_state, c, best_d2, best_x = carry
        (_, (d2, m)), g = jax.value_and_grad(objective, has_aux=True)(z, c)
        better = (m < 0) & (d2 < best_d2)
        best_d2 = jnp.where(better, d2, best_d2)
        best_x = jnp.where(_bcast(better, X), z, best_x)
        upd, opt_state = opt.update(g, opt_state, z)
        z = _project(optax.apply_updates(z, upd), box)
        return (z, opt_state, c, best_d2, best_x), m < 0

    def outer(carry, _):
        c, lo, hi, best_d2, best_x = carry
        # every search over c restarts at x, as in Carlini & Wagner's code
        (_, _, _, best_d2, best_x), succ = jax.lax.scan(
            inner, (X, opt.init(X), c, best_d2, best_x), None, length=steps)
        success = jnp.any(succ, axis=0)
        hi = jnp.where(success, jnp.minimum(hi, c), hi)
        lo = jnp.where(success, lo, jnp.maximum(lo, c))
        c = jnp.where(jnp.isfinite(hi), 0.5 * (lo + hi), 10.0 * c)
        return (c, lo, hi, best_d2, best_x), None

    init = (jnp.full(n, c0), jnp.zeros(n), jnp.full(n, jnp.inf), jnp.full(n, jnp.inf), X)
    (_, _, _, best_d2, best_x), _ = jax.lax.scan(outer, init, None, length=binary_steps)
    found = jnp.isfinite(best_d2)
    best_x = _bisect(margin, X, best_x, found, bisect_iters)
    best_x = _polish(apply, params, y, X, best_x, found, box, polish_steps, bisect_iters)
    dist = jnp.where(found, _norms(best_x - X), jnp.inf)
    wrong = m0 <= 0
    return jnp.where(wrong, 0.0, dist), jnp.where(_bcast(wrong, X), X, best_x), m0


# ---------------------------------------------------------------------------------------
# Certified lower bound: margin over a Lipschitz constant


@functools.partial(jax.jit, static_argnames=("in_shape",))
def _conv_matrix(W, in_shape: tuple) -> jax.Array:
    """The explicit matrix of the SAME-padded stride-1 convolution by ``W`` on
    R^{in_shape} (the layers here are small enough to write down): compiled once per
    shape, not once per checkpoint."""
    conv = lambda v: conv_same(v.reshape((1,) + in_shape), W).ravel()  # noqa: E731
    return jax.jacfwd(conv)(jnp.zeros(math.prod(in_shape), W.dtype))


def _spectral_norm(J: np.ndarray) -> float:
    """An upper bound on the largest singular value of J: the root of the top eigenvalue of
    its smaller Gram matrix (4x faster than a full SVD for the conv layers here) plus that
    eigenvalue's rounding error. Forming the Gram moves it by at most m eps ||J||_F^2 (m the
    inner dimension, Weyl's inequality) and the symmetric eigensolver by ~n eps ||G||, so
    (m + n) eps ||J||_F^2 is added: a certificate's constant must not come out low. The
    overshoot is 2.5e-10 relative on the quick CNN's first convolution (4096 x 1024) and
    grows with the layer's size and rank (~1e-8 for the paper's conv-32 on 32 x 32)."""
    G = J.T @ J if J.shape[1] <= J.shape[0] else J @ J.T
    top = float(np.linalg.eigvalsh(G)[-1])
    slack = sum(J.shape) * np.finfo(J.dtype).eps * float(np.sum(J * J))
    return math.sqrt(max(top, 0.0) + slack)


def _weight(g):
    return g["w"] if isinstance(g, dict) else g


def lipschitz_factors(model, params):
    """(K, W_out): every class difference Phi_y - Phi_j of ``model`` is Lipschitz in x (L2)
    with constant K ||W_out[:, y] - W_out[:, j]||. K is the product of the exact operator
    norms of the layers before the last; ReLU and non-overlapping max-pooling are
    1-Lipschitz and biases do not count. Supports ``linear``, ``mlp`` (ReLU) and ``cnn``."""
    name = model.name
    if name == "linear":
        return 1.0, jnp.asarray(params[0])
    if name.startswith("mlp"):
        if model.config.get("activation") not in ("relu",) and "leaky" not in model.config.get(
                "activation", ""):
            raise ValueError(f"lipschitz_factors: mlp activation {model.config.get('activation')}"
                             f" is not 1-Lipschitz")
        K = math.prod(float(np.linalg.norm(np.asarray(W), ord=2)) for W in params[:-1])
        return K, jnp.asarray(params[-1])
    if name.startswith("cnn"):
        cfg = model.config
        shape = cfg["input_shape"]
        spatial, c_in, K = list(shape[:-1]), shape[-1], 1.0
        for g in params[:len(cfg["channels"])]:
            W = _weight(g)
            K *= _spectral_norm(np.asarray(_conv_matrix(W, tuple(spatial) + (c_in,))))
            spatial, c_in = [s // cfg["pool"] for s in spatial], W.shape[-1]
        K *= float(np.linalg.norm(np.asarray(_weight(params[-2])), ord=2))
        return K, jnp.asarray(_weight(params[-1]))
    raise ValueError(f"lipschitz_factors does not know model {name!r}")


def certified_radius(model, params, X, y) -> np.ndarray:
    """r_n = min_{j != y} (Phi_y - Phi_j)(x_n) / (K ||W_out[:, y] - W_out[:, j]||) <= R(z_n):
    no perturbation of L2 norm below r_n changes the prediction. 0 where misclassified."""
    K, W_out = lipschitz_factors(model, params)
    out = model.apply(params, jnp.asarray(X, jnp.float64))
    y = jnp.asarray(y)
    if out.ndim == 1:  # binary: Phi = <w_out, h>, margin y Phi
        r = y * out / (K * jnp.linalg.norm(W_out))
    else:
        diff = W_out[:, y].T[:, :, None] - W_out[None, :, :]  # (N, H, C): w_y - w_j
        lip = K * jnp.linalg.norm(diff, axis=1)
        s, mask = gaps_and_mask(out, y, jnp.inf)
        r = jnp.min(s / jnp.where(mask, 1.0, lip), axis=1)
    return np.asarray(jnp.maximum(r, 0.0))


def robust_accuracy(distances, eps) -> np.ndarray:
    """Fraction of points with robustness > eps, for each eps (Appendix J.2; misclassified
    points have robustness 0)."""
    d = np.asarray(distances)[:, None]
    return np.mean(d > np.asarray(eps)[None, :], axis=0)
