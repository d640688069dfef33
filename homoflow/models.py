"""Positively homogeneous models as pure ``init`` / ``apply`` pairs.

A model's parameters are a tuple of *groups* (each an array or a dict of arrays);
``layer_orders[i]`` is the degree k_i of homogeneity in group i, and ``order`` is
L = sum k_i (paper Section 4.4, Appendix G). ``apply(params, X)`` returns shape ``(N,)``
for a binary model (``n_outputs == 1``) and ``(N, C)`` for a C-class model.

Clarke selection. Gradients are whatever autodiff returns: ``jax.nn.relu`` has
derivative 0 at 0, leaky ReLU (``where(x >= 0, x, slope x)``) has derivative 1 at 0, and
max-pooling sends the cotangent to one maximal element of each window (XLA's
select-and-scatter picks the first maximum in window order). Each is an element of the
Clarke subdifferential, but rarely the one the theory needs. ``Model.kinks`` (``Kinks``,
set by ``mlp`` and ``cnn`` for ReLU and leaky ReLU) is the one home of a model's
non-smoothness (DESIGN §6): it names every activation kink (the zeros of each kinked
layer's pre-activations) and evaluates the model with any derivative chosen at each of
them, so the flow's sliding, the Clarke KKT residual, beta and the polish choose the
element they need instead of autodiff's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = tuple


@dataclass(frozen=True, eq=False)
class Model:
    """An L-homogeneous model: ``apply(c * params, X) == c**order * apply(params, X)``.

    ``eq=False`` makes models hash by identity, so they can be static jit arguments.
    ``init(key, scale=1.0)`` draws the parameters and multiplies every one by ``scale``
    (``with_init_scale``), so the outputs scale by ``scale**order``: the initialization
    scale of small-initialization experiments, for every model.
    """

    name: str
    init: Callable[[jax.Array], Params]
    apply: Callable[[Params, jax.Array], jax.Array]
    order: float
    layer_orders: tuple[float, ...]
    n_outputs: int = 1
    config: dict = field(default_factory=dict, compare=False)
    # where the model is non-smooth (``Kinks``); None: smooth, or kinks not declared
    kinks: Kinks | None = None
    # False for a comparison model that is *not* homogeneous (e.g. a CNN with every bias);
    # ``order`` is then only nominal and ``make_problem`` refuses it unless told otherwise
    homogeneous: bool = True

    def __post_init__(self):
        if not self.order > 0:
            raise ValueError(f"model {self.name!r}: order must be > 0, got {self.order}")
        if not math.isclose(sum(self.layer_orders), self.order, rel_tol=1e-12):
            raise ValueError(
                f"model {self.name!r}: layer_orders {self.layer_orders} sum to "
                f"{sum(self.layer_orders)}, not to the declared order {self.order}")
        if self.n_outputs < 1:
            raise ValueError(f"model {self.name!r}: n_outputs must be >= 1, got {self.n_outputs}")
        object.__setattr__(self, "init", with_init_scale(self.init))

    @property
    def multiclass(self) -> bool:
        return self.n_outputs > 1


def with_init_scale(init: Callable[[jax.Array], Params]) -> Callable[..., Params]:
    """``init(key, scale=1.0)``: ``init(key)`` with every parameter multiplied by ``scale``
    (a finite number > 0; 1 returns ``init(key)`` bitwise)."""
    if getattr(init, "_scaled", False):
        return init

    def scaled(key, scale: float = 1.0) -> Params:
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"init scale must be a finite number > 0, got {scale}")
        params = init(key)
        return params if scale == 1.0 else jax.tree_util.tree_map(lambda x: scale * x, params)

    scaled._scaled = True
    scaled.__doc__ = init.__doc__
    return scaled


class Activation(NamedTuple):
    name: str
    fn: Callable[[jax.Array], jax.Array]
    degree: float  # phi(c x) = c**degree phi(x) for c > 0
    # for a kink at 0: the Clarke derivative [lo, hi] there; None without a kink
    clarke: tuple[float, float] | None = None


class Kinks(NamedTuple):
    """Where a model is non-smooth: the kinks of its (leaky) ReLU activations (DESIGN §6).

    A *site* is one activation input: (kinked layer l, data point n, unit u). ``pre(params,
    X)`` returns the pre-activations of every kinked layer, a tuple of arrays shaped
    (N, ...); the kinks are their zeros. ``apply(params, X, slopes, offsets)`` is the
    model's ``apply`` with, at every site, the activation's derivative set to
    ``slopes[l][n, ...]`` where that entry is finite (its value unchanged; NaN: autodiff's
    derivative) and ``offsets[l][n, ...]`` added to the activation's output, so that
    d output / d offset is the cotangent e at the site. ``slopes`` and ``offsets`` are
    tuples with one entry per kinked layer, each an array of the layer's shape or a
    scalar (broadcast). At 0 the activation's Clarke derivative is [lo, hi].

    ``layers`` is the number of kinked layers. ``first_dense``: the first kinked layer's
    pre-activations are X.reshape(N, -1) @ W with W = params[0] (the first parameter
    leaf), a bias-free dense first layer, as the flow's sliding mode needs.
    ``exact``: every kink is in one hidden layer whose pre-activations are linear in
    parameter group 0 alone, and the output is a sum over units of functions of disjoint
    parameter blocks (a one-hidden-layer MLP). Then q_n's Clarke subdifferential is exactly
    {grad q_n with derivative sigma at its kinks : sigma in [lo, hi]^kinks}, affine in
    sigma (Clarke's calculus for separable sums; each unit a_j act(w_j . x) is regular in
    w_j), so KKT residuals over it are convex problems. Otherwise the backprop set over
    sigma is a conservative field whose convex hull contains the Clarke set (Bolte and
    Pauwels 2021): a bracket, not an equality (``homoflow.kkt``).
    """
    pre: Callable
    apply: Callable
    lo: float
    hi: float
    layers: int
    first_dense: bool = False
    exact: bool = False

    def none(self, params, X, fill=jnp.nan) -> tuple:
        """One array per kinked layer, shaped like its pre-activations, filled with
        ``fill`` (NaN slopes: autodiff's derivative everywhere)."""
        return tuple(jnp.full(z.shape, fill, z.dtype) for z in self.pre(params, X))


def _kinked(act: Activation, z, slope, offset):
    """act(z) with derivative ``slope`` where finite (value unchanged) plus ``offset``."""
    h = act.fn(z)
    fixed = jnp.isfinite(slope)
    d = jnp.where(fixed, slope, 0.0)  # no NaN in the branch where() discards
    return jnp.where(fixed, d * z + jax.lax.stop_gradient(h - d * z), h) + offset


def relu() -> Activation:
    return Activation("relu", jax.nn.relu, 1.0, (0.0, 1.0))


def leaky_relu(slope: float = 0.01) -> Activation:
    if not 0 <= slope < 1:
        raise ValueError(f"leaky_relu slope must be in [0, 1), got {slope}")
    return Activation(f"leaky_relu({slope})", lambda x: jnp.where(x >= 0, x, slope * x), 1.0,
                      (float(slope), 1.0))


def relu_power(alpha: float) -> Activation:
    """ReLU(x)**alpha: C^2-smooth for alpha > 2 (assumption (S1) of Section 4.1)."""
    if alpha < 1:
        raise ValueError(f"relu_power needs alpha >= 1 (Lipschitz), got {alpha}")
    return Activation(f"relu_power({alpha})", lambda x: jax.nn.relu(x) ** alpha, float(alpha))


def quadratic() -> Activation:
    return Activation("quadratic", lambda x: x * x, 2.0)


ACTIVATIONS = {"relu": relu, "leaky_relu": leaky_relu, "relu_power": relu_power,
               "quadratic": quadratic}


def _as_activation(activation) -> Activation:
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, str) and activation in ("relu", "quadratic"):
        return ACTIVATIONS[activation]()
    raise ValueError(f"unknown activation {activation!r}; use one of relu(), leaky_relu(slope), "
                     f"relu_power(alpha), quadratic() or the names 'relu', 'quadratic'")


