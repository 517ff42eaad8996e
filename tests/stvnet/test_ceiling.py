"""The ceiling of a ROI grid: a perfect network's score through a run's own preprocessing, on shapes whose ceiling is
known."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torchio as tio

from data_modules.transforms import box_kernel, preprocessing
from stvnet.ceiling import ceiling_scores, grid_ceiling, round_trip


def _scan(label: np.ndarray, spacing: float = 1.0) -> tuple[tio.ScalarImage, tio.LabelMap]:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    image = tio.ScalarImage(tensor=torch.from_numpy(label.astype(np.float32) * 1000.0)[None], affine=affine)
    return image, tio.LabelMap(tensor=torch.from_numpy(label.astype(np.uint8))[None], affine=affine)


def _ball(shape: int = 48, radius: float = 11.3) -> np.ndarray:
    grid = np.indices((shape,) * 3) - (shape - 1) / 2.0
    return (np.sqrt((grid ** 2).sum(0)) <= radius).astype(np.uint8)


def _ceiling(label: np.ndarray, spacing: float | None, roi: tuple[int, int, int], center_mm, kind: str = "nearest"):
    image, lab = _scan(label)
    transform = preprocessing(None if spacing is None else (spacing,) * 3, roi, None, label_interpolation=kind)
    prob = round_trip(transform, image, lab, center_mm=center_mm)
    assert prob.shape == label.shape  # back on the scan's own grid
    return ceiling_scores(prob, label, (1.0, 1.0, 1.0))


@pytest.mark.mutation_target("round_trip", "ceiling_scores")
def test_the_scans_own_grid_loses_nothing_and_a_cut_roi_loses_exactly_what_it_cuts():
    """At the scan's own spacing the round trip is exact (ceiling 1, 0 mm); a ROI 10 voxels tall around a box 20 tall
    keeps half of it, so a perfect network scores 2 * 1000 / (1000 + 2000)."""
    ball = _ball()
    whole = _ceiling(ball, None, (40, 40, 40), (23.5, 23.5, 23.5))
    assert whole == {"ceiling_dice": 1.0, "ceiling_hd95": 0.0, "ceiling_assd": 0.0}
    box = np.zeros((40, 40, 40), np.uint8)
    box[15:25, 15:25, 10:30] = 1
    cut = _ceiling(box, None, (30, 30, 10), (19.5, 19.5, 20.0))  # the slab z = 15..24
    assert cut["ceiling_dice"] == pytest.approx(2 * 1000 / 3000)
    assert cut["ceiling_hd95"] == pytest.approx(5.0)  # the box's ends, 5 voxels beyond the kept slab


def test_a_coarser_grid_lowers_the_ceiling_and_soft_labels_raise_it_again():
    """A ball of 11.3 mm radius at 1 mm: at 3 mm nearest-neighbour labels lose a few percent of DSC and about a voxel
    of surface; linearly resampled (soft) labels keep the sub-voxel boundary, so the same grid's ceiling is higher."""
    ball = _ball()
    centre = (23.5, 23.5, 23.5)
    nearest = _ceiling(ball, 3.0, (18, 18, 18), centre, "nearest")
    soft = _ceiling(ball, 3.0, (18, 18, 18), centre, "linear")
    assert 0.85 < nearest["ceiling_dice"] < 0.99 and nearest["ceiling_assd"] > 0.3
    assert soft["ceiling_dice"] > nearest["ceiling_dice"] + 0.01 and soft["ceiling_assd"] < nearest["ceiling_assd"]
    finer = _ceiling(ball, 1.5, (36, 36, 36), centre, "nearest")
    assert nearest["ceiling_dice"] < finer["ceiling_dice"] < 1.0
    # at the CPU configs' 2.3 mm (a non-integer 2.3 source voxels per target voxel): 0.958 -> 0.987, 0.39 -> 0.12 mm
    at_2_3 = {kind: _ceiling(ball, 2.3, (24, 24, 24), centre, kind) for kind in ("nearest", "linear")}
    assert at_2_3["linear"]["ceiling_dice"] > at_2_3["nearest"]["ceiling_dice"] + 0.02
    assert at_2_3["linear"]["ceiling_assd"] < at_2_3["nearest"]["ceiling_assd"] / 2


def test_a_box_kernel_weighs_each_voxel_by_the_share_the_box_covers():
    assert box_kernel(1.0).tolist() == [1.0] and box_kernel(0.4).tolist() == [1.0]  # never narrower than a voxel
    assert np.allclose(box_kernel(2.0), [0.25, 0.5, 0.25]) and np.allclose(box_kernel(2.3) * 2.3, [0.65, 1.0, 0.65])
    assert np.allclose(box_kernel(3.0), [1 / 3] * 3) and np.allclose(box_kernel(4.5) * 4.5, [0.75, 1, 1, 1, 0.75])


def test_grid_ceiling_reads_a_config_and_centres_the_roi_on_the_label(tmp_path):
    """From files and a ``--data`` mapping: the ROI sits on the label wherever it is in the scan, so a label far from
    the scan's centre still has the ceiling of its grid (not of a fixed box that misses it)."""
    label = np.zeros((60, 48, 48), np.uint8)
    label[4:20, 10:26, 20:36] = 1  # near one edge
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(label * 1000.0, affine), str(tmp_path / "image.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(tmp_path / "label.nii.gz"))
    scores = grid_ceiling({"target_spacing": [1.0, 1.0, 1.0], "roi_size": [20, 20, 20], "hu_window": [-200, 1800]},
                          str(tmp_path / "image.nii.gz"), str(tmp_path / "label.nii.gz"))
    assert scores == {"ceiling_dice": 1.0, "ceiling_hd95": 0.0, "ceiling_assd": 0.0}
    coarse = grid_ceiling({"target_spacing": [2.5, 2.5, 2.5], "roi_size": [10, 10, 10], "label_interpolation": "linear"},
                          str(tmp_path / "image.nii.gz"), str(tmp_path / "label.nii.gz"))
    assert 0.8 < coarse["ceiling_dice"] < 1.0
