"""Geometry helpers: the fast dilation equals ndimage's."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from lesionsynth.geometry import ball, dilate, structure_for


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.1, 2.5), (3.0, 0.7, 0.7)])
@pytest.mark.parametrize("radius", [0.5, 1.0, 2.0, 3.0, 4.5])
def test_dilate_by_a_ball_equals_ndimage(spacing, radius):
    rng = np.random.default_rng(int(radius * 10))
    mask = rng.random((17, 13, 11)) < 0.03
    mask[0, 5, 5] = mask[-1, -1, -1] = True  # on the faces: nothing comes in from outside
    structure = ball(radius, spacing)
    np.testing.assert_array_equal(dilate(mask, structure), ndimage.binary_dilation(mask, structure=structure))


@pytest.mark.parametrize("structure", [None, structure_for(6), structure_for(18), structure_for(26),
                                       np.ones((1, 3, 5), bool), np.eye(3, dtype=bool)[:, :, None].repeat(3, 2),
                                       np.array([[[True, False, True]]])])
def test_dilate_by_other_structures_equals_ndimage(structure):
    mask = np.random.default_rng(1).random((12, 14, 9)) < 0.05
    want = ndimage.binary_dilation(mask) if structure is None else ndimage.binary_dilation(mask, structure=structure)
    np.testing.assert_array_equal(dilate(mask, structure), want)
    np.testing.assert_array_equal(dilate(np.asfortranarray(mask), structure), want)


@pytest.mark.parametrize("reach", [0, 1, 2, (1, 0, 3), (4, 2, 9)])
def test_dilate_box_equals_a_maximum_filter(reach):
    from lesionsynth.geometry import dilate_box

    mask = np.random.default_rng(2).random((9, 12, 7)) < 0.04
    size = tuple(2 * np.broadcast_to(reach, (3,)) + 1)
    want = ndimage.maximum_filter(mask, size=size, mode="constant")
    np.testing.assert_array_equal(dilate_box(mask, reach), want)
    np.testing.assert_array_equal(dilate_box(np.asfortranarray(mask), reach), want)