def _squeeze_binary(out: jax.Array, n_outputs: int) -> jax.Array:
    return out[:, 0] if n_outputs == 1 else out


def _check_widths(widths: Sequence[int], what: str):
    if len(widths) < 2 or any(int(w) < 1 for w in widths):
        raise ValueError(f"{what}: widths must list >= 2 positive sizes (input, ..., output), "
                         f"got {tuple(widths)}")


def linear(dim: int, n_outputs: int = 1) -> Model:
    """Phi(w; x) = <w, x> (L = 1); the hard-margin SVM is its max-margin direction."""
    def init(key):
        return (jax.random.normal(key, (dim, n_outputs)) / math.sqrt(dim),)

    def apply(params, X):
        return _squeeze_binary(X.reshape(X.shape[0], -1) @ params[0], n_outputs)

    return Model("linear", init, apply, 1.0, (1.0,), n_outputs, {"dim": dim})


def mlp(widths: Sequence[int], activation="relu") -> Model:
    """Bias-free fully connected network W_D phi(... phi(W_1 x)).

    With an activation of degree a, group k (the k-th weight matrix, 1-based, D layers)
    is a**(D-k)-homogeneous and L = sum_k a**(D-k) (L = D for ReLU and leaky ReLU).
    """
    _check_widths(widths, "mlp")
    act = _as_activation(activation)
    depth = len(widths) - 1
    orders = tuple(act.degree ** (depth - k) for k in range(1, depth + 1))
    gain = math.sqrt(2.0) if act.degree == 1.0 else 1.0  # He-normal for (leaky) ReLU

    def init(key):
        keys = jax.random.split(key, depth)
        return tuple(gain * jax.random.normal(k, (m, n)) / math.sqrt(m)
                     for k, m, n in zip(keys, widths[:-1], widths[1:]))

    def apply(params, X):
        h = X.reshape(X.shape[0], -1)
        for W in params[:-1]:
            h = act.fn(h @ W)
        return _squeeze_binary(h @ params[-1], widths[-1])

    kinks = None
    if act.clarke is not None and depth >= 2:
        def pre(params, X):
            h, zs = X.reshape(X.shape[0], -1), []
            for W in params[:-1]:
                zs.append(h @ W)
                h = act.fn(zs[-1])
            return tuple(zs)

        def apply_kinks(params, X, slopes, offsets):
            h = X.reshape(X.shape[0], -1)
            for W, slope, offset in zip(params[:-1], slopes, offsets):
                h = _kinked(act, h @ W, slope, offset)
            return _squeeze_binary(h @ params[-1], widths[-1])

        kinks = Kinks(pre, apply_kinks, act.clarke[0], act.clarke[1], depth - 1,
                      first_dense=True, exact=depth == 2)
    return Model(f"mlp[{act.name}]", init, apply, float(sum(orders)), orders, widths[-1],
                 {"widths": tuple(widths), "activation": act.name}, kinks=kinks)


