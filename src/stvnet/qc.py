"""Quality control of one prediction: is the mask plausible, and does the scan look like the training data?

``stvnet predict`` writes one record per scan (``<name>.qc.json`` and a row of ``qc.csv``): where the ROI was placed
(RAS mm) and how well the hip template matched there, the scan's HU statistics and bone fraction around it, the
predicted femur volume in mL, and the training cohort's range of each (stored in the checkpoint with the template).
A value outside the training range widened by a quarter of its span, an empty mask, or a mask that touches the
scan's edge (a femur cut off by the field of view) is a *flag*: printed on stderr and listed in the record.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torchio as tio

from data_modules.localisation import FemurLocator
from data_modules.transforms import SIDES

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


def edges_touched(mask: np.ndarray, image: tio.ScalarImage) -> list[str]:
    """Anatomical sides (``inferior``, ``left``, ...) of the scan whose edge the mask touches."""
    canonical = tio.ToCanonical()(tio.LabelMap(tensor=mask[None].astype(np.uint8), affine=image.affine)).data[0].numpy()
    touched = []
    for axis, names in enumerate(SIDES):
        for end, name in zip((0, -1), names):
            if np.take(canonical, end, axis=axis).any():
                touched.append(name)
    return touched


def qc_record(image_path: str, mask: np.ndarray, locator: FemurLocator | None, side: str = "left") -> dict[str, Any]:
    """The QC record of a mask (in the grid of the scan at ``image_path``) and the list of its flags."""
    image = tio.ScalarImage(image_path)
    volume = float(mask.astype(bool).sum() * np.prod(image.spacing) / 1000.0)
    record: dict[str, Any] = {"scan": str(image_path), "side": side, "volume_ml": volume}
    flags = []
    if not mask.any():
        flags.append("empty mask: no femur found")
    touched = edges_touched(mask, image)
    if touched:
        flags.append(f"the mask touches the scan's {', '.join(touched)} edge: the femur is cut off by the field of view")
    if locator is not None:
        location = locator.locate(image)
        record["roi_center_mm"] = [round(float(v), 1) for v in location.center_mm]
        record.update(locator.describe(image, location.center_mm))
        record["volume_ml"] = volume
        for key, meaning in CHECKS.items():
            if key not in locator.stats or not np.isfinite(record[key]):
                continue
            lo, hi = training_range(locator.stats[key])
            record[f"{key}_training_range"] = [round(lo, 3), round(hi, 3)]
            if mask.any() or key != "volume_ml":
                if not lo <= record[key] <= hi:
                    flags.append(f"{meaning}: {record[key]:.3g} vs {lo:.3g}..{hi:.3g}")
    record["flags"] = flags
    return record
