"""Re-frame a scan as other acquisitions would have framed it: a longer field of view, an off-centre patient, a rotated
patient, a femur cut by the field of view. Used to measure femur localisation (``stvnet localise``) and to test that
a checkpoint segments re-framed scans as well as the original ones.

All amounts are in mm (or degrees) in the canonical RAS frame. Longer fields of view repeat the scan's edge slices
(``edge`` padding: the iliac bones continue upwards, both thighs downwards), off-centre patients get air beside them,
rotations turn the patient about the scan's centre. Image and label are transformed together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torchio as tio

from data_modules.localisation import box_center_mm, head_center_mm


@dataclass(frozen=True)
class Framing:
    """One acquisition framing relative to the original scan.

    Attributes:
        name: short label used in tables and file names.
        superior_mm / inferior_mm: field of view extended (> 0) or cut (< 0) at the head / feet end.
        air_mm: air added beside the patient, RAS ``(left, right, posterior, anterior)``: the patient moves off centre.
        degrees: patient rotation about the RAS x, y, z axes.
        right_mm: field of view cut (< 0) on the patient's right: ``-150`` leaves the left hip only.
        metal: a contralateral hip prosthesis stem (3000 HU rod, 8 mm radius) mirrored from the left femur's place.
        below_head_mm: the field of view ends this many mm below the left femoral head's centre
            (:func:`data_modules.localisation.head_center_mm`), as abdomen-to-pelvis CT often does (``None``: not cut).
    """

    name: str
    superior_mm: float = 0.0
    inferior_mm: float = 0.0
    air_mm: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    degrees: tuple[float, float, float] = (0.0, 0.0, 0.0)
    right_mm: float = 0.0
    metal: bool = False
    below_head_mm: float | None = None


FRAMINGS = (
    Framing("original"),
    Framing("abdomen-to-hip", superior_mm=150.0),
    Framing("hip-to-thigh", inferior_mm=120.0),
    Framing("abdomen-to-thigh", superior_mm=150.0, inferior_mm=120.0),
    Framing("off-centre left 60 mm", air_mm=(0.0, 120.0, 0.0, 0.0)),
    Framing("off-centre right 60 mm", air_mm=(120.0, 0.0, 0.0, 0.0)),
    Framing("table low 40 mm", air_mm=(0.0, 0.0, 0.0, 80.0)),
    Framing("rotated +15 deg (axial)", degrees=(0.0, 0.0, 15.0)),
    Framing("rotated -15 deg (axial)", degrees=(0.0, 0.0, -15.0)),
    Framing("tilted +15 deg (sagittal)", degrees=(15.0, 0.0, 0.0)),
    Framing("rolled -15 deg (coronal)", degrees=(0.0, -15.0, 0.0)),
    Framing("left hip only", right_mm=-150.0),
    Framing("metal: right hip prosthesis", metal=True),
    Framing("cut 40 mm below the head", below_head_mm=40.0),
    Framing("cut 30 mm below the head", below_head_mm=30.0),
    Framing("cut 20 mm below the head", below_head_mm=20.0),
)
#: HU of the metal stem (clamped to the top of the HU window like cortical bone, but far brighter in the raw scan)
METAL_HU = 3000.0


def _voxels(mm: float, spacing: float) -> int:
    return int(round(abs(mm) / spacing))


def reframe(subject: tio.Subject, framing: Framing) -> tio.Subject:
    """The subject (``image`` and optional ``label``) as acquired with ``framing``, in canonical orientation."""
    out = tio.ToCanonical()(subject)
    sx, sy, sz = out.spacing
    if framing.metal:
        out = _with_metal_stem(out)
    if any(framing.degrees):
        out = tio.Affine(scales=(1, 1, 1), degrees=framing.degrees, translation=(0, 0, 0),
                         default_pad_value="minimum", image_interpolation="linear")(out)
    left, right, posterior, anterior = framing.air_mm
    air = (_voxels(left, sx), _voxels(right, sx), _voxels(posterior, sy), _voxels(anterior, sy), 0, 0)
    if any(air):
        out = tio.Pad(air, padding_mode="minimum")(out)
    extend = (0, 0, 0, 0, _voxels(max(framing.inferior_mm, 0), sz), _voxels(max(framing.superior_mm, 0), sz))
    if any(extend):
        out = tio.Pad(extend, padding_mode="edge")(out)
    cut = (0, _voxels(min(framing.right_mm, 0), sx), 0, 0, _voxels(min(framing.inferior_mm, 0), sz),
           _voxels(min(framing.superior_mm, 0), sz))
    if any(cut):
        out = tio.Crop(cut)(out)
    if framing.below_head_mm is not None:
        out = _cut_below_head(out, framing.below_head_mm)
    return out


def _cut_below_head(subject: tio.Subject, below_head_mm: float) -> tio.Subject:
    """The subject with its inferior slices removed up to ``below_head_mm`` below the femoral head's centre."""
    center, _ = head_center_mm(subject["label"])
    image = subject["image"]
    slice_z = (np.linalg.inv(image.affine) @ np.append(center - [0.0, 0.0, below_head_mm], 1.0))[2]
    drop = int(np.clip(np.floor(slice_z), 0, image.spatial_shape[2] - 1))
    return tio.Crop((0, 0, 0, 0, drop, 0))(subject) if drop else subject


def _with_metal_stem(subject: tio.Subject) -> tio.Subject:
    """Add a metal rod where the right femoral neck and shaft would be: the left label's box centre mirrored across
    the sagittal plane x = 0, from 60 mm below to 20 mm above it."""
    image = subject["image"]
    cx, cy, cz = box_center_mm(subject["label"])
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in image.spatial_shape), indexing="ij"), -1)
    world = grid @ image.affine[:3, :3].T + image.affine[:3, 3]
    rod = (np.hypot(world[..., 0] + cx, world[..., 1] - cy) < 8.0) & (world[..., 2] > cz - 60) & (world[..., 2] < cz + 20)
    data = image.data.clone()
    data[0][torch.from_numpy(rod)] = METAL_HU
    out = tio.Subject(dict(subject))
    out["image"] = tio.ScalarImage(tensor=data, affine=image.affine)
    out.update_attributes()
    return out