def deep_linear(widths: Sequence[int]) -> Model:
    """Fully connected linear network W_D ... W_1 x (L = D)."""
    _check_widths(widths, "deep_linear")
    depth = len(widths) - 1

    def init(key):
        keys = jax.random.split(key, depth)
        return tuple(jax.random.normal(k, (m, n)) / math.sqrt(m)
                     for k, m, n in zip(keys, widths[:-1], widths[1:]))

    def apply(params, X):
        h = X.reshape(X.shape[0], -1)
        for W in params:
            h = h @ W
        return _squeeze_binary(h, widths[-1])

    return Model("deep_linear", init, apply, float(depth), (1.0,) * depth, widths[-1],
                 {"widths": tuple(widths)})


def diagonal_linear(dim: int, depth: int) -> Model:
    """Diagonal linear network <u_1 * ... * u_depth, x> (elementwise product, L = depth)."""
    if depth < 1 or dim < 1:
        raise ValueError(f"diagonal_linear needs dim >= 1 and depth >= 1, got {dim}, {depth}")
    scale = dim ** (-0.5 / depth)

    def init(key):
        return tuple(scale * jax.random.normal(k, (dim,)) for k in jax.random.split(key, depth))

    def apply(params, X):
        w = params[0]
        for u in params[1:]:
            w = w * u
        return X.reshape(X.shape[0], -1) @ w

    return Model("diagonal_linear", init, apply, float(depth), (1.0,) * depth, 1,
                 {"dim": dim, "depth": depth})


