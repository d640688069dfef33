"""One configuration schema for ``homoflow run``, ``homoflow sweep``, TOML grids and
``run --config FILE``: the names, types, defaults, choices and checks of the models, data,
losses and policies, and the factories that build them (DESIGN: one home per formula).

A *configuration* is a flat dict keyed by ``OPTIONS``' names. ``resolve`` fills the
defaults, reads a user's data file for its shape, checks every value and every
combination (``--depth`` per model, ``--loss`` per data, a policy's hyperparameters) and
returns the complete configuration, or raises ``ValueError`` naming the bad key and
value. It is pure Python (no JAX), so the CLI refuses bad input before any set-up.
``build_model``, ``load_data``, ``build_policy`` turn a resolved configuration into
homoflow objects (these import JAX).

``homoflow run`` uses ``OPTIONS``' defaults; a sweep multiplies configurations, so its
grids start from ``SWEEP_DEFAULTS``: the same schema with a smaller problem and the
constant step (vmappable and cheap), listed in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODELS = ("mlp", "linear", "deep_linear", "diagonal_linear")
ACTIVATIONS = ("relu", "leaky_relu", "relu_power", "quadratic")
LOSSES = ("cross_entropy", "exponential", "logistic")           # = sorted(losses.LOSSES)
DATASETS = ("gaussian_classes", "separable")                      # = sorted(data.DATASETS)
OPTAX = ("adam", "rmsprop", "adagrad", "sign_sgd", "sgd_optax")
STEEPEST = {"sign": math.inf, "coordinate": 1.0, "lp": None}       # None: the config's p
STEP_RULES = ("loss_based", "normalized", "constant")
POLICIES = ("loss_based", "constant", "h_bound", "normalized", *STEEPEST, "dual_acceleration",
            "progressive_rescaling", *OPTAX)
# the policies a sweep can vmap over their hyperparameters, and the keys each one reads
POLICY_KEYS = {"constant": ("lr",), "loss_based": ("alpha0", "r_u", "r_d"),
               "h_bound": ("lr", "c_eta", "fraction"), "normalized": ("alpha0",)}
SWEEP_POLICIES = (*POLICY_KEYS, *STEEPEST)
DATA_SUFFIXES = (".npz", ".npy", ".csv")


@dataclass(frozen=True)
class Option:
    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    check: str | None = None     # "positive", "nonnegative", ">=1", ">=2", ">1", "p"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_O = Option
OPTIONS: dict[str, Option] = {o.name: o for o in (
    _O("engine", str, "descent", "gradient descent, or gradient flow (diffrax, then log-polar "
       "time)", ("descent", "flow")),
    _O("model", str, "mlp", "model family", MODELS),
    _O("activation", str, "relu", "mlp activation", ACTIVATIONS),
    _O("slope", float, 0.1, "leaky_relu slope, in [0, 1)"),
    _O("alpha_power", float, 3.0, "exponent of relu_power (>= 1; smooth for > 2)"),
    _O("depth", int, None, "number of weight layers (mlp, deep_linear: default 2; "
       "diagonal_linear: default 2; linear: 1 only)", check=">=1"),
    _O("width", int, 100, "hidden width (mlp, deep_linear)", check=">=1"),
    _O("loss", str, "exponential", "loss function (cross_entropy needs several classes)",
       LOSSES),
    _O("data", str, "separable", "separable: Gaussian points labelled by a hyperplane; "
       "gaussian_classes: --classes Gaussian clusters (ignored with --data-file)", DATASETS),
    _O("data_file", str, None, "your own data: .npz with arrays X and y, or .npy / .csv with "
       "the label in the last column (labels +-1: binary; 0..K-1: K classes)"),
    _O("n", int, 100, "number of data points", check=">=1"),
    _O("dim", int, 10, "input dimension", check=">=1"),
    _O("classes", int, 3, "classes of gaussian_classes", check=">=2"),
    _O("data_seed", int, 0, "seed of the data", check="nonnegative"),
    _O("seed", int, 0, "seed of the initialization", check="nonnegative"),
    _O("init_scale", float, 1.0, "multiply every initial parameter by this (the outputs "
       "scale by its L-th power): small- or large-initialization experiments",
       check="positive"),
    _O("policy", str, "loss_based",
       "step sizes: loss_based (eta = alpha/L, Appendix K.1), constant (--lr), h_bound "
       "(eta = H(L), Appendix E.1, needs --c-eta), normalized (eta = alpha0/L fixed); "
       "steepest descent in a norm: sign (l_inf), coordinate (l1), lp (--p), each with "
       "--step; the fast margin maximizers dual_acceleration and progressive_rescaling "
       "(--lr: its step); or an optax optimizer (adam, rmsprop, adagrad, sign_sgd, "
       "sgd_optax) with --lr and --objective", POLICIES),
    _O("step", str, "loss_based", "sign, coordinate, lp: their step rule", STEP_RULES),
    _O("p", float, 2.0, "lp: the norm of steepest descent, in [1, inf]", check="p"),
    _O("objective", str, "loss", "optax optimizers: minimize L or log L (log_loss keeps the "
       "gradient of order one, so an adaptive method's eps does not turn it into GD)",
       ("loss", "log_loss")),
    _O("margin_norm", float, None, "also record the margins in this l_p norm", check="p"),
    _O("lr", float, 1e-4, "constant step; h_bound: step before t0; optax and "
       "progressive_rescaling: learning rate", check="positive"),
    _O("alpha0", float, 0.1, "loss_based / normalized: initial alpha", check="positive"),
    _O("r_u", float, 2 ** (1 / 5), "loss_based: growth factor of alpha", check=">1"),
    _O("r_d", float, 2 ** (1 / 10), "loss_based: back-off factor of alpha", check=">1"),
    _O("max_retries", int, 1000, "loss_based: consecutive failed attempts before 'stalled'",
       check=">=1"),
    _O("c_eta", str, None, "h_bound: C_eta of the H(L) bound (a number), or 'estimate' for "
       "sampled B0, B1, B2"),
    _O("fraction", float, 1.0, "h_bound: eta = fraction * H(L)", check="positive"),
    _O("steps", int, 10_000, "iterations (GD steps, or SGD epochs with --batch-size)",
       check=">=1"),
    _O("batch_size", int, None, "mini-batch size for SGD (default: full batch)", check=">=1"),
    _O("n_records", int, 200, "recorded points (log-spaced)", check=">=2"),
    _O("log_t_max", float, 100.0, "flow: stop at this log t (natural log of time)",
       check="positive"),
    _O("n_saves", int, 200, "flow: saved points", check=">=2"),
    _O("h_max", float, 0.01, "flow: largest step in tau = log rho", check="positive"),
    _O("max_steps", int, 1_000_000, "flow: solver step budget", check=">=1"),
    _O("chunk", int, 2000, "descent: iterations per compiled call between checks",
       check=">=1"),
    _O("divergence_factor", float, 1e4, "descent: stop when L exceeds this times its "
       "smallest value", check=">1"),
    _O("t0_log_loss", float, None, "descent: t0 is the first iterate with log L below this "
       "(default log l(b_f))"),
)}
# the keys of a sweep's grid (the others are not vmapped or have no batched engine)
SWEEP_KEYS = ("engine", "model", "activation", "slope", "alpha_power", "depth", "width", "loss",
              "data", "data_file", "n", "dim", "classes", "data_seed", "seed", "init_scale",
              "policy", "step",
              "p", "lr", "alpha0", "r_u", "r_d", "c_eta", "fraction", "max_retries", "steps",
              "n_records", "chunk", "divergence_factor", "t0_log_loss", "log_t_max", "n_saves",
              "h_max", "max_steps")

# the problem a sweep's grid starts from (every other key: OPTIONS' default)
SWEEP_DEFAULTS = {"width": 16, "n": 32, "dim": 5, "policy": "constant", "lr": 0.1,
                  "c_eta": "estimate", "steps": 1000, "n_records": 50, "log_t_max": 20.0,
                  "n_saves": 50, "max_steps": 100_000, "chunk": 20_000}


def defaults(sweep: bool = False) -> dict:
    """Every option's default (``sweep``: a sweep grid's, over ``SWEEP_KEYS`` only)."""
    if sweep:
        return {k: SWEEP_DEFAULTS.get(k, OPTIONS[k].default) for k in SWEEP_KEYS}
    return {k: o.default for k, o in OPTIONS.items()}


def default_depth(model: str) -> int:
    return 1 if model == "linear" else 2


# ---------------------------------------------------------------------------------------
# checking


def _bad(name: str, value, why: str, hint: str = "") -> ValueError:
    flag = f" (option {OPTIONS[name].flag})" if name in OPTIONS else ""
    return ValueError(f"{name} {why}, got {value!r}{hint}{flag}")


def check_value(name: str, value) -> Any:
    """``value`` converted to the option's type and checked; ``ValueError`` otherwise."""
    if name not in OPTIONS:
        raise ValueError(f"unknown option {name!r}; known: {', '.join(sorted(OPTIONS))}")
    o = OPTIONS[name]
    if value is None:
        return None
    if name == "c_eta":
        return _c_eta(value)
    if o.type is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _bad(name, value, "must be an integer")
        try:
            v = int(value)
        except ValueError:
            raise _bad(name, value, "must be an integer") from None
        if isinstance(value, float) and v != value:
            raise _bad(name, value, "must be an integer")
    elif o.type is float:
        if isinstance(value, bool):
            raise _bad(name, value, "must be a number")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise _bad(name, value, "must be a number") from None
        if math.isnan(v):
            raise _bad(name, value, "must be a number, not NaN")
    else:
        if not isinstance(value, str):
            raise _bad(name, value, "must be a string")
        v = value
    if o.choices is not None and v not in o.choices:
        raise _bad(name, value, f"must be one of {', '.join(o.choices)}")
    c = o.check
    if c == "positive" and not (v > 0 and math.isfinite(v)):
        raise _bad(name, value, "must be a finite number > 0")
    if c == "nonnegative" and v < 0:
        raise _bad(name, value, "must be >= 0")
    if c in (">=1", ">=2") and v < int(c[2:]):
        raise _bad(name, value, f"must be {c[:2]} {c[2:]}")
    if c == ">1" and not (v > 1 and math.isfinite(v)):
        raise _bad(name, value, "must be a finite number > 1")
    if c == "p" and not v >= 1:
        raise _bad(name, value, "must be in [1, inf]")
    return v


