"""TorchIO preprocessing (deterministic) and augmentation (random) pipelines.

Preprocessing follows the paper: a rectangular region of interest around the left hip is cropped from every scan
after canonical (RAS) reorientation, HU windowing and resampling to a common spacing. The paper's box is fixed ("a
rectangular region in the middle-right part of the image"); here it is centred where
:mod:`data_modules.localisation` finds the femur, or at a fixed fraction of the field of view on request.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torchio as tio

from data_modules.localisation import FemurLocator, LocateFemur
from data_modules.roi import Box, label_coverage, place_box, read_box


class RoiCrop(tio.SpatialTransform):
    """Cut a box of ``roi_size`` voxels around the located femur or a fixed point (see :mod:`data_modules.roi`).

    The centre is the subject's ``roi_center_mm`` (RAS mm, set by :class:`~data_modules.localisation.LocateFemur`)
    when present, else ``center_fraction`` per axis of the (canonical) image, e.g. ``(0.25, 0.5, 0.6)`` puts the box a
    quarter of the way along x, centred in y and a little above the middle in z (``None`` centres the box). The box is
    turned by the subject's ``roi_rotation`` (the patient's pose) when the locator found one. Each image is padded with
    its minimum (air for CT, background for labels); affines are updated, so predictions map back to the scan's own
    grid. With a label, the share of it inside the box is recorded as ``label_in_roi`` and what was cut as
    ``label_cut`` (e.g. ``inferior 12 mm``): training refuses subjects whose label is cut.
    """

    def __init__(self, roi_size: Sequence[int], center_fraction: Sequence[float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.roi_size = tuple(int(s) for s in roi_size)
        self.center_fraction = None if center_fraction is None else tuple(float(f) for f in center_fraction)
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be three positive ints, got {roi_size}")
        if self.center_fraction is not None and (len(self.center_fraction) != 3 or not all(0 <= f <= 1 for f in self.center_fraction)):
            raise ValueError(f"roi_center must be three fractions in [0, 1], got {center_fraction}")
        self.args_names = ["roi_size", "center_fraction"]

    def box(self, affine: np.ndarray, shape: Sequence[int], center_mm: Sequence[float] | None = None,
            rotation: np.ndarray | None = None) -> Box:
        """Where this transform's box lies in a volume of ``shape`` voxels with ``affine``."""
        return place_box(affine, shape, self.roi_size, center_mm, rotation, self.center_fraction)

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        first = subject.get_first_image()
        box = self.box(first.affine, first.spatial_shape, subject.get("roi_center_mm"), subject.get("roi_rotation"))
        if "label" in subject:
            inside, cut = label_coverage(subject["label"].data[0].numpy(), first.affine, box)
            subject["label_in_roi"], subject["label_cut"] = inside, cut
            subject.update_attributes()  # TorchIO's Crop copies a subject's attributes, not keys set after creation
        for image in subject.get_images(intensity_only=False):
            volume = image.data[0].numpy()
            data = read_box(volume, image.affine, box, fill=float(volume.min()), nearest=isinstance(image, tio.LabelMap))
            image.set_data(torch.from_numpy(data)[None])
            image.affine = box.affine
        return subject


def windowed(target_spacing: Sequence[float] | None, hu_window: Sequence[float] = (-200.0, 1800.0)) -> tio.Compose:
    """RAS orientation, HU window scaled to [0, 1] (image only) and resampling: the fold-independent part of the
    preprocessing (what the persistent cache stores)."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    steps: list[tio.Transform] = [
        tio.ToCanonical(),
        tio.Clamp(out_min=lo, out_max=hi, include=["image"]),
        tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=(lo, hi), include=["image"]),
    ]
    if target_spacing is not None:
        steps.append(tio.Resample(tuple(float(s) for s in target_spacing)))
    return tio.Compose(steps)


def preprocessing(
    target_spacing: Sequence[float] | None,
    roi_size: Sequence[int] | None,
    roi_center: Sequence[float] | None,
    hu_window: Sequence[float] = (-200.0, 1800.0),
    locator: FemurLocator | None = None,
) -> tio.Compose:
    """Deterministic preprocessing: femur localisation (with a ``locator``; else the ROI sits at ``roi_center``),
    then :func:`windowed`, then the ROI crop."""
    steps: list[tio.Transform] = [LocateFemur(locator)] if locator is not None and roi_size is not None else []
    steps += list(windowed(target_spacing, hu_window).transforms)
    if roi_size is not None:
        steps.append(RoiCrop(roi_size, roi_center))
    return tio.Compose(steps)


def augmentation(strength: float = 1.0) -> tio.Transform | None:
    """Training augmentation: small affine, mild gamma and noise; ``strength`` scales all ranges (0 = off)."""
    if strength <= 0:
        return None
    s = float(strength)
    return tio.Compose([
        tio.RandomAffine(scales=0.08 * s, degrees=8.0 * s, translation=6.0 * s, default_pad_value="minimum", p=0.8),
        tio.RandomGamma(log_gamma=0.15 * s, p=0.5),
        tio.RandomNoise(std=(0.0, 0.02 * s), p=0.5),
    ])


#: patch samplers for queue-based training
PATCH_SAMPLERS = ("uniform", "label")


def sampler(kind: str, patch_size: Sequence[int]) -> tio.data.PatchSampler:
    """Patch sampler for queue-based training: ``uniform`` or ``label`` (half the patches centred on femur)."""
    size = tuple(int(s) for s in patch_size)
    if kind == "uniform":
        return tio.UniformSampler(size)
    if kind == "label":
        return tio.LabelSampler(size, label_name="label", label_probabilities={0: 0.5, 1: 0.5})
    raise ValueError(f"sampler must be 'uniform' or 'label', got '{kind}'")
