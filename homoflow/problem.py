"""A Problem binds a homogeneous model, a loss and a data set.

It exposes the pure functions every engine and diagnostic uses: margins q_n
(q_n = y_n Phi(x_n) binary; q_n = Phi_y - max_{j != y} Phi_j for C classes, Appendix F),
the loss margins q~_n the loss is applied to, and log L.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from .losses import Loss
from .models import Model, check_homogeneity


ENABLE_X64 = 'jax.config.update("jax_enable_x64", True)'


def require_float64(what: str) -> None:
    """Raise if JAX computes in float32 (``jax_enable_x64`` off): homoflow's guarantees
    (log L carried to 10^-800 and below, margins resolved to 1e-15 relative, the KKT
    residuals) hold only in float64, and without x64 every float64 array JAX makes is
    silently float32. homoflow never flips the setting itself (an import must not change
    a global of the process); the error names the one line that does."""
    if not jax.config.jax_enable_x64:
        raise RuntimeError(
            f"{what} needs float64, but JAX is in float32 mode (jax_enable_x64 is off): add "
            f"`{ENABLE_X64}` at the start of your program, before any JAX array is created "
            f"(or set the environment variable JAX_ENABLE_X64=1). The homoflow command, its "
            f"notebooks and tests do this for you.")


def class_gaps(outputs: jax.Array, y: jax.Array, fill=0.0):
    """(s, mask) for (N, C) outputs: s_nj = Phi_y - Phi_j (Appendix F), ``fill`` where j = y_n
    (0: nothing to add in a sum; inf: never the min), and the mask of j = y_n. The one home
    of the class-score gap: margins, losses, attacks and certificates build on it."""
    mask = jax.nn.one_hot(y, outputs.shape[1], dtype=bool)
    s = jnp.take_along_axis(outputs, y[:, None], axis=1) - outputs
    return jnp.where(mask, fill, s), mask


class Problem(eqx.Module):
    X: jax.Array
    y: jax.Array  # +-1 floats (binary) or int class indices
    model: Model = eqx.field(static=True)
    loss: Loss = eqx.field(static=True)

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def order(self) -> float:
        return self.model.order

    def outputs(self, params) -> jax.Array:
        return self.model.apply(params, self.X)

    def score_gaps(self, params):
        """(s, mask): s_nj = Phi_y - Phi_j (0 where j = y) and the mask of j = y_n."""
        return self.score_gaps_of(self.outputs(params))

    def score_gaps_of(self, out):
        """``score_gaps`` from the model's outputs ``out`` on X."""
        return class_gaps(out, self.y, 0.0)

    def margin_terms(self, params):
        """(q, q~, s_bar): margins, loss margins, and the softmin average of s_nj.

        For a binary model all three are y_n Phi(x_n). For C classes q_n = min_{j!=y} s_nj,
        q~_n = -LSE_{j!=y}(-s_nj) and s_bar_n = sum_{j!=y} softmax_j(-s_n) s_nj, so that
        <theta, grad q~_n> = L s_bar_n (Euler's theorem applied to each s_nj).
        """
        return self.margin_terms_of(self.outputs(params))

    def margin_terms_of(self, out):
        """``margin_terms`` from the model's outputs ``out`` on X."""
        if not self.model.multiclass:
            q = self.y * out
            return q, q, q
        s, mask = self.score_gaps_of(out)
        logits = jnp.where(mask, -jnp.inf, -s)  # masked entries never carry NaN gradients
        q_loss = -logsumexp(logits, axis=1)
        s_bar = jnp.sum(jax.nn.softmax(logits, axis=1) * s, axis=1)
        return jnp.min(jnp.where(mask, jnp.inf, s), axis=1), q_loss, s_bar

    def margins(self, params) -> jax.Array:
        return self.margin_terms(params)[0]

    def log_loss(self, params) -> jax.Array:
        return self.loss.log_loss(self.margin_terms(params)[1])

    def subset(self, idx) -> "Problem":
        return Problem(self.X[idx], self.y[idx], self.model, self.loss)


