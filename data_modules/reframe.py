"""Re-frame a scan as other acquisitions would have framed it: a longer field of view, an off-centre patient, a rotated
patient, a femur cut by the field of view. Used to measure femur localisation (``stvnet localise``) and to test that
a checkpoint segments re-framed scans as well as the original ones.

All amounts are in mm (or degrees) in the canonical RAS frame. Longer fields of view repeat the scan's edge slices
(``edge`` padding: the iliac bones continue upwards, both thighs downwards), off-centre patients get air beside them,
rotations turn the patient about the scan's centre. Image and label are transformed together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torchio as tio


@dataclass(frozen=True)
class Framing:
    """One acquisition framing relative to the original scan.

    Attributes:
        name: short label used in tables and file names.
        superior_mm / inferior_mm: field of view extended (> 0) or cut (< 0) at the head / feet end.
        air_mm: air added beside the patient, RAS ``(left, right, posterior, anterior)``: the patient moves off centre.
        degrees: patient rotation about the RAS x, y, z axes.
    """

    name: str
    superior_mm: float = 0.0
    inferior_mm: float = 0.0
    air_mm: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    degrees: tuple[float, float, float] = (0.0, 0.0, 0.0)


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
)


def _voxels(mm: float, spacing: float) -> int:
    return int(round(abs(mm) / spacing))


def reframe(subject: tio.Subject, framing: Framing) -> tio.Subject:
    """The subject (``image`` and optional ``label``) as acquired with ``framing``, in canonical orientation."""
    out = tio.ToCanonical()(subject)
    sx, sy, sz = out.spacing
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
    cut = (0, 0, 0, 0, _voxels(min(framing.inferior_mm, 0), sz), _voxels(min(framing.superior_mm, 0), sz))
    if any(cut):
        out = tio.Crop(cut)(out)
    return out
