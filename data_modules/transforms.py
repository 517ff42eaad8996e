"""TorchIO preprocessing (deterministic) and augmentation (random) pipelines.

Preprocessing follows the paper: a rectangular region of interest around the left hip is cropped from every scan
after canonical (RAS) reorientation, HU windowing and resampling to a common spacing. The paper's box is fixed ("a
rectangular region in the middle-right part of the image"); here it is centred where
:mod:`data_modules.localisation` finds the femur, or at a fixed fraction of the field of view on request.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torchio as tio

from data_modules.localisation import FemurLocator, LocateFemur


#: names of the low and high side of each canonical (RAS) axis
SIDES = (("left", "right"), ("posterior", "anterior"), ("inferior", "superior"))


class RoiCrop(tio.SpatialTransform):
    """Crop (and pad where needed) a box of ``roi_size`` voxels around the located femur or a fixed point.

    The centre is the subject's ``roi_center_mm`` (RAS mm, set by :class:`~data_modules.localisation.LocateFemur`)
    when present, else ``center_fraction`` per axis of the (canonical) image, e.g. ``(0.25, 0.5, 0.6)`` puts the box a
    quarter of the way along x, centred in y and a little above the middle in z (``None`` centres the box). Padding
    uses each image's minimum (air for CT, background for labels). Affines are updated, so predictions can be mapped
    back to the scan's own grid. With a label, the share of it inside the box is recorded as ``label_in_roi`` and what
    was cut as ``label_cut`` (e.g. ``inferior 12 mm``): training refuses subjects whose label is cut.
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

    def start(self, shape: Sequence[int], center: Sequence[float] | None = None) -> list[int]:
        """First voxel of the box on each axis (may be negative or beyond the volume) for a voxel-space centre
        (``None``: this transform's fraction of ``shape``)."""
        if center is None:
            center = [f * n for f, n in zip(self.center_fraction or (0.5, 0.5, 0.5), shape)]
        return [int(round(c - size / 2)) for c, size in zip(center, self.roi_size)]

    def bounds(self, shape: Sequence[int], center: Sequence[float] | None = None) -> tuple[list[int], list[int]]:
        """Padding and cropping amounts ``(pad, crop)``, each as (ini, fin) per axis, for a volume shape."""
        pad, crop = [], []
        for n, size, start in zip(shape, self.roi_size, self.start(shape, center)):
            end = start + size
            pad += [max(0, -start), max(0, end - n)]
            crop += [max(0, start), max(0, n - end)]
        return pad, crop

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject.get_first_image()
        center = None
        if subject.get("roi_center_mm") is not None:
            center = (np.linalg.inv(image.affine) @ np.append(np.asarray(subject["roi_center_mm"], float), 1.0))[:3]
        if "label" in subject:
            inside, cut = label_coverage(subject["label"].data[0].numpy(), self.start(image.spatial_shape, center),
                                         self.roi_size, image.spacing)
            subject["label_in_roi"], subject["label_cut"] = inside, cut
            subject.update_attributes()  # TorchIO's Crop copies a subject's attributes, not keys set after creation
        pad, crop = self.bounds(image.spatial_shape, center)
        if any(pad):
            subject = tio.Pad(pad, padding_mode="minimum")(subject)
        if any(crop):
            subject = tio.Crop(crop)(subject)
        return subject


def label_coverage(label: np.ndarray, start: Sequence[int], size: Sequence[int],
                   spacing: Sequence[float]) -> tuple[float, str]:
    """Share of a label's voxels inside a box, and where the rest lies (``"inferior 12 mm, left 4 mm"``)."""
    idx = np.argwhere(label > 0)
    if idx.size == 0:
        return 1.0, ""
    lo, hi = np.asarray(start), np.asarray(start) + np.asarray(size)
    inside = float(np.all((idx >= lo) & (idx < hi), axis=1).mean())
    cuts = []
    for axis, (low_name, high_name) in enumerate(SIDES):
        below = (lo[axis] - idx[:, axis].min()) * spacing[axis]
        above = (idx[:, axis].max() + 1 - hi[axis]) * spacing[axis]
        cuts += [f"{low_name} {below:.0f} mm"] if below > 0 else []
        cuts += [f"{high_name} {above:.0f} mm"] if above > 0 else []
    return inside, ", ".join(cuts)


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


def sampler(kind: str, patch_size: Sequence[int]) -> tio.data.PatchSampler:
    """Patch sampler for queue-based training: ``uniform`` or ``label`` (half the patches centred on femur)."""
    size = tuple(int(s) for s in patch_size)
    if kind == "uniform":
        return tio.UniformSampler(size)
    if kind == "label":
        return tio.LabelSampler(size, label_name="label", label_probabilities={0: 0.5, 1: 0.5})
    raise ValueError(f"sampler must be 'uniform' or 'label', got '{kind}'")