def _c_eta(value):
    if value is None or value == "estimate":
        return value
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise _bad("c_eta", value, "must be a finite number > 0", " (or 'estimate')") from None
    if not (v > 0 and math.isfinite(v)):
        raise _bad("c_eta", value, "must be a finite number > 0", " (or 'estimate')")
    return v


_SHAPES: dict = {}   # data file -> (n, dim, classes or None), read once


def data_file_shape(path: str, loss: str | None = None) -> tuple[int, int, int | None]:
    """(N, d, number of classes or None for binary labels) of a data file."""
    X, y = read_data_file(path, loss)
    return len(y), int(X.reshape(len(X), -1).shape[1]), (None if set(y.tolist()) <= {-1, 1}
                                                         else int(y.max()) + 1)


def resolve(config: dict, *, sweep: bool = False, given: set | None = None) -> dict:
    """The complete, checked configuration: defaults filled in (``sweep``: the sweep's),
    model-dependent defaults resolved, the data file's shape read. ``given`` names the keys
    the user set explicitly (for checks such as ``--depth`` with ``--model linear``);
    default: the keys of ``config``."""
    given = set(config) if given is None else set(given)
    c = defaults(sweep)
    unknown = sorted(set(config) - set(c))
    if unknown:
        raise ValueError(f"unknown {'grid' if sweep else 'configuration'} keys {unknown}; "
                         f"known: {sorted(c)}")
    for k, v in config.items():
        if k in ("model", "data") and callable(v):   # a sweep's own model or data set
            c[k] = v
        elif k == "data" and v == "file" and config.get("data_file"):   # a resolved config
            c[k] = v
        else:
            c[k] = check_value(k, v)
    if c["depth"] is None:
        c["depth"] = default_depth(c["model"])
    if c["model"] == "linear" and c["depth"] != 1 and not callable(c["model"]):
        raise _bad("depth", c["depth"], "must be 1 for the linear model (one layer; "
                   "--model deep_linear is a product of layers)")
    if "activation" in given and c["model"] != "mlp" and c["activation"] != "relu":
        raise _bad("activation", c["activation"], f"applies to --model mlp only, not "
                   f"{c['model']}")
    if c["data_file"] is not None:
        n, dim, classes = data_file_shape(c["data_file"], c["loss"])
        c.update(n=n, dim=dim, data="file")
        c["classes"] = classes if classes is not None else 2
        binary = classes is None
    else:
        binary = c["data"] != "gaussian_classes"
    if c["loss"] == "cross_entropy" and binary:
        raise _bad("loss", "cross_entropy", "needs several classes (--data "
                   "gaussian_classes, or a data file with labels 0..K-1)")
    if c["loss"] != "cross_entropy" and not binary:
        raise _bad("loss", c["loss"], "must be cross_entropy for several classes")
    if c["model"] == "diagonal_linear" and not binary:
        raise _bad("model", "diagonal_linear", "needs binary data (it has one output)")
    if c.get("batch_size") is not None and c["batch_size"] > c["n"]:
        raise _bad("batch_size", c["batch_size"], f"must be <= N = {c['n']} data points")
    if c["engine"] == "descent":
        pol = c["policy"]
        if pol == "h_bound" and c["c_eta"] is None:
            raise _bad("c_eta", None, "must be given for --policy h_bound (a number, or "
                       "'estimate')")
        if sweep and pol not in SWEEP_POLICIES:
            raise _bad("policy", pol, f"must be one of {', '.join(SWEEP_POLICIES)} in a sweep "
                       f"(the others are not vmappable; use homoflow run)")
        if c.get("batch_size") is not None and pol in OPTAX:
            raise _bad("batch_size", c["batch_size"], "must be unset for optax policies "
                       "(they run full-batch)")
    elif c.get("batch_size") is not None:
        raise _bad("batch_size", c["batch_size"], "must be unset for the flow engine")
    return c


