"""TorchIO preprocessing (deterministic) and augmentation (random) pipelines.

Preprocessing follows the paper: a fixed rectangular region of interest around the left hip is cropped
from every scan ("a rectangular region in the middle-right part of the image", i.e. the patient's left)
after canonical (RAS) reorientation, HU windowing and resampling to a common spacing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torchio as tio


class RoiCrop(tio.SpatialTransform):
    """Crop (and pad where needed) a box of ``roi_size`` voxels centred at a fraction of the field of view.

    ``center_fraction`` is per axis of the (canonical) image, e.g. ``(0.25, 0.5, 0.6)`` puts the box a quarter
    of the way along x (patient's left in RAS), centred in y and a little above the middle in z. ``None``
    centres the box. Padding uses each image's minimum (air for CT, background for labels). Affines are
    updated, so predictions can be mapped back to the scan's own grid.
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

    def bounds(self, shape: Sequence[int]) -> tuple[list[int], list[int]]:
        """Padding and cropping amounts ``(pad, crop)``, each as (ini, fin) per axis, for a volume shape."""
        pad, crop = [], []
        fractions = self.center_fraction or (0.5, 0.5, 0.5)
        for n, size, frac in zip(shape, self.roi_size, fractions):
            start = int(round(frac * n - size / 2))
            end = start + size
            pad += [max(0, -start), max(0, end - n)]
            crop += [max(0, start), max(0, n - end)]
        return pad, crop

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        pad, crop = self.bounds(subject.spatial_shape)
        if any(pad):
            subject = tio.Pad(pad, padding_mode="minimum")(subject)
        if any(crop):
            subject = tio.Crop(crop)(subject)
        return subject


def preprocessing(
    target_spacing: Sequence[float] | None,
    roi_size: Sequence[int] | None,
    roi_center: Sequence[float] | None,
    hu_window: Sequence[float] = (-200.0, 1800.0),
) -> tio.Compose:
    """Deterministic preprocessing: RAS orientation, HU window scaled to [0, 1], resampling, ROI crop."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    steps: list[tio.Transform] = [
        tio.ToCanonical(),
        tio.Clamp(out_min=lo, out_max=hi, include=["image"]),
        tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=(lo, hi), include=["image"]),
    ]
    if target_spacing is not None:
        steps.append(tio.Resample(tuple(float(s) for s in target_spacing)))
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
