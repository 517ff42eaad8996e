"""The ROI box: an exact crop when axis-aligned, the right voxels when turned, and the label share it holds."""

from __future__ import annotations

import numpy as np
import pytest

from data_modules.localisation import rotation_matrix
from data_modules.roi import label_coverage, place_box, read_box

SHAPE = (20, 22, 18)
CODED = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE) + 1.0  # every voxel its own value, min 1


def test_an_axis_aligned_box_is_an_exact_crop_padded_with_the_fill():
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    box = place_box(affine, SHAPE, (6, 8, 10), center_mm=(7 * 0.7, 9 * 0.8, 15 * 2.5))  # centre voxel (7, 9, 15)
    out = read_box(CODED, affine, box, fill=-1.0)
    assert out.shape == (6, 8, 10) and out.dtype == CODED.dtype
    assert np.array_equal(out[:, :, :8], CODED[4:10, 5:13, 10:18])  # start = centre - size / 2
    assert (out[:, :, 8:] == -1.0).all()  # beyond the last slice
    assert np.allclose(box.affine[:3, 3], [4 * 0.7, 5 * 0.8, 10 * 2.5])


def test_a_box_turned_a_quarter_turn_reads_the_rotated_voxels():
    # box voxel (i, j, k) -> world c + R (ijk - size / 2); R turns x to y and y to -x, so it reads V[13 - j, 8 + i, 8 + k]
    box = place_box(np.eye(4), SHAPE, (4, 6, 5), center_mm=(10.0, 10.0, 10.5), rotation=rotation_matrix((0, 0, 90)))
    i, j, k = np.meshgrid(np.arange(4), np.arange(6), np.arange(5), indexing="ij")
    expected = CODED[13 - j, 8 + i, 8 + k]
    assert np.allclose(read_box(CODED, np.eye(4), box, fill=0.0), expected, atol=1e-2)
    assert np.array_equal(read_box(CODED, np.eye(4), box, fill=0.0, nearest=True), expected)  # labels: no blending
    # the box's affine says where each voxel lies: predictions map back through it
    assert np.allclose(box.affine @ [1, 2, 3, 1], [13 - 2, 8 + 1, 8 + 3, 1])


def test_a_turned_box_reads_only_around_itself_and_fills_outside_the_volume():
    box = place_box(np.eye(4), SHAPE, (8, 8, 8), center_mm=(19.0, 11.0, 9.0), rotation=rotation_matrix((0, 0, 30)))
    out = read_box(CODED, np.eye(4), box, fill=-5.0)
    assert (out == -5.0).any() and (out > 0).any()  # half of it hangs over the x edge
    assert out.min() >= -5.0 and out.max() <= CODED.max()


def test_label_coverage_of_a_turned_box():
    label = np.zeros(SHAPE, np.uint8)
    label[8:12, 9:11, 7:11] = 1  # 4 x 2 x 4 voxels around (10, 10, 9)
    whole = place_box(np.eye(4), SHAPE, (8, 8, 8), center_mm=(10.0, 10.0, 9.0), rotation=rotation_matrix((0, 0, 30)))
    assert label_coverage(label, np.eye(4), whole) == (1.0, "")
    # a quarter turn lays the label's x extent (x 8..11) along the box's y axis (j = 11 - x: 3..0); the box holds
    # j 0..1, so half the label is inside and two voxels stick out on the box's high y side
    thin = place_box(np.eye(4), SHAPE, (8, 2, 8), center_mm=(10.0, 10.0, 9.0), rotation=rotation_matrix((0, 0, 90)))
    inside, cut = label_coverage(label, np.eye(4), thin)
    assert inside == pytest.approx(0.5) and cut == "anterior 2 mm"
