import numpy as np
import pytest

from homoflow import data


def _rows(*arrays):
    return sorted(r.tobytes() for a in arrays for r in a.reshape(a.shape[0], -1))


def test_digits_split_is_a_fixed_stratified_partition_of_the_1797_images_in_unit_box():
    from sklearn.datasets import load_digits

    s = data.digits()
    assert s.X_train.shape == (1347, 8, 8, 1) and s.X_test.shape == (450, 8, 8, 1)
    assert s.X_train.min() == 0.0 and s.X_train.max() == 1.0  # pixels 0..16 divided by 16
    X, y = load_digits(return_X_y=True)
    # train and test together are exactly the data set, each image once
    assert _rows(s.X_train, s.X_test) == _rows(X / 16.0)
    # stratified: every class has round(25%) of its images in the test set
    for c in range(10):
        assert np.sum(s.y_test == c) == round(0.25 * np.sum(y == c))
    again = data.digits()
    assert np.array_equal(again.X_train, s.X_train) and np.array_equal(again.y_test, s.y_test)


def test_digits_binary_subset_keeps_two_classes_with_labels_plus_minus_one():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    s = data.digits(classes=(3, 8), binary=True)
    assert set(np.unique(s.y_train)) == {-1.0, 1.0} and s.classes == (3, 8)
    assert len(s.y_train) + len(s.y_test) == np.sum((y == 3) | (y == 8))
    # class 3 is -1: its images are the ones labelled 3 in the source
    threes = _rows(X[y == 3] / 16.0)
    assert _rows(s.X_train[s.y_train == -1], s.X_test[s.y_test == -1]) == threes
    multi = data.digits(classes=(7, 2, 5))
    assert set(np.unique(multi.y_train)) == {0, 1, 2} and multi.classes == (7, 2, 5)


@pytest.mark.parametrize("kwargs, match", [
    ({"classes": (0, 10)}, "cannot select"),
    ({"classes": (1, 1)}, "distinct"),
    ({"classes": (4,)}, ">= 2 classes"),
    ({"classes": (0, 1, 2), "binary": True}, "exactly 2"),
    ({"test_fraction": 1.0}, "test_fraction"),
])
def test_impossible_digit_subsets_raise_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.digits(**kwargs)


def test_unknown_data_set_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown data set 'emnist'.*digits.*mnist.*mnist1d"):
        data.load("emnist")


def test_mnist1d_is_regenerated_offline_with_the_published_shapes_and_leaves_rng_alone():
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    s = data.load("mnist1d")
    assert np.random.rand() == expected_next  # the generator's global seeding is undone
    assert s.X_train.shape == (4000, 40) and s.X_test.shape == (1000, 40)
    assert set(np.unique(s.y_train)) == set(range(10))
    X = np.concatenate([s.X_train, s.X_test])
    assert abs(X.mean()) < 1e-12 and abs(X.std() - 1.0) < 1e-12  # published standardization
    y = np.concatenate([s.y_train, s.y_test])
    assert np.array_equal(np.bincount(y), np.full(10, 500))  # 5 000 / 10 per template
    sub = data.mnist1d(classes=(0, 9), binary=True)
    assert set(np.unique(sub.y_test)) == {-1.0, 1.0}
    assert len(sub.y_train) == np.sum((s.y_train == 0) | (s.y_train == 9))
    assert np.array_equal(sub.X_test, s.X_test[(s.y_test == 0) | (s.y_test == 9)])