def policy_keys(c: dict) -> tuple:
    """The keys a configuration's policy reads (steepest descent: its step rule's and, for
    lp, p)."""
    if c["policy"] in STEEPEST:
        return POLICY_KEYS.get(c["step"], ()) + (("p",) if c["policy"] == "lp" else ())
    return POLICY_KEYS.get(c["policy"], ())


def read_toml(path) -> dict:
    """A TOML file as a dict, or ``ValueError`` naming the file."""
    import tomllib

    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{p}: is a directory, not a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML ({e})") from None


# ---------------------------------------------------------------------------------------
# building (imports JAX)


_DATA: dict = {}


def read_data_file(path: str, loss: str | None = None):
    """(X, y) of a user's data file: ``.npz`` with arrays ``X`` and ``y``, or ``.npy`` /
    ``.csv`` (a header line allowed) with the label in the last column. Labels +-1 are
    binary; labels 0/1 are binary (0 -> -1) unless ``loss`` is cross_entropy; integer
    labels 0..K-1 are K classes."""
    import numpy as np

    p = Path(path)
    key = (str(p.resolve()) if p.exists() else str(p), loss == "cross_entropy")
    if key in _DATA:
        return _DATA[key]
    if p.suffix not in DATA_SUFFIXES:
        raise ValueError(f"--data-file {p}: use a {', '.join(DATA_SUFFIXES)} file")
    if not p.is_file():
        raise ValueError(f"--data-file {p}: no such file")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as f:
                if "X" not in f.files or "y" not in f.files:
                    raise ValueError(f"needs arrays named X and y, found {f.files}")
                X, y = f["X"], f["y"]
        else:
            if p.suffix == ".npy":
                a = np.load(p, allow_pickle=False)
            else:
                with open(p) as fh:
                    first = fh.readline()
                try:
                    [float(v) for v in first.strip().split(",")]
                    skip = 0
                except ValueError:
                    skip = 1   # a header line
                a = np.loadtxt(p, delimiter=",", skiprows=skip, ndmin=2)
            if a.ndim != 2 or a.shape[1] < 2:
                raise ValueError(f"needs a 2-D table with features and a last label column, "
                                 f"got shape {a.shape}")
            X, y = a[:, :-1], a[:, -1]
    except ValueError as e:
        raise ValueError(f"--data-file {p}: {e}") from None
    except Exception as e:  # zip / parse errors from numpy
        raise ValueError(f"--data-file {p}: unreadable ({type(e).__name__}: {e})") from None
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X) or len(y) == 0:
        raise ValueError(f"--data-file {p}: y must have one label per row of X "
                         f"(X {X.shape}, y {y.shape})")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"--data-file {p}: X holds {int(np.sum(~np.isfinite(X)))} "
                         f"non-finite values")
    if not np.all(np.isfinite(y.astype(np.float64))) or np.any(y != np.round(y)):
        raise ValueError(f"--data-file {p}: labels must be integers (+-1, or 0..K-1)")
    labels = set(np.unique(y).tolist())
    if labels <= {-1, 1}:
        y = y.astype(np.float64)
    elif labels <= {0, 1} and loss != "cross_entropy":
        y = np.where(y == 1, 1.0, -1.0)
    elif min(labels) >= 0:
        y = y.astype(np.int64)
        if len(labels) < 2:
            raise ValueError(f"--data-file {p}: only one class ({labels})")
    else:
        raise ValueError(f"--data-file {p}: labels must be +-1 or 0..K-1, got "
                         f"{sorted(labels)[:6]}")
    _DATA[key] = (X, y)
    return X, y


