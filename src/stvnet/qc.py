"""Quality control of one prediction: is the mask plausible, and does the scan look like the training data?

``stvnet predict`` writes one record per scan (``<name>.qc.json`` and a row of ``qc.csv``): where the ROI was placed
(RAS mm) and how well the hip template matched there, the scan's HU statistics and bone fraction around it, the
predicted femur volume in mL, and the training cohort's range of each (stored in the checkpoint with the template).
A value outside the training range widened by a quarter of its span, an empty mask, a mask that reaches the scan's
edge, or a located femur that, as large as the largest training femur, would reach beyond the scan (cut off by the
field of view) is a *flag*: printed on stderr and listed in the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torchio as tio
from scipy.spatial.transform import Rotation

from data_modules.localisation import FemurLocator, Location, coarse, raw_statistics
from data_modules.roi import SIDES

#: a mask this close to a scan edge (mm) means the femur is cut off by the field of view
EDGE_MM = 5.0
#: how far beyond the training range a value may lie, as a share of that range's span, before it is flagged
RANGE_TOLERANCE = 0.25
#: QC statistics compared with the training cohort, and what a value outside its range means
CHECKS = {
    "score": "the hip template matches poorly (is the left hip in the scan?)",
    "volume_ml": "predicted femur volume outside the training range",
    "median_hu": "scan intensities unlike the training scans (median HU around the femur)",
    "p95_hu": "scan intensities unlike the training scans (95th percentile HU around the femur)",
    "bone_fraction": "bone fraction around the femur unlike the training scans",
}


def training_range(values: Sequence[float]) -> tuple[float, float]:
    """The accepted interval of a statistic: the training range widened by ``RANGE_TOLERANCE`` of its span."""
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    margin = RANGE_TOLERANCE * max(hi - lo, 1e-6 * max(abs(lo), abs(hi), 1.0))
    return lo - margin, hi + margin


def edges_touched(mask: np.ndarray, image: tio.ScalarImage, margin_mm: float = EDGE_MM) -> list[str]:
    """Anatomical sides (``inferior``, ``left``, ...) of the scan whose edge the mask comes within ``margin_mm`` of
    (the network sees air beyond the scan, so a femur cut by the field of view often stops a voxel short of it)."""
    canonical = tio.ToCanonical()(tio.LabelMap(tensor=mask[None].astype(np.uint8), affine=image.affine))
    data = canonical.data[0].numpy()
    touched = []
    for axis, names in enumerate(SIDES):
        depth = max(1, int(np.ceil(margin_mm / canonical.spacing[axis])))
        for edge, name in ((slice(0, depth), names[0]), (slice(-depth, None), names[1])):
            index = [slice(None)] * 3
            index[axis] = edge
            if data[tuple(index)].any():
                touched.append(name)
    return touched


def femur_beyond_scan(image: tio.ScalarImage, center_mm: Sequence[float], stats: dict[str, list[float]],
                      tolerance_mm: float = EDGE_MM) -> dict[str, float]:
    """Sides where a femur as large as the largest training femur, centred at ``center_mm``, would extend beyond the
    scan by more than ``tolerance_mm``: side -> mm beyond."""
    if not all(f"half_{a}_mm" in stats for a in "xyz"):
        return {}
    shape = np.asarray(image.spatial_shape)
    corners = np.array([[i, j, k] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)])
    world = corners @ image.affine[:3, :3].T + image.affine[:3, 3]
    beyond = {}
    for axis, (low, high) in enumerate(SIDES):
        half = max(stats[f"half_{'xyz'[axis]}_mm"])
        below = world[:, axis].min() - (center_mm[axis] - half)
        above = (center_mm[axis] + half) - world[:, axis].max()
        beyond.update({low: round(float(below), 1)} if below > tolerance_mm else {})
        beyond.update({high: round(float(above), 1)} if above > tolerance_mm else {})
    return beyond


def qc_record(scan: str | Path | tio.ScalarImage, mask: np.ndarray, locator: FemurLocator | None, side: str = "left",
              location: Location | None = None) -> dict[str, Any]:
    """The QC record of a mask (in the grid of ``scan``: a path or the scan read) and the list of its flags. A
    ``location`` the locator found in this scan (during prediction) is reused instead of searching again."""
    image = scan if isinstance(scan, tio.ScalarImage) else tio.ScalarImage(scan)
    volume = float(mask.astype(bool).sum() * np.prod(image.spacing) / 1000.0)
    record: dict[str, Any] = {"side": side, "volume_ml": volume}
    flags = []
    if not mask.any():
        flags.append("empty mask: no femur found")
    touched = edges_touched(mask, image)
    if touched:
        flags.append(f"the mask reaches the scan's {', '.join(touched)} edge: the femur is cut off by the field of view")
    if locator is not None:
        scan = coarse(image, locator.hu_window, locator.spacing)
        location = location or locator.locate_coarse(scan)
        record["roi_center_mm"] = [round(float(v), 1) for v in location.center_mm]
        record["roi_rotation_deg"] = [round(float(v), 1) for v in Rotation.from_matrix(location.rotation).as_euler("xyz", degrees=True)]
        beyond = femur_beyond_scan(image, location.center_mm, locator.stats)
        if beyond:
            record["femur_beyond_scan_mm"] = beyond
            flags.append("the femur reaches beyond the scan's " + ", ".join(f"{side} edge by ~{mm:.0f} mm"
                         for side, mm in beyond.items()) + ": the field of view cuts it off")
        record.update(score=locator.match_score(scan, location.center_mm, location.rotation),
                      **raw_statistics(image, location.center_mm, locator.spacing))
        for key, meaning in CHECKS.items():
            if key not in locator.stats or not np.isfinite(record[key]):
                continue
            lo, hi = training_range(locator.stats[key])
            record[f"{key}_training_range"] = [round(lo, 3), round(hi, 3)]
            # a template matching better than any training scan did is no problem (the pose search often does)
            too_high = record[key] > hi and key != "score"
            if (mask.any() or key != "volume_ml") and (record[key] < lo or too_high):
                flags.append(f"{meaning}: {record[key]:.3g} vs {lo:.3g}..{hi:.3g}")
    record["flags"] = flags
    return record
