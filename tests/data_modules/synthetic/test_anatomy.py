"""The generator's anatomy (data_modules/synthetic/anatomy.py): the femur's distance grid follows the render's
resolution without moving the surface by more than a fraction of a voxel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_modules.synthetic.anatomy import distance_grid_spacing, femur_shape, sample_params
from data_modules.synthetic.femur_shape import distance_grid


@pytest.mark.parametrize(("spacing", "grid"), [((1.0, 1.0, 2.5), 1.0), ((0.7, 0.7, 1.25), 1.0), ((3.0, 3.0, 4.0), 1.5),
                                               ((-3.0, 3.0, 4.0), 1.5), ((6.0, 6.0, 6.0), 2.0)])
def test_the_grid_is_half_the_finest_voxel_between_1_and_2_mm(spacing, grid):
    assert distance_grid_spacing(spacing) == grid


def test_a_coarse_renders_grid_keeps_the_surface_within_a_fraction_of_its_voxel():
    """The 1.5 mm grid of a 3 x 3 x 4 mm render against the 1 mm grid, sampled 2 mm around the proximal femur's
    surface: the distances differ by under a quarter of a voxel at most, 0.05 mm on average."""
    prm = sample_params(0, "M", np.random.default_rng(7))
    shape = femur_shape(prm)
    z_range = (-60.0, prm.head_radius + 8.0)
    fine, coarse = distance_grid(shape, z_range, 1.0), distance_grid(shape, z_range, distance_grid_spacing((3.0, 3.0, 4.0)))
    rng = np.random.default_rng(0)
    near = shape.vertices[(shape.vertices[:, 2] > -55.0) & (shape.vertices[:, 2] < prm.head_radius)]
    points = near[rng.integers(0, len(near), 5000)] + rng.normal(0.0, 2.0, (5000, 3))
    p = tuple(torch.from_numpy(points[:, i].astype(np.float32)) for i in range(3))
    gap = (fine.sample(p) - coarse.sample(p)).abs()
    assert float(gap.max()) < 0.75 and float(gap.mean()) < 0.05