def load_data(c: dict, data_seed: int | None = None):
    """(X, y) of a resolved configuration (``data_seed`` overrides the configuration's)."""
    from . import data as data_mod

    seed = int(c["data_seed"] if data_seed is None else data_seed)
    if c.get("data_file") is not None:
        return read_data_file(c["data_file"], c["loss"])
    if callable(c["data"]):  # a sweep's own binary data set: (n, dim, seed) -> (X, y)
        return c["data"](n=int(c["n"]), dim=int(c["dim"]), seed=seed)
    if c["data"] == "separable":
        return data_mod.linearly_separable(int(c["n"]), int(c["dim"]), seed)
    return data_mod.gaussian_classes(int(c["n"]), int(c["dim"]), int(c["classes"]), seed)


def n_outputs(c: dict) -> int:
    if c.get("data_file") is not None:
        return 1 if c["loss"] != "cross_entropy" else int(c["classes"])
    return int(c["classes"]) if c["data"] == "gaussian_classes" else 1


def build_model(c: dict):
    """The model of a resolved configuration (a callable ``model`` -- a sweep's own -- is
    called with depth, width, dim, n_outputs)."""
    from . import models

    depth, width, dim, n_out = int(c["depth"]), int(c["width"]), int(c["dim"]), n_outputs(c)
    if callable(c["model"]):
        return c["model"](depth=depth, width=width, dim=dim, n_outputs=n_out)
    widths = (dim,) + (width,) * (depth - 1) + (n_out,)
    if c["model"] == "linear":
        return models.linear(dim, n_out)
    if c["model"] == "deep_linear":
        return models.deep_linear(widths)
    if c["model"] == "diagonal_linear":
        return models.diagonal_linear(dim, depth)
    act = {"relu": models.relu, "quadratic": models.quadratic,
           "leaky_relu": lambda: models.leaky_relu(float(c["slope"])),
           "relu_power": lambda: models.relu_power(float(c["alpha_power"]))}[c["activation"]]()
    return models.mlp(widths, act)