def conv_same(h, W):
    """XLA's stride-1 SAME convolution of h (N, *spatial, C) by W (*kernel, C, C_out): NHWC /
    HWIO in 2-D, NWC / WIO in 1-D, with autodiff's derivatives (the CNN uses ``_conv_same``,
    the same map with a faster W-derivative)."""
    dims = h.ndim - 2
    spec = ("NHWC", "HWIO", "NHWC") if dims == 2 else ("NWC", "WIO", "NWC")
    return jax.lax.conv_general_dilated(h, W, (1,) * dims, "SAME", dimension_numbers=spec)


def _windows(h, ks):
    """The stride-1 SAME windows of h (N, *spatial, C) for kernel sizes ks: (offset, view)
    pairs, view = the padded h shifted by offset, of h's shape, in the row-major order of
    the kernel's offsets (XLA's SAME: the odd padding cell goes after)."""
    pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) for k in ks]
    hp = jnp.pad(h, ((0, 0), *pads, (0, 0)))
    sizes = h.shape[1:-1]
    return [(off, hp[(slice(None),) + tuple(slice(o, o + n) for o, n in zip(off, sizes))])
            for off in itertools.product(*(range(k) for k in ks))]


@jax.custom_jvp
def _conv_same(h, W):
    """``conv_same`` (NHWC / HWIO, or NWC / WIO) whose derivative in W is a matmul of
    shifted windows. Mathematically XLA's own; the reason is speed: XLA-CPU runs
    the filter-gradient convolution that autodiff makes ~5-9x slower inside a while loop
    (every descent engine's loop) than at top level (measured, jaxlib 0.10.2, the quick
    paper-CNN: a 3 x 3 x 4 x 8 filter's gradient over 100 images of 16 x 16 x 4 took 99 ms
    in a loop against 13.5 ms at top level; the matmul form takes 10.5 ms in the loop),
    while forward and input-gradient convolutions keep their speed."""
    return conv_same(h, W)


def _conv_same_jvp(primals, tangents):
    h, W = primals
    dh, dW = tangents
    y = conv_same(h, W)
    dy = None
    if not isinstance(dh, jax.custom_derivatives.SymbolicZero):
        dy = conv_same(dh, W)
    if not isinstance(dW, jax.custom_derivatives.SymbolicZero):
        # one matmul per kernel offset, summed: its transpose (the W-gradient) is one
        # (C, N*HW) x (N*HW, C_out) product per offset. Stacking the windows into one
        # (N, HW, prod(kernel), C) operand instead cost 1.19x the whole SGD epoch
        # (paper-CNN, widths (4, 8, 32), 4 000 MNIST images; XLA-CPU's stack of 25 shifted
        # views of the 32 x 32 input was the largest single op of the step)
        for off, view in _windows(h, W.shape[:-2]):
            term = jnp.einsum("...c,co->...o", view, dW[off])
            dy = term if dy is None else dy + term
    return y, jnp.zeros_like(y) if dy is None else dy


_conv_same.defjvp(_conv_same_jvp, symbolic_zeros=True)


