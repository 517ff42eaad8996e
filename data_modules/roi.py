"""The ROI box: where it lies in a volume, the voxels it reads, and how much of a label it holds.

A box is ``size`` voxels with the volume's spacing, centred on a point (RAS mm) or at fractions of the field of view,
and turned by the patient's pose when the locator found one (:mod:`data_modules.localisation`). An unturned box starts
at a whole voxel of the volume, so reading it is an exact crop, padded where it leaves the volume; a turned box is
resampled (linear for images, nearest for labels), so the network sees every patient in the training pose. Training
(:class:`~data_modules.transforms.RoiCrop`), the cache's lazy reader and ``stvnet predict`` all read boxes through
:func:`read_box`, so they see the same voxels; the box's affine maps predictions back to the scan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from data_modules.errors import UserError

#: the paper's fixed box (``data.roi_locator: fraction``): its centre as fractions of the canonical (RAS) field of
#: view, the "middle-right" box that holds the patient's left proximal femur and acetabulum in the synthetic cohort's
#: framing
ROI_CENTER_FRACTION = (0.242, 0.5, 0.55)
#: names of the low and high side of each canonical (RAS) axis
SIDES = (("left", "right"), ("posterior", "anterior"), ("inferior", "superior"))


@dataclass(frozen=True)
class Box:
    """``size`` voxels whose voxel-to-RAS-mm ``affine`` places them in the world."""

    affine: np.ndarray
    size: tuple[int, int, int]


def place_box(volume_affine: np.ndarray, shape: Sequence[int], size: Sequence[int],
              center_mm: Sequence[float] | None = None, rotation: np.ndarray | None = None,
              center_fraction: Sequence[float] | None = None) -> Box:
    """The box of ``size`` voxels centred at ``center_mm`` (else at ``center_fraction`` of ``shape``, else its middle),
    axis-aligned with the volume, or turned by ``rotation`` (3 x 3, RAS) about its centre."""
    size_ = tuple(int(s) for s in size)
    half = np.asarray(size_, float) / 2.0
    if rotation is not None and not np.allclose(rotation, np.eye(3), atol=1e-9):
        if center_mm is None:
            raise ValueError("a turned ROI box needs its centre in mm")
        linear = np.asarray(rotation, float) @ volume_affine[:3, :3]
        affine = np.eye(4)
        affine[:3, :3] = linear
        affine[:3, 3] = np.asarray(center_mm, float) - linear @ half
        return Box(affine, size_)
    if center_mm is not None:
        center = (np.linalg.inv(volume_affine) @ np.append(np.asarray(center_mm, float), 1.0))[:3]
    else:
        center = np.asarray(center_fraction or (0.5, 0.5, 0.5), float) * np.asarray(shape, float)
    start = np.round(center - half)
    affine = np.array(volume_affine, float)
    affine[:3, 3] = volume_affine[:3, :3] @ start + volume_affine[:3, 3]
    return Box(affine, size_)


def _box_to_volume(volume_affine: np.ndarray, box: Box) -> np.ndarray:
    """Box voxel -> volume voxel (4 x 4)."""
    return np.linalg.inv(volume_affine) @ box.affine


def _integer_shift(matrix: np.ndarray) -> np.ndarray | None:
    """The whole-voxel offset of a box that is an exact crop of the volume (else ``None``)."""
    shift = np.round(matrix[:3, 3])
    if np.allclose(matrix[:3, :3], np.eye(3), atol=1e-6) and np.allclose(matrix[:3, 3], shift, atol=1e-4):
        return shift.astype(int)
    return None


def read_box(volume: np.ndarray, volume_affine: np.ndarray, box: Box, fill: float, nearest: bool = False) -> np.ndarray:
    """The box's voxels of a 3D ``volume`` (a memory map is read only around the box): an exact crop for an
    axis-aligned box, else linear (``nearest``: nearest-neighbour, for labels) interpolation; ``fill`` outside."""
    matrix = _box_to_volume(volume_affine, box)
    shift = _integer_shift(matrix)
    out = np.full(box.size, fill, dtype=volume.dtype)
    if shift is not None:
        lo, hi = shift, shift + np.asarray(box.size)
    else:
        corners = np.array([[a, b, c, 1.0] for a in (0, box.size[0]) for b in (0, box.size[1]) for c in (0, box.size[2])])
        ends = (corners @ matrix.T)[:, :3]
        lo, hi = np.floor(ends.min(0)).astype(int) - 1, np.ceil(ends.max(0)).astype(int) + 2
    src = tuple(slice(max(0, a), min(n, b)) for a, b, n in zip(lo, hi, volume.shape))
    if any(sl.stop <= sl.start for sl in src):
        return out
    part = np.asarray(volume[src])
    if shift is not None:
        out[tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(src, lo))] = part
        return out
    origin = np.array([sl.start for sl in src], float)
    sampled = ndimage.affine_transform(part.astype(np.float32), matrix[:3, :3], offset=matrix[:3, 3] - origin,
                                       output_shape=box.size, order=0 if nearest else 1, mode="constant", cval=fill)
    return sampled.astype(volume.dtype)


def label_coverage(label: np.ndarray, volume_affine: np.ndarray, box: Box) -> tuple[float, str]:
    """Share of a label's voxels inside a box, and where the rest lies along the box's axes
    (``"inferior 12 mm, left 4 mm"``)."""
    idx = np.argwhere(label > 0)
    if idx.size == 0:
        return 1.0, ""
    to_box = np.linalg.inv(_box_to_volume(volume_affine, box))
    points = np.round(idx @ to_box[:3, :3].T + to_box[:3, 3])
    size = np.asarray(box.size)
    inside = float(np.all((points >= 0) & (points < size), axis=1).mean())
    spacing = np.linalg.norm(box.affine[:3, :3], axis=0)
    cuts = []
    for axis, (low_name, high_name) in enumerate(SIDES):
        below = -points[:, axis].min() * spacing[axis]
        above = (points[:, axis].max() + 1 - size[axis]) * spacing[axis]
        cuts += [f"{low_name} {below:.0f} mm"] if below > 0 else []
        cuts += [f"{high_name} {above:.0f} mm"] if above > 0 else []
    return inside, ", ".join(cuts)


def refuse_cut_labels(subjects: Sequence[Mapping], roi_locator: str) -> None:
    """Refuse to train on cut labels: every training and validation label must lie wholly inside its ROI (the
    ``label_in_roi`` fraction and ``label_cut`` sides the ROI reader records on each subject)."""
    problems = [f"{s['subject_id']}: {100 * (1 - s['label_in_roi']):.1f}% of the femur label lies outside the "
                f"ROI ({s['label_cut']} beyond its edge)" for s in subjects if s.get("label_in_roi", 1.0) < 1.0]
    if problems:
        raise UserError(*problems, f"{len(problems)} subject(s) would train on cut labels: enlarge --data.roi_size, "
                        f"or check the ROI placement (--data.roi_locator {roi_locator})")