def build_policy(c: dict, constants=None):
    """The step-size policy of a resolved configuration. h_bound with c_eta 'estimate'
    takes ``constants`` = (B0, B1, B2) (``schedules.estimate_smoothness_constants``)."""
    from . import schedules

    name = c["policy"]
    if name in STEEPEST:
        step = build_policy({**c, "policy": c["step"]}, constants)
        return schedules.steepest(c["p"] if STEEPEST[name] is None else STEEPEST[name], step)
    if name == "constant":
        return schedules.constant(c["lr"])
    if name == "loss_based":
        return schedules.loss_based(c["alpha0"], c["r_u"], c["r_d"], int(c["max_retries"]))
    if name == "normalized":
        return schedules.normalized(c["alpha0"])
    if name == "h_bound":
        if c["c_eta"] == "estimate":
            if constants is None:
                raise ValueError("h_bound with c_eta 'estimate' needs the sampled constants")
            return schedules.h_bound(constants=tuple(constants), lr_before_t0=c["lr"],
                                     fraction=c["fraction"])
        return schedules.h_bound(c_eta=float(c["c_eta"]), lr_before_t0=c["lr"],
                                 fraction=c["fraction"])
    if name == "dual_acceleration":
        return schedules.dual_acceleration()
    if name == "progressive_rescaling":
        return schedules.progressive_rescaling(c["lr"])
    import optax

    opt = {"adam": optax.adam, "rmsprop": optax.rmsprop, "adagrad": optax.adagrad,
           "sign_sgd": optax.sign_sgd, "sgd_optax": optax.sgd}[name]
    return schedules.optax_optimizer(optax.inject_hyperparams(opt)(learning_rate=c["lr"]),
                                     objective=c["objective"],
                                     name=f"optax.{opt.__name__}(learning_rate={c['lr']:g})")
