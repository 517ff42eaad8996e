"""Clinical-size synthetic scans: hip QCT acquisitions of the default cohort's anatomy (512 x 512 x 150-300 voxels,
off-centre, with a calibration phantom), for study-scale benchmarks."""

from __future__ import annotations

import numpy as np
import pytest

from data_modules.synthetic.clinical import HIP_Z_MM, MATRIX, PHANTOM_RODS, PHANTOM_SIZE_MM, render_clinical, sample_acquisition
from data_modules.synthetic.anatomy import render_subject, sample_params


def _subjects(n: int):
    rng = np.random.default_rng(3)
    return [sample_params(i, "F" if i % 2 else "M", rng) for i in range(n)]


def test_acquisitions_stay_within_a_hip_qct_protocol():
    for prm in _subjects(60):
        acq = sample_acquisition(prm)
        pixel, _, dz = acq.spacing
        assert acq.shape[:2] == (MATRIX, MATRIX) and 150 <= acq.shape[2] <= 300
        assert 0.6 <= pixel <= 0.9 and acq.spacing[0] == acq.spacing[1] and dz in (1.0, 1.25)
        z = acq.origin[2] + dz * np.array([0, acq.shape[2] - 1])
        assert z[0] <= HIP_Z_MM[0] and z[1] >= HIP_Z_MM[1]  # the femur and the acetabulum are always in view
        y = acq.origin[1] - pixel * np.array([0, MATRIX - 1])  # anterior edge, posterior edge
        assert y[1] <= acq.table_y_mm - PHANTOM_SIZE_MM[1] - 5 + 1e-6  # the phantom is in view
        assert acq == sample_acquisition(prm)  # deterministic per subject
    centres = [sample_acquisition(p).origin[0] - sample_acquisition(p).spacing[0] * (MATRIX - 1) / 2 for p in _subjects(60)]
    assert np.ptp(centres) > 30  # patients lie off the scanner's centre by different amounts


@pytest.mark.not_in_mutation_run
@pytest.mark.heavy  # one 512 x 512 x 206 scan: ~15 s and 3.5 GiB
def test_a_clinical_scan_holds_the_same_femur_and_a_readable_phantom():
    prm = _subjects(1)[0]
    image, label, affine = render_clinical(prm)
    acq = sample_acquisition(prm)
    assert image.shape == label.shape == acq.shape and image.dtype == np.int16
    voxel_ml = np.prod(acq.spacing) / 1000
    _, reference, _ = render_subject(prm, (1.0, 1.0, 2.5))  # the same anatomy on the default grid
    assert abs(label.sum() * voxel_ml / (reference.sum() * 2.5 / 1000) - 1) < 0.03
    idx = np.argwhere(label > 0)
    assert idx[:, 2].min() > 0 and idx[:, 2].max() < acq.shape[2] - 1  # not cut by the field of view
    x = acq.origin[0] - acq.spacing[0] * np.arange(MATRIX)
    y = acq.origin[1] - acq.spacing[1] * np.arange(MATRIX)
    middle = image[:, :, acq.shape[2] // 2 - 10: acq.shape[2] // 2 + 10].astype(float)  # 25 mm of the phantom
    for cx, hu in PHANTOM_RODS:  # the core of each rod reads its nominal HU (noise averages out)
        core = (np.abs(x - cx)[:, None] < 4) & (np.abs(y - (acq.table_y_mm - PHANTOM_SIZE_MM[1] / 2))[None, :] < 4)
        assert abs(np.median(middle[core]) - hu) < 15, (cx, hu, np.median(middle[core]))