def cnn(input_shape: Sequence[int], channels: Sequence[int] = (8, 16), kernel=3,
        pool: int = 2, hidden: int = 32, n_outputs: int = 1, bias_first: bool = False,
        activation="relu", all_biases: bool = False) -> Model:
    """Bias-free CNN: [conv -> act -> max-pool] * len(channels) -> dense -> act -> dense.

    ``bias_first=True`` adds a bias to the first convolution only (the paper's "CNN
    without bias", Appendix J): the bias belongs to the first parameter group, so the
    model stays homogeneous in its parameters. Every group is 1-homogeneous for ReLU
    (max-pooling is 1-homogeneous), so L = number of weight layers.

    ``kernel`` is one size for every convolution or one per convolution (Appendix J uses
    5 x 5 then 3 x 3). ``input_shape=(W,)`` gives a 1-D CNN (e.g. for MNIST-1D).
    ``all_biases=True`` gives every layer a bias (the paper's "CNN with bias", for
    comparison): that model is *not* homogeneous, is marked ``homogeneous=False``, and its
    ``order`` (the number of layers) holds only at zero biases. Weights are He-normal,
    biases start at zero.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) in (1, 2):
        shape = shape + (1,)  # (W,) sequence or (H, W) image, one channel
    if len(shape) != 3 and not (len(input_shape) == 1 and len(shape) == 2):
        raise ValueError(f"cnn input_shape must be (W,), (H, W) or (H, W, C), got "
                         f"{tuple(input_shape)}")
    dims = len(shape) - 1
    act = _as_activation(activation)
    if act.degree != 1.0:
        raise ValueError(f"cnn supports degree-1 activations (relu, leaky_relu), got {act.name}")
    kernels = (int(kernel),) * len(channels) if isinstance(kernel, int) else tuple(kernel)
    if len(kernels) != len(channels) or min(kernels) < 1:
        raise ValueError(f"cnn: kernel must be a positive size or one per convolution "
                         f"({len(channels)}), got {kernel}")
    spatial, cin = list(shape[:-1]), shape[-1]
    for _ in channels:
        spatial = [s // pool for s in spatial]
    if min(spatial) < 1:
        raise ValueError(f"input {shape} is too small for {len(channels)} pooling layers of {pool}")
    flat = int(np.prod(spatial)) * channels[-1]
    n_groups = len(channels) + 2
    orders = (1.0,) * n_groups
    window = (1,) + (pool,) * dims + (1,)

    def max_pool(h):
        return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, window, window, "VALID")

    def init(key):
        keys = jax.random.split(key, n_groups)
        groups, c_prev = [], cin
        for k, c, ks in zip(keys, channels, kernels):
            fan_in = ks ** dims * c_prev
            groups.append(math.sqrt(2.0 / fan_in)
                          * jax.random.normal(k, (ks,) * dims + (c_prev, c)))
            c_prev = c
        groups.append(math.sqrt(2.0 / flat) * jax.random.normal(keys[-2], (flat, hidden)))
        groups.append(math.sqrt(2.0 / hidden) * jax.random.normal(keys[-1], (hidden, n_outputs)))
        with_bias = range(n_groups) if all_biases else (0,) if bias_first else ()
        for i in with_bias:
            groups[i] = {"w": groups[i], "b": jnp.zeros(groups[i].shape[-1])}
        return tuple(groups)

    def layer(g, h, op):
        return op(h, g["w"]) + g["b"] if isinstance(g, dict) else op(h, g)

    def forward(params, X, slopes, offsets):
        h, zs = X.reshape((X.shape[0],) + shape), []
        for i in range(len(channels)):
            zs.append(layer(params[i], h, _conv_same))
            h = max_pool(_kinked(act, zs[-1], slopes[i], offsets[i]))
        zs.append(layer(params[-2], h.reshape(h.shape[0], -1), jnp.matmul))
        h = _kinked(act, zs[-1], slopes[-1], offsets[-1])
        return _squeeze_binary(layer(params[-1], h, jnp.matmul), n_outputs), tuple(zs)

    n_kinked = len(channels) + 1
    autodiff = (jnp.nan,) * n_kinked

    def apply(params, X):
        return forward(params, X, autodiff, (0.0,) * n_kinked)[0]

    # max-pool ties are not declared: a tie between positive activations is a kink of the
    # max, whose Clarke set is a simplex, not an interval (autodiff's element is used there)
    kinks = None if act.clarke is None else Kinks(
        lambda params, X: forward(params, X, autodiff, (0.0,) * n_kinked)[1],
        lambda params, X, slopes, offsets: forward(params, X, slopes, offsets)[0],
        act.clarke[0], act.clarke[1], n_kinked)
    return Model("cnn_all_biases" if all_biases else "cnn", init, apply, float(n_groups),
                 orders, n_outputs,
                 {"input_shape": shape, "channels": tuple(channels), "kernel": kernels,
                  "pool": pool, "hidden": hidden, "bias_first": bias_first or all_biases,
                  "all_biases": all_biases},
                 kinks=kinks, homogeneous=not all_biases)


PAPER_CNN_WIDTHS = (32, 64, 1024)


def paper_cnn(bias: str = "first", widths: Sequence[int] = PAPER_CNN_WIDTHS,
              input_shape: Sequence[int] = (32, 32, 1), n_outputs: int = 10) -> Model:
    """Appendix J's MNIST CNN (the MNIST Adversarial Examples Challenge model): conv-32
    5 x 5, max-pool, conv-64 3 x 3, max-pool, fc-1024, fc-10, ReLU, SAME padding, 2 x 2
    pools, He-normal weights, zero biases, on 32 x 32 images.

    ``bias="first"``: the paper's "CNN without bias" (only the first convolution keeps its
    bias, so the model is (1, 1, 1, 1)-homogeneous in its four layers, L = 4).
    ``bias="all"``: the "CNN with bias" (not homogeneous; ``homogeneous=False``).
    ``widths=(c1, c2, hidden)`` narrows the layers (same structure, kernels and inputs).
    """
    if bias not in ("first", "all"):
        raise ValueError(f"paper_cnn bias must be 'first' (CNN without bias) or 'all' (CNN "
                         f"with bias), got {bias!r}")
    widths = tuple(int(w) for w in widths)
    if len(widths) != 3 or min(widths) < 1:
        raise ValueError(f"paper_cnn widths must be three positive sizes (conv 1, conv 2, "
                         f"dense), got {widths}")
    return cnn(input_shape, channels=widths[:2], kernel=(5, 3), pool=2, hidden=widths[2],
               n_outputs=n_outputs, bias_first=True, all_biases=bias == "all")


def mexican_hat_params(r: float = 0.5) -> Params:
    """Theorem I.1's initial condition: unit theta with 0 < r < 1 and phi = 1/(1 - r^2)."""
    if not 0 < r < 1:
        raise ValueError(f"mexican hat initial radius must be in (0, 1), got {r}")
    phi = 1.0 / (1.0 - r * r)
    return (jnp.array([r * math.cos(phi), r * math.sin(phi), math.sqrt(1.0 - r * r)]),)


