"""Clinical-size synthetic scans (``stvnet synth --preset clinical``): the default cohort's anatomy acquired like a
hip QCT scan, for study-scale benchmarks and tests of the data pipeline.

Per subject: a 512 x 512 matrix at 0.6-0.9 mm pixels, 1 or 1.25 mm slices, 150-300 slices placed anywhere that keeps
the labelled femur and the acetabulum in view, the patient off the scanner's centre (lateral ±30 mm, the table at any
height that keeps the phantom and the patient's front in view) and turned by a few degrees (the subject's own pose),
and a calibration phantom under the patient (a water-equivalent block with five rods, as QCT phantoms carry).
Fast enough for many scans: the anatomy's distance fields are evaluated on a 2 mm grid and interpolated (trilinear)
onto the clinical grid, where tissues, cortex, phantom, partial volume and noise are rendered at full resolution. The acquisition is drawn from its own random stream, so
the default cohort's anatomy parameters and bytes do not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from data_modules.synthetic.anatomy import SubjectParams, anatomy, intensities

MATRIX = 512
PIXEL_MM = (0.6, 0.9)
SLICE_MM = (1.0, 1.25)
SLICES = (150, 300)
#: the z range (RAS mm) every scan holds: the labelled proximal femur and the acetabulum
HIP_Z_MM = (-135.0, 50.0)
#: lateral offset of the patient from the scanner's centre (mm)
OFFSET_MM = 30.0
#: grid on which the distance fields are evaluated before interpolation (mm)
COARSE_MM = 2.0
#: calibration phantom: rods' x centres (mm) and HU, in a 0 HU block 300 x 40 mm under the patient
PHANTOM_RODS = ((-100.0, -50.0), (-50.0, 50.0), (0.0, 125.0), (50.0, 225.0), (100.0, 375.0))
PHANTOM_SIZE_MM = (300.0, 40.0)
ROD_RADIUS_MM = 9.0
#: the body's posterior half-axis in the generator (mm): the table lies just behind it
BODY_BACK_MM = 125.0


@dataclass(frozen=True)
class Acquisition:
    """One clinical acquisition: voxel size, matrix, the RAS position of voxel 0 (LPS voxel order) and the table."""

    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    origin: tuple[float, float, float]
    table_y_mm: float


def sample_acquisition(prm: SubjectParams) -> Acquisition:
    """A clinical acquisition of one subject, from the subject's seed (its own stream)."""
    rng = np.random.default_rng([prm.seed, 1])
    pixel = float(rng.uniform(*PIXEL_MM))
    dz = float(rng.choice(SLICE_MM))
    fewest = max(SLICES[0], math.ceil((HIP_Z_MM[1] - HIP_Z_MM[0]) / dz) + 1)
    n = int(rng.integers(fewest, SLICES[1] + 1))
    z0 = float(rng.uniform(HIP_Z_MM[1] - (n - 1) * dz, HIP_Z_MM[0]))
    fov = pixel * (MATRIX - 1)
    table = prm.shift_mm[1] - BODY_BACK_MM - 3.0
    # the table height varies: the phantom's bottom lies 5 mm above the field of view's posterior edge or higher, as
    # far as the patient's front (body depth 250 mm) still fits
    bottom = table - PHANTOM_SIZE_MM[1] - 5.0
    slack = max(0.0, fov - (prm.shift_mm[1] + BODY_BACK_MM - bottom))
    posterior = bottom - float(rng.uniform(0.0, slack))
    offset_x = float(rng.uniform(-OFFSET_MM, OFFSET_MM))
    # LPS voxel order: voxel 0 is the patient's right-anterior corner of the field of view
    origin = (fov / 2.0 + offset_x, posterior + fov, z0)
    return Acquisition((pixel, pixel, dz), (MATRIX, MATRIX, n), origin, table)


def phantom_hu(acq: Acquisition) -> np.ndarray:
    """HU of the calibration phantom per voxel (NaN outside it), constant along z."""
    x = acq.origin[0] - acq.spacing[0] * np.arange(acq.shape[0])
    y = acq.origin[1] - acq.spacing[1] * np.arange(acq.shape[1])
    xx, yy = np.meshgrid(x, y, indexing="ij")
    top = acq.table_y_mm
    plane = np.full(xx.shape, np.nan, dtype=np.float32)
    plane[(np.abs(xx) < PHANTOM_SIZE_MM[0] / 2) & (yy < top) & (yy > top - PHANTOM_SIZE_MM[1])] = 0.0
    for cx, hu in PHANTOM_RODS:
        plane[np.hypot(xx - cx, yy - (top - PHANTOM_SIZE_MM[1] / 2)) < ROD_RADIUS_MM] = hu
    return np.broadcast_to(plane[:, :, None], acq.shape)


def _upsampled(field: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A distance field on the coarse grid interpolated onto the clinical grid (the grids share their corners)."""
    tensor = torch.from_numpy(np.ascontiguousarray(field))[None, None]
    return F.interpolate(tensor, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()


def render_clinical(prm: SubjectParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one subject as a clinical acquisition: (HU image int16, label uint8, affine), LPS voxel order."""
    acq = sample_acquisition(prm)
    coarse_shape = tuple(math.ceil((n - 1) * s / COARSE_MM) + 1 for n, s in zip(acq.shape, acq.spacing))
    coarse_spacing = tuple((n - 1) * s / (m - 1) for n, s, m in zip(acq.shape, acq.spacing, coarse_shape))
    coarse, _ = anatomy(prm, coarse_spacing, origin=acq.origin, shape=coarse_shape)
    sdfs = {name: _upsampled(field, acq.shape) for name, field in coarse.items()}
    del coarse
    image, label = intensities(sdfs, prm, acq.spacing, np.random.default_rng(prm.seed), phantom_hu(acq))
    affine = np.diag([-acq.spacing[0], -acq.spacing[1], acq.spacing[2], 1.0])
    affine[:3, 3] = acq.origin
    return image, label, affine
