"""The ceiling of a ROI grid: the accuracy a perfect network would reach through a run's own preprocessing.

A network sees each scan on its ROI grid (reoriented, resampled to ``target_spacing``, cropped) and is trained against
the label carried onto that grid; its probabilities are resampled (linearly) back onto the scan's own grid and
thresholded. A network that reproduced its training targets exactly would therefore still lose what the round trip
loses: sub-voxel boundaries at 2.3 mm, nearest-neighbour jaggedness of the labels, a label cut by the ROI's edge. The
**ceiling** is that perfect predictor's score: the label, through the preprocessing and back the way predictions take,
scored against the original label with :func:`~stvnet.metrics.evaluate_case`. A model's gap to it is what training,
not resolution, loses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torchio as tio

from data_modules.localisation import box_center_mm
from data_modules.transforms import preprocessing, to_scan_grid
from stvnet.metrics import evaluate_case

#: the metrics reported for a ceiling (the columns ``ceiling_<metric>``)
CEILING_METRICS = ("dice", "hd95", "assd")


def round_trip(transform: tio.Transform, image: tio.ScalarImage, label: tio.LabelMap,
               center_mm: Sequence[float] | None = None) -> np.ndarray:
    """The label carried by ``transform`` onto the network's grid, as training sees it, and back onto ``image``'s own
    grid as predictions go (:func:`~data_modules.transforms.to_scan_grid`): the probability map a perfect network
    would output (0 outside the ROI). ``center_mm`` fixes the ROI centre (RAS mm) instead of locating the femur."""
    extra = {} if center_mm is None else {"roi_center_mm": np.asarray(center_mm, float)}
    subject = transform(tio.Subject(image=image, label=label, **extra))
    return to_scan_grid(subject["label"], image)


def ceiling_scores(probabilities: np.ndarray, label: np.ndarray, spacing: Sequence[float],
                   threshold: float = 0.5) -> dict[str, float]:
    """``ceiling_dice``, ``ceiling_hd95`` (mm) and ``ceiling_assd`` (mm) of a round trip's probabilities thresholded
    at ``threshold``, against the original binary ``label`` in its own grid and ``spacing``."""
    scores = evaluate_case(probabilities > threshold, np.asarray(label) > 0, spacing)
    return {f"ceiling_{m}": scores[m] for m in CEILING_METRICS}


def grid_ceiling(data: Mapping, image_path: str, label_path: str, threshold: float = 0.5) -> dict[str, float]:
    """The ceiling of a data configuration (``target_spacing``, ``roi_size``, ``hu_window``, ``label_interpolation``
    as in ``--data``) for one scan, with the ROI centred on the label itself: the grid's own limit, whatever the
    locator (``stvnet bench --sections ceiling``)."""
    transform = preprocessing(data.get("target_spacing"), data.get("roi_size"), None,
                              data.get("hu_window", (-200.0, 1800.0)),
                              label_interpolation=data.get("label_interpolation", "nearest"))
    image, label = tio.ScalarImage(image_path), tio.LabelMap(label_path)
    prob = round_trip(transform, image, label, center_mm=box_center_mm(label))
    return ceiling_scores(prob, label.data[0].numpy(), label.spacing, threshold)

