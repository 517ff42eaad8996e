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
from scipy import ndimage

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
    ``label_cut`` (e.g. ``inferior 12 mm``): training refuses subjects whose label is cut. A turned box reads labels
    with ``label_interpolation`` (``nearest``: binary; ``linear``: soft, the share of each voxel that is femur).
    """

    def __init__(self, roi_size: Sequence[int], center_fraction: Sequence[float] | None = None,
                 label_interpolation: str = "nearest", **kwargs):
        super().__init__(**kwargs)
        self.label_interpolation = check_label_interpolation(label_interpolation)
        self.roi_size = tuple(int(s) for s in roi_size)
        self.center_fraction = None if center_fraction is None else tuple(float(f) for f in center_fraction)
        if len(self.roi_size) != 3 or min(self.roi_size) < 1:
            raise ValueError(f"roi_size must be three positive ints, got {roi_size}")
        if self.center_fraction is not None and (len(self.center_fraction) != 3 or not all(0 <= f <= 1 for f in self.center_fraction)):
            raise ValueError(f"roi_center must be three fractions in [0, 1], got {center_fraction}")
        self.args_names = ["roi_size", "center_fraction", "label_interpolation"]

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
            nearest = isinstance(image, tio.LabelMap) and self.label_interpolation == "nearest"
            data = read_box(volume, image.affine, box, fill=float(volume.min()), nearest=nearest)
            image.set_data(torch.from_numpy(data)[None])
            image.affine = box.affine
        return subject


#: how labels reach the network's grid: ``nearest`` keeps them binary (jagged at a coarse spacing), ``linear`` makes
#: them soft (each voxel the share of it that is femur), so the targets keep the sub-voxel boundary
LABEL_INTERPOLATIONS = ("nearest", "linear")


def check_label_interpolation(kind: str) -> str:
    """``kind`` if it is one of :data:`LABEL_INTERPOLATIONS`."""
    if kind not in LABEL_INTERPOLATIONS:
        raise ValueError(f"label_interpolation must be one of {', '.join(LABEL_INTERPOLATIONS)}, got '{kind}'")
    return kind


def box_kernel(width: float) -> np.ndarray:
    """Weights of a box ``width`` source voxels wide centred on a voxel (each voxel weighed by how much of it the box
    covers; they sum to 1): ``box_kernel(2.3)`` is ``[0.65, 1, 0.65] / 2.3``."""
    half = max(float(width), 1.0) / 2.0
    reach = int(np.ceil(half - 0.5))
    offsets = np.arange(-reach, reach + 1, dtype=float)
    cover = np.clip(np.minimum(offsets + 0.5, half) - np.maximum(offsets - 0.5, -half), 0.0, None)
    return cover / cover.sum()


class FemurShare(tio.Transform):
    """Turn binary labels into each voxel's share of femur at ``target_spacing``: a box average over one target voxel
    (``target / spacing`` source voxels per axis, :func:`box_kernel`), which a linear resampling then reads at the
    target voxels' centres. Resampling a binary label linearly without it only samples points, and stays binary."""

    def __init__(self, target_spacing: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.target_spacing = tuple(float(s) for s in target_spacing)
        self.args_names = ["target_spacing"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in subject.get_images(intensity_only=False):
            if isinstance(image, tio.LabelMap):
                share = (image.data[0].numpy() > 0).astype(np.float32)
                for axis, (target, spacing) in enumerate(zip(self.target_spacing, image.spacing)):
                    share = ndimage.correlate1d(share, box_kernel(target / spacing), axis=axis, mode="constant")
                image.set_data(torch.from_numpy(share)[None])
        return subject


def windowed(target_spacing: Sequence[float] | None, hu_window: Sequence[float] = (-200.0, 1800.0),
             label_interpolation: str = "nearest") -> tio.Compose:
    """RAS orientation, HU window scaled to [0, 1] (image only) and resampling (labels with ``label_interpolation``):
    the fold-independent part of the preprocessing (what the persistent cache stores)."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    steps: list[tio.Transform] = [
        tio.ToCanonical(),
        tio.Clamp(out_min=lo, out_max=hi, include=["image"]),
        tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=(lo, hi), include=["image"]),
    ]
    if target_spacing is not None:
        if check_label_interpolation(label_interpolation) == "linear":
            steps.append(FemurShare(target_spacing))
        steps.append(tio.Resample(tuple(float(s) for s in target_spacing),
                                  label_interpolation=check_label_interpolation(label_interpolation)))
    return tio.Compose(steps)


def preprocessing(
    target_spacing: Sequence[float] | None,
    roi_size: Sequence[int] | None,
    roi_center: Sequence[float] | None,
    hu_window: Sequence[float] = (-200.0, 1800.0),
    locator: FemurLocator | None = None,
    label_interpolation: str = "nearest",
) -> tio.Compose:
    """Deterministic preprocessing: femur localisation (with a ``locator``; else the ROI sits at ``roi_center``),
    then :func:`windowed`, then the ROI crop."""
    steps: list[tio.Transform] = [LocateFemur(locator)] if locator is not None and roi_size is not None else []
    steps += list(windowed(target_spacing, hu_window, label_interpolation).transforms)
    if roi_size is not None:
        steps.append(RoiCrop(roi_size, roi_center, label_interpolation))
    return tio.Compose(steps)


def to_scan_grid(volume: tio.Image, scan: tio.ScalarImage) -> np.ndarray:
    """A float volume on the network's grid (probabilities, or a label as training saw it) resampled linearly onto the
    scan's own grid (0 outside the ROI): how predictions go back to the scan before they are thresholded."""
    on_grid = tio.ScalarImage(tensor=volume.data.float(), affine=volume.affine)
    return tio.Resample(scan, image_interpolation="linear")(on_grid).data[0].numpy().astype(np.float32)


def augmentation(strength: float = 1.0, label_interpolation: str = "nearest") -> tio.Transform | None:
    """Training augmentation: small affine (labels resampled with ``label_interpolation``), mild gamma and noise;
    ``strength`` scales all ranges (0 = off)."""
    if strength <= 0:
        return None
    s = float(strength)
    return tio.Compose([
        tio.RandomAffine(scales=0.08 * s, degrees=8.0 * s, translation=6.0 * s, default_pad_value="minimum", p=0.8,
                         label_interpolation=check_label_interpolation(label_interpolation)),
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
