"""Label-value membership (labels.py) against numpy's own."""

import numpy as np
import pytest

from lesionsynth.labels import count_in, label_in


@pytest.mark.parametrize("values", [[], [1], [2, 7], [0, 3, 300, -1], list(range(1, 12)), np.array([[4, 9]])])
@pytest.mark.parametrize("order", ["C", "F"])
def test_label_in_equals_isin(values, order):
    label = np.asarray(np.random.default_rng(0).integers(0, 12, (9, 8, 7)), dtype=np.uint8, order=order)
    expected = np.isin(label, np.asarray(values).ravel())
    got = label_in(label, values)
    assert got.dtype == bool and got.shape == label.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(label_in(label[::2, 1:, ::-1], values), expected[::2, 1:, ::-1])
    assert count_in(label, values) == int(expected.sum())


def test_label_in_other_dtypes():
    label = np.random.default_rng(1).integers(0, 600, (6, 5, 4)).astype(np.int16)
    np.testing.assert_array_equal(label_in(label, [3, 512]), np.isin(label, [3, 512]))
