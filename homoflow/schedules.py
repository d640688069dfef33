"""Step-size policies for gradient descent, all in the log domain (DESIGN §2).

A policy proposes log eta for the next attempt from its state, the current log L and what
is known about t0; the descent engine takes the step
``theta <- theta - exp(log eta + log L) * grad log L`` and tells the policy whether the
attempt was accepted. A policy whose step is naturally a multiple of grad log L (the
loss-based and normalized rules, eta = alpha / L) gives that multiple's log directly
(``log_scale``): forming exp((log alpha - log L) + log L) instead loses |log L| * 2^-52 of
log alpha to cancellation, 16 % at log L = -4e15 and all of it beyond |log L| ~ 1e17.
Policies with ``retry=True`` (the loss-based scheduler) retry a step
that did not decrease the loss with a smaller step; the others take every finite step and
stop the run when the loss blows up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .diagnostics import global_norm, log_h_bound, log_phi
from .problem import Problem


class T0Info(NamedTuple):
    """What the run knows about t0, the first iterate past the t0 threshold (NaN before)."""
    log_loss: jax.Array
    log_rho: jax.Array
    log_phi: jax.Array   # phi(L(t0)) of Appendix E.2, so gamma_hat(t0) = e^{log_phi} / rho^L

    @classmethod
    def at(cls, log_loss, log_rho, L: float) -> "T0Info":
        s0 = -log_loss
        return cls(log_loss, log_rho, log_phi(s0, s0, L))


@dataclass(frozen=True, eq=False)
class Policy:
    """A step-size policy. Numeric hyperparameters live in the state ``init()`` returns,
    not in the closures, so one compiled program serves every value and a sweep vmaps
    over them (``homoflow.sweep``); structural choices (retrying or not, ``max_retries``,
    C_eta given or built from constants) are static."""

    name: str
    init: Callable[[], Any]                      # -> policy state (a pytree)
    log_lr: Callable[[Any, jax.Array, T0Info, float], jax.Array]  # (state, log L, t0, order)
    update: Callable[[Any, jax.Array], Any]      # (state, accepted) -> state
    retry: bool = False
    max_retries: int = 0
    optimizer: Any = None                        # an optax GradientTransformation, or None
    objective: str = "loss"                      # optax only: gradient of L or of log L
    config: dict = field(default_factory=dict, compare=False)
    # (state, grad log L) -> the step's direction (``steepest``); None: the gradient itself
    direction: Callable[[Any, Any], Any] | None = None
    # (state, log L, t0, order) -> log of the multiple of grad log L the step subtracts;
    # None: log_lr + log L
    log_scale: Callable[[Any, jax.Array, T0Info, float], jax.Array] | None = None
    # (state, radial) -> state, applied before each attempt with radial = <theta/rho,
    # -grad log L> (the loss-based scheduler's cap); None: no limit. For a retrying policy
    # the SGD engine applies it only at a streak's first attempt: a failed attempt's
    # ``update`` must keep the state within the limit (the loss-based one divides alpha)
    limit: Callable[[Any, jax.Array], Any] | None = None

    def step_logs(self, state, log_loss, t0, order):
        """(log scale, log eta): the step subtracts exp(log scale) grad log L, and log eta =
        log scale - log L is what T = sum eta accumulates."""
        log_lr = self.log_lr(state, log_loss, t0, order)
        if self.log_scale is None:
            return log_lr + log_loss, log_lr
        return self.log_scale(state, log_loss, t0, order), log_lr


def _positive(name, value):
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def constant(lr: float) -> Policy:
    """eta(t) = lr. With a small enough lr this satisfies (S5) (Appendix E.1)."""
    log_lr = math.log(_positive("learning rate lr", lr))
    # the hyperparameter lives in the state (traced), so one compiled program serves every lr
    return Policy("constant", lambda: jnp.asarray(log_lr), lambda st, ll, t0, L: st,
                  lambda st, ok: st, config={"lr": lr})


class LossBasedState(NamedTuple):
    """State of the loss-based scheduler; r_u, r_d and the cap are traced so a sweep vmaps
    over them (``log_cap = inf``: no cap, the paper's rule)."""
    log_alpha: jax.Array
    log_r_u: jax.Array
    log_r_d: jax.Array
    log_cap: jax.Array = jnp.inf


def loss_based(alpha0: float = 0.1, r_u: float = 2 ** (1 / 5), r_d: float = 2 ** (1 / 10),
               max_retries: int = 1000, radial_cap: float | None = 1.0) -> Policy:
    """The loss-based scheduler of Appendix K.1: eta = alpha / L, with alpha capped.

    After an accepted step (the loss decreased) alpha <- alpha * r_u; otherwise the step is
    retried with alpha <- alpha / r_d. The step is theta - alpha grad log L. ``max_retries``
    consecutive failures stop the run (``descent`` says why: not separated, float64
    exhausted, or stalled).

    What Appendix K.1 promises: every accepted step lowers the loss (a line search on L),
    nothing more; it proves no rate and no convergence of the direction. Indeed, where a
    long step still lowers L — every separable linear problem once the iterate separates —
    alpha grows geometrically, the iterate is dominated by its last gradient, and the
    direction does not converge: on 2-D logistic problems the paper's rule ended 0.23–1.2
    rad from the max-margin direction, with log T ~ 1e17 (measured, ``radial_cap=None``).

    ``radial_cap = c`` (default 1) caps alpha <= c / <theta_hat, grad log L>^2 before each
    attempt, i.e. to first order a step lowers log L by at most c through the growth of
    ||theta||. Why this bound: a step moves tau = log rho by d tau ~ alpha <theta_hat,
    -grad log L> / rho, while the direction's dynamics in tau are stiff with rate ~
    <theta, -grad log L> = L log(1/L) (1 + o(1)) (DESIGN §3), so explicit steps stay
    stable while d tau * L log(1/L) = O(1): the cap is that condition. On a linear model it
    is alpha <= c / gamma_bar^2 (the range where normalized GD provably converges in
    direction); on an L-homogeneous model it shrinks like rho^{2 - 2L}, as the Hessian of
    log L grows. It leaves the paper's behaviour intact wherever the loss test already keeps
    alpha smaller (measured: the default ReLU problem). ``radial_cap=None`` is the paper's
    rule exactly.
    """
    la0 = math.log(_positive("alpha0", alpha0))
    lu, ld = math.log(_positive("r_u", r_u)), math.log(_positive("r_d", r_d))
    if r_u < 1 or r_d < 1:
        raise ValueError(f"r_u and r_d must be >= 1, got r_u={r_u}, r_d={r_d}")
    lc = math.inf if radial_cap is None else math.log(_positive("radial_cap", radial_cap))

    def limit(st, radial):
        # <theta_hat, -grad log L> <= 0 (before separation): no radial growth to bound
        cap = jnp.where(radial > 0, st.log_cap - 2.0 * jnp.log(jnp.where(radial > 0, radial,
                                                                             1.0)), jnp.inf)
        return st._replace(log_alpha=jnp.minimum(st.log_alpha, cap))

    return Policy("loss_based",
                  lambda: LossBasedState(*map(jnp.asarray, (la0, lu, ld, lc))),
                  lambda st, ll, t0, L: st.log_alpha - ll,
                  lambda st, ok: st._replace(log_alpha=jnp.where(ok, st.log_alpha + st.log_r_u,
                                                                 st.log_alpha - st.log_r_d)),
                  retry=True, max_retries=int(max_retries),
                  config={"alpha0": alpha0, "r_u": r_u, "r_d": r_d, "max_retries": max_retries,
                          "radial_cap": radial_cap},
                  log_scale=lambda st, ll, t0, L: st.log_alpha,
                  limit=None if radial_cap is None else limit)


def c_eta_from_constants(B0, B1, B2, t0: T0Info, L: float):
    """C_eta = (B1^2 + rho(t0)^{-L} B2) gamma_hat(t0)^{-2} B0^{2/L} / 2 (end of Appendix E.2),
    returned as log C_eta."""
    log_gamma_hat0 = t0.log_phi - L * t0.log_rho
    return (jnp.log(0.5 * (B1 ** 2 + jnp.exp(-L * t0.log_rho) * B2)) - 2.0 * log_gamma_hat0
            + (2.0 / L) * jnp.log(B0))


class HBoundState(NamedTuple):
    """Hyperparameters of ``h_bound``: log lr before t0, log fraction, and either
    [log C_eta] or [B0, B1, B2]."""
    log_lr_before_t0: jax.Array
    log_fraction: jax.Array
    c: jax.Array


def h_bound(c_eta: float | None = None, constants: tuple | None = None,
            lr_before_t0: float = 0.1, fraction: float = 1.0) -> Policy:
    """eta = fraction * H(L) = fraction * mu(L) / (C_eta kappa(L)) after t0 (Appendix E.1).

    Give either ``c_eta`` or ``constants = (B0, B1, B2)`` (e.g. from
    ``estimate_smoothness_constants``), from which C_eta is computed at t0 with rho(t0) and
    gamma_hat(t0). Before t0 the step is the constant ``lr_before_t0``. Appendix E's
    analysis is for the exponential loss and C^2-smooth models (S1).
    """
    if (c_eta is None) == (constants is None):
        raise ValueError("h_bound needs exactly one of c_eta or constants=(B0, B1, B2)")
    log_pre = math.log(_positive("lr_before_t0", lr_before_t0))
    log_frac = math.log(_positive("fraction", fraction))
    # hyperparameters live in the state (traced): one compiled program serves every value
    if c_eta is not None:
        c = jnp.asarray([math.log(_positive("c_eta", c_eta))])
        log_c_fn = lambda c, t0, L: c[0]
    else:
        if len(constants) != 3 or not (math.isfinite(float(constants[2]))
                                       and float(constants[2]) >= 0):
            raise ValueError(f"constants must be (B0, B1, B2) with B2 >= 0 (0 for a linear "
                             f"model), got {constants}")
        c = jnp.asarray([_positive("B0", constants[0]), _positive("B1", constants[1]),
                         float(constants[2])])
        log_c_fn = lambda c, t0, L: c_eta_from_constants(c[0], c[1], c[2], t0, L)

    def log_lr(state, log_loss, t0, L):
        after = jnp.isfinite(t0.log_loss)
        s0 = jnp.where(after, -t0.log_loss, 1.0)
        s = jnp.maximum(-log_loss, s0)  # H is defined for L <= L(t0)
        log_h = log_h_bound(s, s0, log_c_fn(state.c, t0, L), L) + state.log_fraction
        return jnp.where(after, log_h, state.log_lr_before_t0)

    init = lambda: HBoundState(jnp.asarray(log_pre), jnp.asarray(log_frac), c)
    return Policy("h_bound", init, log_lr, lambda st, ok: st,
                  config={"c_eta": c_eta, "constants": constants,
                          "lr_before_t0": lr_before_t0, "fraction": fraction})


def optax_optimizer(optimizer, objective: str = "loss", name: str | None = None) -> Policy:
    """Any optax GradientTransformation.

    ``objective`` says which function the optimizer minimizes, and it decides the limit:
    ``"loss"`` feeds it grad L = L * grad log L (which underflows to 0 once L < 1e-308);
    ``"log_loss"`` feeds grad log L, which stays of order one. An adaptive method's
    epsilon then matters: measured on a linear problem, Adam with ``"loss"`` stalled near
    GD's l2 direction once its gradient fell below Adam's eps (it becomes GD with a tiny
    step), while Adam and ``optax.sign_sgd`` with ``"log_loss"`` reached the l_inf
    max-margin direction (Zhang, Zou & Cao, NeurIPS 2024: Adam without eps maximizes the
    l_inf margin). Choose ``"log_loss"`` to study an optimizer's own geometry.
    T = sum eta uses the optimizer's ``learning_rate`` hyperparameter when it was built
    with ``optax.inject_hyperparams``, and counts steps (eta = 1) otherwise.
    ``name`` (e.g. "adam(learning_rate=0.001)") describes the optimizer in the run's
    metadata and messages (an optax transformation's repr is two function addresses).
    """
    if objective not in ("loss", "log_loss"):
        raise ValueError(f"objective must be 'loss' or 'log_loss', got {objective!r}")
    if not hasattr(optimizer, "init") or not hasattr(optimizer, "update"):
        raise ValueError(f"expected an optax GradientTransformation, got {optimizer!r}")
    return Policy("optax", lambda: (), lambda st, ll, t0, L: jnp.asarray(0.0),
                  lambda st, ok: st, optimizer=optimizer, objective=objective,
                  config={"optimizer": name or "an optax GradientTransformation",
                          "objective": objective})


def optax_log_lr(opt_state) -> jax.Array:
    """log of the injected learning rate in an optax state, or 0 (eta = 1) if none."""
    for node in jax.tree_util.tree_leaves(
            opt_state, is_leaf=lambda x: hasattr(x, "hyperparams")):
        if hasattr(node, "hyperparams") and "learning_rate" in node.hyperparams:
            return jnp.log(jnp.asarray(node.hyperparams["learning_rate"], jnp.float64))
    return jnp.asarray(0.0)


def estimate_smoothness_constants(problem: Problem, key, n_directions: int = 64,
                                  power_iterations: int = 20) -> dict:
    """Estimate B0, B1, B2 of Appendix E.2 by sampling unit directions.

    B0 = sup q_n, B1 = sup ||grad q_n||, B2 = sup ||hess q_n||_2 over the unit sphere; this
    returns the largest values seen over ``n_directions`` random directions (model init
    directions, normalized) and all n, the Hessian norm by power iteration. These are
    *lower* estimates of the suprema: a step size built from them is not a proof.
    """
    keys = jax.random.split(key, n_directions)

    def unit(k):
        p = problem.model.init(k)
        return jax.tree_util.tree_map(lambda x: x / global_norm(p), p)

    def q_n(p, n):
        return problem.margins(p)[n]

    def per_point(p, n, k):
        grad = jax.grad(q_n)(p, n)
        hvp = lambda v: jax.jvp(lambda z: jax.grad(q_n)(z, n), (p,), (v,))[1]
        v = jax.tree_util.tree_map(lambda x: jax.random.normal(k, x.shape), p)

        def power(_, v):
            w = hvp(v)
            nrm = global_norm(w)
            # a zero Hessian (e.g. a point where every unit is inactive) stays zero, not NaN
            return jax.tree_util.tree_map(lambda x: x / jnp.where(nrm > 0, nrm, 1.0), w)

        v = jax.lax.fori_loop(0, power_iterations, power, v)
        return global_norm(grad), global_norm(hvp(v))

    @jax.jit
    def one_direction(k):
        p = unit(k)
        n_idx = jnp.arange(problem.n)
        g, h = jax.vmap(per_point, (None, 0, None))(p, n_idx, k)
        return jnp.max(problem.margins(p)), jnp.max(g), jnp.max(h)

    vals = np.array([jax.device_get(one_direction(k)) for k in keys])
    B0, B1, B2 = vals.max(axis=0)
    return {"B0": float(B0), "B1": float(B1), "B2": float(B2), "estimate": True,
            "n_directions": n_directions,
            "note": "sampled lower estimates of the suprema in Appendix E.2, not bounds"}


# --- optimizer geometry (``homoflow.geometry``) ---------------------------------------------

class DecayingState(NamedTuple):
    log_lr: jax.Array
    power: jax.Array
    count: jax.Array


def decaying(lr: float, power: float = 0.5) -> Policy:
    """eta_k = lr / (k + 1)^power at accepted iteration k (power >= 0, traced)."""
    log_lr = math.log(_positive("learning rate lr", lr))
    power = float(power)
    if not (math.isfinite(power) and power >= 0):
        raise ValueError(f"power must be a finite number >= 0, got {power}")
    return Policy("decaying", lambda: DecayingState(jnp.asarray(log_lr), jnp.asarray(power),
                                                    jnp.asarray(0.0)),
                  lambda st, ll, t0, L: st.log_lr - st.power * jnp.log1p(st.count),
                  lambda st, ok: st._replace(count=st.count + ok.astype(st.count.dtype)),
                  config={"lr": lr, "power": power})


def normalized(alpha: float = 0.1) -> Policy:
    """Normalized GD: eta = alpha / L, i.e. theta <- theta - alpha grad log L, with alpha
    fixed (the loss-based scheduler without its growth or retries). On linear models the l2
    margin gap falls like 1/t (Ji & Telgarsky, ALT 2021; Ji, Srebro & Telgarsky 2021)."""
    log_alpha = math.log(_positive("alpha", alpha))
    return Policy("normalized", lambda: jnp.asarray(log_alpha),
                  lambda st, ll, t0, L: st - ll, lambda st, ok: st,
                  config={"alpha": alpha}, log_scale=lambda st, ll, t0, L: st)


class SteepestState(NamedTuple):
    step: Any          # the step-size policy's state
    inv_p: jax.Array   # 1/p (0 for p = inf), traced


def steepest(p, step: Policy | None = None) -> Policy:
    """Steepest descent w.r.t. the l_p norm, p in [1, inf]: the step
    theta <- theta - exp(log eta + log L) d(grad log L) with d of
    ``geometry.steepest_direction`` (p = 2: GD; inf: sign descent; 1: greedy coordinate
    descent) and eta from ``step`` (default ``loss_based()``; ``constant``, ``decaying``,
    ``normalized`` work too). Since d is 1-homogeneous, d(grad L) = L d(grad log L): the
    step is exact at any L. On linear models the direction converges to the l_p
    max-margin classifier (Gunasekar, Lee, Soudry & Srebro, ICML 2018)."""
    from .geometry import inv_p, steepest_direction
    ip = inv_p(p)
    step = loss_based() if step is None else step
    if step.optimizer is not None or step.direction is not None:
        raise ValueError(f"steepest needs a step-size policy (constant, decaying, normalized, "
                         f"loss_based, h_bound), got {step.name!r}")
    name = {0.0: "sign", 1.0: "coordinate", 0.5: "gd"}.get(ip, "lp")
    return Policy(f"{name}/{step.name}",
                  lambda: SteepestState(step.init(), jnp.asarray(ip)),
                  lambda st, ll, t0, L: step.log_lr(st.step, ll, t0, L),
                  lambda st, ok: st._replace(step=step.update(st.step, ok)),
                  retry=step.retry, max_retries=step.max_retries,
                  config={"p": float(p), "step": step.name, **step.config},
                  direction=lambda st, g: steepest_direction(g, st.inv_p),
                  log_scale=None if step.log_scale is None else
                  (lambda st, ll, t0, L: step.log_scale(st.step, ll, t0, L)),
                  limit=None if step.limit is None else
                  (lambda st, radial: st._replace(step=step.limit(st.step, radial))))


def sign_descent(step: Policy | None = None) -> Policy:
    """Steepest descent in l_inf: ||g||_1 sign(g) (``steepest(inf, step)``)."""
    return steepest(math.inf, step)


def coordinate_descent(step: Policy | None = None) -> Policy:
    """Steepest descent in l_1: greedy coordinate descent (``steepest(1, step)``)."""
    return steepest(1.0, step)


def dual_acceleration() -> Policy:
    """Ji, Srebro & Telgarsky's dual acceleration (``geometry.dual_acceleration``) on
    grad log L; T counts iterations."""
    from .geometry import dual_acceleration as transform
    return _named_optax("dual_acceleration", transform(), {})


def progressive_rescaling(lr: float = 0.5, radius0: float = 1.0, growth: float = 2.0,
                          period: int = 5) -> Policy:
    """Wang, Min & Wu's progressive rescaling GD (``geometry.progressive_rescaling``);
    T counts iterations."""
    from .geometry import progressive_rescaling as transform
    return _named_optax("progressive_rescaling", transform(lr, radius0, growth, period),
                        {"lr": lr, "radius0": radius0, "growth": growth, "period": period})


def _named_optax(name, transform, config) -> Policy:
    p = optax_optimizer(transform, objective="log_loss", name=name)
    return Policy(name, p.init, p.log_lr, p.update, optimizer=p.optimizer,
                  objective=p.objective, config=config)
