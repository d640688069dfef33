"""Data sets generated on the spot (no downloads)."""

from __future__ import annotations

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


DATASETS = {"separable": linearly_separable, "gaussian_classes": gaussian_classes}