def mexican_hat(L: float = 2.0, r0: float = 0.5, paper_c: bool = False) -> Model:
    """Appendix I: h(x, y, z) = rho^L (1 - f(x/rho, y/rho)), f a Mexican hat
    f = exp(-1/(1-r^2)) (1 - C(r) sin(phi - 1/(1-r^2))) for r < 1, 0 otherwise.

    Every data point has margin q_n = h(theta) (the output ignores X). ``init`` ignores its
    key and returns Theorem I.1's initial condition with radius ``r0``.

    C(r). The paper takes Absil et al.'s C(r) = 4r^4 / (4r^4 + (1-r^2)^4) (``paper_c=True``).
    For the homogeneous model, though, dr/dt carries a factor (1 - r^2) from the projection
    onto the sphere (Appendix I's own formula for dr/dt), which the proof's d psi/dt drops;
    keeping it, psi = phi - 1/(1-r^2) = 0 is invariant exactly when
    C(r) = 4r^4 / (4r^4 + (1-r^2)^3), the default here. With the paper's C, autodiff gives
    d psi/dt = 0.116 at the initial point (r = 0.5, L = 2), so psi does not stay 0.
    """
    power = 4.0 if paper_c else 3.0
    def hat(u, v):
        r2 = u * u + v * v
        s = 1.0 - r2
        inside = s > 0
        s_safe = jnp.where(inside, s, 1.0)
        a = 1.0 / s_safe
        r = jnp.sqrt(jnp.where(r2 > 0, r2, 1.0))
        # C(r) sin(phi - a) = 4 r^3 (v cos a - u sin a) / (4 r^4 + s^power), smooth at r = 0
        c_sin = (4.0 * r2 * r * (v * jnp.cos(a) - u * jnp.sin(a))
                 / (4.0 * r2 * r2 + s_safe ** power))
        c_sin = jnp.where(r2 > 0, c_sin, 0.0)
        return jnp.where(inside, jnp.exp(-a) * (1.0 - c_sin), 0.0)

    def apply(params, X):
        theta = params[0]
        rho = jnp.sqrt(jnp.sum(theta * theta))
        out = rho ** L * (1.0 - hat(theta[0] / rho, theta[1] / rho))
        return jnp.broadcast_to(out, (X.shape[0],))

    return Model("mexican_hat", lambda key: mexican_hat_params(r0), apply, float(L), (float(L),),
                 1, {"L": L, "r0": r0, "paper_c": paper_c})