def make_problem(model: Model, loss: Loss, X, y, *, check: bool = True,
                 key: jax.Array | None = None, allow_nonhomogeneous: bool = False) -> Problem:
    """Validate the data and the model's declared order, then build a Problem.

    Raises ``ValueError`` naming the bad value: label values or shapes, NaN/inf in X, a
    model output shape that does not fit the labels, or (with ``check``) a declared
    order that ``check_homogeneity`` refutes on parameters from ``model.init``.

    A model marked ``homogeneous=False`` (a comparison model such as the CNN with every
    bias) is refused unless ``allow_nonhomogeneous=True``; the Problem then trains it, but
    no margin theorem applies to it (``problem.model.homogeneous`` says so) and its
    order is not checked.

    The data are stored in float64, which needs JAX's x64 mode: without it this raises a
    ``RuntimeError`` naming the line that enables it (``require_float64``).
    """
    require_float64("make_problem")
    if not model.homogeneous and not allow_nonhomogeneous:
        raise ValueError(f"model {model.name!r} is not homogeneous, so no margin theory "
                         f"applies; pass allow_nonhomogeneous=True to train it anyway")
    X = np.asarray(X)
    y = np.asarray(y)
    if X.ndim < 2:
        raise ValueError(f"X must have shape (N, ...) with N data points, got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(f"y must have shape (N,) = ({X.shape[0]},) to match X {X.shape}, "
                         f"got shape {y.shape}")
    if X.shape[0] == 0:
        raise ValueError("the data set is empty (N = 0)")
    if not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"X must be numeric, got dtype {X.dtype}")
    bad = ~np.isfinite(X)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"X contains {int(bad.sum())} non-finite values (NaN/inf), the first "
                         f"at index {where}: {X[where]}")
    if model.multiclass:
        C = model.n_outputs
        if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
            raise ValueError(f"multi-class labels must be integers in 0..{C - 1}, got "
                             f"{np.unique(y)[:10]}")
        wrong = np.unique(y[(y < 0) | (y >= C)])
        if wrong.size:
            raise ValueError(f"labels must be in 0..{C - 1} for a {C}-class model, got "
                             f"values {wrong[:10].tolist()}")
        y_arr = jnp.asarray(y.astype(np.int32))
    else:
        wrong = np.unique(y[(y != 1) & (y != -1)])
        if wrong.size:
            hint = " (map {0, 1} labels with y = 2 * y - 1)" if set(np.unique(y)) <= {0, 1} else ""
            raise ValueError(f"binary labels must be in {{-1, +1}}, got values "
                             f"{wrong[:10].tolist()}{hint}")
        y_arr = jnp.asarray(y.astype(np.float64))
    if loss.name == "cross_entropy" and not model.multiclass:
        raise ValueError("cross_entropy needs a multi-class model (n_outputs >= 2); use "
                         "the logistic loss for a binary model")
    X_arr = jnp.asarray(X, jnp.float64)
    params = model.init(jax.random.PRNGKey(0) if key is None else key)
    try:
        out = jax.eval_shape(model.apply, params, X_arr[:2])
    except (TypeError, ValueError) as e:
        raise ValueError(f"model {model.name!r} cannot be applied to inputs of shape "
                         f"{X.shape[1:]} (config {model.config}): {e}") from e
    k = min(2, X.shape[0])
    expected = (k,) if not model.multiclass else (k, model.n_outputs)
    if out.shape != expected:
        raise ValueError(f"model {model.name!r} returns shape {out.shape} on {k} inputs of shape "
                         f"{X.shape[1:]}; expected {expected}")
    if check and model.homogeneous:
        check_homogeneity(model, params, X_arr[: min(64, X.shape[0])])
    return Problem(X_arr, y_arr, model, loss)