def homogeneous_model(apply: Callable, init: Callable, order: float,
                      layer_orders: Sequence[float] | None = None, n_outputs: int = 1,
                      name: str = "custom") -> Model:
    """Wrap a user's pure function; ``check_homogeneity`` verifies the declared orders.

    ``init(key)`` must return a tuple of parameter groups, one per entry of
    ``layer_orders`` (default: one group of order ``order``).
    """
    orders = (float(order),) if layer_orders is None else tuple(float(k) for k in layer_orders)
    return Model(name, init, apply, float(order), orders, n_outputs)


# ---------------------------------------------------------------------------------------
# Measuring homogeneity


class HomogeneityError(ValueError):
    """The measured order of homogeneity differs from the declared one."""


class HomogeneityReport(NamedTuple):
    order: float
    layer_orders: tuple[float, ...]
    max_rel_error: float  # largest |measured - declared| / declared over all checks


def _measured_degree(out0, out1, c, what):
    out0, out1 = np.asarray(out0, np.float64).ravel(), np.asarray(out1, np.float64).ravel()
    if not (np.all(np.isfinite(out0)) and np.all(np.isfinite(out1))):
        raise HomogeneityError(f"{what}: the model returned non-finite outputs")
    scale = np.max(np.abs(out0))
    usable = np.abs(out0) > 1e-8 * scale
    if scale == 0 or not usable.any():
        raise HomogeneityError(f"{what}: every output is 0, so the order cannot be measured; "
                               f"use other parameters or inputs")
    ratio = out1[usable] / out0[usable]
    if np.any(ratio <= 0):
        raise HomogeneityError(f"{what}: scaling by {c} changed the sign of an output "
                               f"(ratio {ratio[ratio <= 0][0]:.3g}), so the model is not "
                               f"positively homogeneous")
    degrees = np.log(ratio) / math.log(c)
    # the degree with the largest deviation from the median tells most about a failure
    return degrees[np.argmax(np.abs(degrees - np.median(degrees)))]


def check_homogeneity(model: Model, params: Params, X, *, rtol: float = 1e-9,
                      scales: Sequence[float] = (2.0, 3.0)) -> HomogeneityReport:
    """Measure the order L (and each group's k_i) from Phi(c theta) / Phi(theta).

    Raises ``HomogeneityError`` naming the declared and measured values if any measured
    degree differs from the declared one by more than ``rtol`` (relative).
    """
    X = jnp.asarray(X)
    if len(params) != len(model.layer_orders):
        raise HomogeneityError(
            f"model {model.name!r} declares {len(model.layer_orders)} parameter groups "
            f"(layer_orders={model.layer_orders}) but its params have {len(params)}")
    apply = jax.jit(model.apply)
    base = apply(params, X)
    worst, measured_total, measured_layers = 0.0, None, []

    def check(measured, declared, what):
        nonlocal worst
        err = abs(measured - declared) / declared
        worst = max(worst, err)
        if err > rtol:
            raise HomogeneityError(
                f"{what}: declared {declared:g} but measured {measured:.10g} "
                f"(relative error {err:.2e} > {rtol:g})")
        return measured

    for c in scales:
        scaled = jax.tree_util.tree_map(lambda p: c * p, params)
        measured_total = check(_measured_degree(base, apply(scaled, X), c,
                                                f"model {model.name!r} order"),
                               model.order, f"model {model.name!r} order")
    for i, k in enumerate(model.layer_orders):
        c = scales[0]
        scaled = tuple(jax.tree_util.tree_map(lambda p: c * p, g) if j == i else g
                       for j, g in enumerate(params))
        what = f"model {model.name!r} parameter group {i} (layer order k_{i})"
        measured_layers.append(check(_measured_degree(base, apply(scaled, X), c, what), k, what))
    return HomogeneityReport(float(measured_total), tuple(float(m) for m in measured_layers),
                             float(worst))
