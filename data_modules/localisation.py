"""Find the left proximal femur anywhere in a scan: normalised cross-correlation with a hip template.

Why this method. The ROI must land on the femur whatever the field of view (hips only, abdomen to knee), table
height, patient offset and small rotations. A fixed fraction of the field of view fails as soon as the framing
changes. Template matching needs no extra annotation and no extra training run: the template is the mean coarse
(6 mm) image of the fold's *training* scans around each label's bounding-box centre, built like the shape prior and
stored in the checkpoint next to it. Normalised cross-correlation (``skimage.feature.match_template``, computed by FFT
over the whole scan) is invariant to the scan's overall brightness and contrast, and the template carries the
asymmetric context of the *left* hip (the pelvis and the midline lie to its right), so the right hip correlates less.
The peak is where the ROI is centred; its height is kept as a QC score.

The patient's pose. Patients lie turned by some degrees on the table; the network was trained on the cohort's range
of poses. Around each of the best :data:`CANDIDATE_PEAKS` separate peaks (a turned femur lowers the true peak, so a
look-alike may top it), the template is matched against the scan turned about each RAS axis (two coordinate sweeps
over ``±max_rotation`` degrees in 5° steps, refined by Powell's method, the centre re-matched after each); the ROI box
is centred on the best posed match and turned by its rotation (:mod:`data_modules.roi`), so every ROI shows the femur
in the training pose and predictions are mapped back through the turned box. ``max_rotation: 0`` keeps axis-aligned
boxes at the highest peak. All of it runs the same way in training, evaluation and ``stvnet predict``.

Limits (measured in the README): anatomy the template never saw lowers the peak; a scan without a left hip still
has a peak somewhere, so predict checks the ROI's contents
against the training cohort (see :mod:`stvnet.qc`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torchio as tio
from scipy import ndimage, optimize
from scipy.spatial.transform import Rotation
from skimage.feature import match_template, peak_local_max

from data_modules.errors import InvalidInput
from data_modules.roi import place_box, read_box

#: coarse grid of the search (mm): fine enough for a ROI margin of ~20 mm, coarse enough for a whole scan in < 1 s
COARSE_SPACING = 6.0
#: template extent (mm, RAS): the proximal femur plus the acetabulum and part of the pelvis around it
TEMPLATE_MM = (144.0, 144.0, 168.0)
#: HU above which a voxel counts as bone in the QC statistics
BONE_HU = 250.0
#: pose search: degrees between the angles of the coarse sweeps about each axis (then refined continuously)
ROTATION_STEP = 5.0
#: coordinate sweeps over the whole range before the continuous refinement
SWEEPS = 2
#: coarse voxels the centre may move when it is re-matched in a turned frame
RECENTRE_VOXELS = 3
#: separate correlation peaks whose poses are searched (the best posed match wins)
CANDIDATE_PEAKS = 3


def coarse(image: tio.ScalarImage, hu_window: Sequence[float], spacing: float = COARSE_SPACING) -> tio.ScalarImage:
    """The scan in canonical (RAS) orientation, HU-windowed to [0, 1] and resampled to ``spacing`` mm."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    return tio.Compose([
        tio.ToCanonical(),
        tio.Clamp(out_min=lo, out_max=hi),
        tio.RescaleIntensity(out_min_max=(0.0, 1.0), in_min_max=(lo, hi)),
        tio.Resample(spacing),
    ])(image)


def box_center_mm(label: tio.LabelMap) -> np.ndarray:
    """World (RAS mm) centre of the label's bounding box: where the ROI should be centred."""
    idx = np.argwhere(label.data[0].numpy() > 0)
    if idx.size == 0:
        raise ValueError(f"{label.path}: empty label, no femur to centre on")
    mid = (idx.min(0) + idx.max(0)) / 2.0
    return (label.affine @ np.append(mid, 1.0))[:3]


#: how far below the top of the femur the femoral head's inscribed sphere is searched (mm): the head and the neck
HEAD_SEARCH_MM = 70.0


def head_center_mm(label: tio.LabelMap) -> tuple[np.ndarray, float]:
    """World (RAS mm) centre and radius (mm) of the femoral head: the largest sphere inscribed in the label's top
    :data:`HEAD_SEARCH_MM` (the maximum of its Euclidean distance transform, in mm), the point a QCT reader calls the
    head centre and where the field-of-view framings below the head are measured from."""
    canonical = tio.ToCanonical()(label)
    mask = canonical.data[0].numpy() > 0
    if not mask.any():
        raise ValueError(f"{label.path}: empty label, no femoral head")
    top = int(np.nonzero(mask.any(axis=(0, 1)))[0].max())
    lowest = max(0, top - int(np.ceil(HEAD_SEARCH_MM / canonical.spacing[2])))
    mask[..., :lowest] = False
    distance = ndimage.distance_transform_edt(mask, sampling=canonical.spacing)
    peak = np.array(np.unravel_index(int(np.argmax(distance)), distance.shape), float)
    return (canonical.affine @ np.append(peak, 1.0))[:3], float(distance.max())


def half_extents_mm(label: tio.LabelMap) -> dict[str, float]:
    """Half the label's extent along each RAS axis in mm (voxel edges included): how far the femur reaches from the
    ROI centre, which predict's QC uses to tell a femur cut off by the field of view."""
    idx = np.argwhere(label.data[0].numpy() > 0)
    corners = np.array([[a, b, c] for a in (idx[:, 0].min() - 0.5, idx[:, 0].max() + 0.5)
                        for b in (idx[:, 1].min() - 0.5, idx[:, 1].max() + 0.5)
                        for c in (idx[:, 2].min() - 0.5, idx[:, 2].max() + 0.5)])
    world = corners @ label.affine[:3, :3].T
    return {f"half_{axis}_mm": float(np.ptp(world[:, i]) / 2) for i, axis in enumerate("xyz")}


def label_statistics(label: tio.LabelMap) -> dict[str, float]:
    """What the training cohort's labels tell predict's QC: volume in mL and half extents in mm."""
    return {"volume_ml": float((label.data > 0).sum().item() * np.prod(label.spacing) / 1000.0),
            **half_extents_mm(label)}


def template_shape(spacing: float = COARSE_SPACING) -> tuple[int, int, int]:
    """Voxels of the template box at a coarse spacing."""
    return tuple(int(round(s / spacing)) for s in TEMPLATE_MM)


def raw_statistics(image: tio.ScalarImage, center_mm: Sequence[float], spacing: float = COARSE_SPACING) -> dict[str, float]:
    """HU median, 95th percentile and bone fraction (> ``BONE_HU``) in the template box around ``center_mm`` (raw HU
    resampled to the coarse spacing): what predict's QC compares with the training scans."""
    raw = tio.Resample(spacing)(tio.ToCanonical()(image))
    box = _box(raw, center_mm, template_shape(spacing), fill=np.nan)
    inside = box[np.isfinite(box)]
    if not inside.size:
        return {"median_hu": float("nan"), "p95_hu": float("nan"), "bone_fraction": float("nan")}
    return {"median_hu": float(np.median(inside)), "p95_hu": float(np.percentile(inside, 95)),
            "bone_fraction": float((inside > BONE_HU).mean())}


def _box(image: tio.Image, center_mm: Sequence[float], size: Sequence[int], fill: float) -> np.ndarray:
    """A ``size`` box of ``image`` around ``center_mm`` (``fill`` outside the image), as float32."""
    array = image.data[0].numpy().astype(np.float32)
    return read_box(array, image.affine, place_box(image.affine, array.shape, size, center_mm), fill)


def _subvoxel_offset(values: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """Offset of a maximum from its voxel along each axis, from a parabola through the peak and its neighbours."""
    offset = np.zeros(3)
    for axis in range(3):
        if 0 < peak[axis] < values.shape[axis] - 1:
            before, after = peak.copy(), peak.copy()
            before[axis] -= 1
            after[axis] += 1
            lo, mid, hi = values[tuple(before)], values[tuple(peak)], values[tuple(after)]
            curvature = lo - 2 * mid + hi
            offset[axis] = 0.5 * (lo - hi) / curvature if curvature < 0 else 0.0
    return offset


def rotation_matrix(degrees: Sequence[float]) -> np.ndarray:
    """The 3 x 3 rotation about the RAS x, y and z axes (in that order) by ``degrees``."""
    return Rotation.from_euler("xyz", np.asarray(degrees, float), degrees=True).as_matrix()


def _turned_box(array: np.ndarray, affine: np.ndarray, center_mm: np.ndarray, rotation: np.ndarray,
                shape: Sequence[int]) -> np.ndarray:
    """A ``shape`` box of a coarse scan around ``center_mm`` whose axes are turned by ``rotation`` (linear
    interpolation, 0 outside), laid out like :func:`_box` (voxel ``shape / 2`` at the centre)."""
    linear = np.linalg.inv(affine[:3, :3]) @ rotation @ affine[:3, :3]
    center = voxel_of_affine(affine, center_mm)
    offset = center - linear @ (np.asarray(shape, float) / 2.0)
    return ndimage.affine_transform(array, linear, offset=offset, output_shape=tuple(shape), order=1, mode="nearest")


def _correlation(box: np.ndarray, template: np.ndarray) -> float:
    """Pearson correlation of a box with the template; 0 for a box of one value (a water phantom, a blank region),
    which correlates with nothing."""
    return float(np.corrcoef(box.ravel(), template.ravel())[0, 1]) if np.ptp(box) > 0 else 0.0


def voxel_of_affine(affine: np.ndarray, point_mm: Sequence[float]) -> np.ndarray:
    """Continuous voxel index of a world point in a grid with ``affine``."""
    return (np.linalg.inv(affine) @ np.append(np.asarray(point_mm, float), 1.0))[:3]


@dataclass
class Location:
    """Where the femur was found: the ROI centre (RAS mm), the patient's pose (3 x 3 rotation of the ROI box, RAS;
    identity when not searched) and the correlation peak (1 = a perfect match)."""

    center_mm: np.ndarray
    score: float
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))


@dataclass
class FemurLocator:
    """The hip template and the training cohort's statistics that QC compares new scans against.

    Attributes:
        template: mean coarse image around the femur, ``[X, Y, Z]`` at ``spacing`` mm (RAS).
        spacing: coarse voxel size in mm.
        hu_window: the windowing used to build the template.
        max_rotation: the patient's pose is searched within this many degrees about each axis (0: not searched).
        stats: per training subject, name -> list of values (``score``, ``volume_ml``, ``median_hu``, ``p95_hu``,
            ``bone_fraction``): the ranges predict's QC checks against.
    """

    template: np.ndarray
    spacing: float
    hu_window: tuple[float, float]
    max_rotation: float = 0.0
    stats: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def build(cls, subjects: Iterable[tio.Subject], hu_window: Sequence[float], spacing: float = COARSE_SPACING,
              max_rotation: float = 0.0) -> FemurLocator:
        """The template of training subjects (with ``image`` and ``label``), read and resampled here."""
        scans, centers, stats = [], [], []
        for subject in subjects:
            center = box_center_mm(subject["label"])
            scans.append(coarse(subject["image"], hu_window, spacing))
            centers.append(center)
            stats.append({**raw_statistics(subject["image"], center, spacing), **label_statistics(subject["label"])})
        return cls.from_coarse(scans, centers, stats, hu_window, spacing, max_rotation)

    @classmethod
    def from_coarse(cls, scans: Sequence[tio.ScalarImage], centers: Sequence[Sequence[float]],
                    stats: Sequence[dict[str, float]], hu_window: Sequence[float],
                    spacing: float = COARSE_SPACING, max_rotation: float = 0.0) -> FemurLocator:
        """The template from training scans already windowed and resampled by :func:`coarse` (e.g. from the
        preprocessed cache), their label-box centres, :func:`raw_statistics` and :func:`label_statistics`."""
        if not scans:
            raise ValueError("the femur template needs at least one training subject")
        size = template_shape(spacing)
        boxes = [_box(scan, center, size, fill=0.0) for scan, center in zip(scans, centers)]
        locator = cls(np.mean(boxes, axis=0).astype(np.float32), float(spacing), (float(hu_window[0]), float(hu_window[1])),
                      float(max_rotation))
        rows = [{"score": locator.match_score(scan, center), **row} for scan, center, row in zip(scans, centers, stats)]
        locator.stats = {k: [float(r[k]) for r in rows] for k in rows[0]}
        return locator

    def locate(self, image: tio.ScalarImage) -> Location:
        """The ROI centre for a scan: the peak of the normalised cross-correlation with the template."""
        return self.locate_coarse(coarse(image, self.hu_window, self.spacing))

    def locate_coarse(self, scan: tio.ScalarImage) -> Location:
        """:meth:`locate` for a scan already passed through :func:`coarse`."""
        array = scan.data[0].numpy().astype(np.float32)
        if array.size == 0 or array.min() == array.max():
            raise InvalidInput(f"no contrast within the HU window {list(self.hu_window)} at the locator's "
                               f"{self.spacing:g} mm: no femur to find; check that the scan is a CT in Hounsfield "
                               "units (rescale slope and intercept applied)")
        # the scan continues past its edges as its border voxels do (a scan cut through the femur, a small field of
        # view), so the template may be centred anywhere in the scan
        pad = [(t // 2, t - 1 - t // 2) for t in self.template.shape]
        padded = np.pad(array, pad, mode="edge")
        ncc = match_template(padded, self.template)  # ncc[i]: the template centred on the scan's voxel i
        if self.max_rotation <= 0:
            return self._location(ncc, np.array(np.unravel_index(int(np.argmax(ncc)), ncc.shape)), scan.affine)
        # the axis-aligned peak may be a look-alike (a turned patient lowers the true one): the best few separate
        # peaks are each posed, and the best posed match wins
        half = min(self.template.shape) // 2
        peaks = peak_local_max(ncc, min_distance=half, num_peaks=CANDIDATE_PEAKS, exclude_border=False)
        if len(peaks) == 0:  # a plateau has no local maximum: its first voxel is as good as any
            peaks = [np.array(np.unravel_index(int(np.argmax(ncc)), ncc.shape))]
        posed = [self._pose(array, scan.affine, self._location(ncc, peak, scan.affine)) for peak in peaks]
        return max(posed, key=lambda location: location.score)

    @staticmethod
    def _location(ncc: np.ndarray, peak: np.ndarray, affine: np.ndarray) -> Location:
        refined = peak + _subvoxel_offset(ncc, peak)
        return Location((affine @ np.append(refined, 1.0))[:3], float(ncc[tuple(peak)]))

    def _pose(self, array: np.ndarray, affine: np.ndarray, location: Location) -> Location:
        """Search the rotation of the ROI box that best matches the template: :data:`SWEEPS` coordinate sweeps over
        the whole range in :data:`ROTATION_STEP` steps, then Powell's method from the best, re-matching the centre in
        the turned frame after each."""
        def score(angles: np.ndarray, center: np.ndarray) -> float:
            return self._turned_score(array, affine, center, rotation_matrix(angles))

        angles, center = np.zeros(3), location.center_mm
        grid = np.arange(-self.max_rotation, self.max_rotation + 1e-9, ROTATION_STEP)
        for _ in range(SWEEPS):
            for axis in range(3):
                scores = [score(np.r_[angles[:axis], a, angles[axis + 1:]], center) for a in grid]
                angles[axis] = grid[int(np.argmax(scores))]
            center = self._recentre(array, affine, center, rotation_matrix(angles))
        best = optimize.minimize(lambda a: -score(a, center), angles, method="Powell",
                                 bounds=[(-self.max_rotation, self.max_rotation)] * 3, options={"xtol": 0.2, "ftol": 1e-5})
        rotation = rotation_matrix(best.x)
        center = self._recentre(array, affine, center, rotation)
        return Location(center, self._turned_score(array, affine, center, rotation), rotation)

    def _turned_score(self, array: np.ndarray, affine: np.ndarray, center: np.ndarray, rotation: np.ndarray) -> float:
        return _correlation(_turned_box(array, affine, center, rotation, self.template.shape), self.template)

    def _recentre(self, array: np.ndarray, affine: np.ndarray, center: np.ndarray, rotation: np.ndarray) -> np.ndarray:
        """The centre re-matched within :data:`RECENTRE_VOXELS` in the frame turned by ``rotation``."""
        margin = RECENTRE_VOXELS
        region = _turned_box(array, affine, center, rotation, np.asarray(self.template.shape) + 2 * margin)
        ncc = match_template(region, self.template)
        peak = np.array(np.unravel_index(int(np.argmax(ncc)), ncc.shape))
        shift = peak + _subvoxel_offset(ncc, peak) - margin  # coarse voxels along the turned axes
        return center + rotation @ affine[:3, :3] @ shift

    def match_score(self, scan: tio.ScalarImage, center_mm: Sequence[float], rotation: np.ndarray | None = None) -> float:
        """Correlation of the template with a coarse scan's box around ``center_mm`` (turned by ``rotation``)."""
        if rotation is not None:
            return self._turned_score(scan.data[0].numpy().astype(np.float32), scan.affine,
                                      np.asarray(center_mm, float), rotation)
        return _correlation(_box(scan, center_mm, self.template.shape, fill=0.0), self.template)

    def digest(self) -> str:
        """A short hash of what decides where this locator puts a ROI (template, spacing, window, pose range, the
        peaks searched): the key of the ROI locations the cache keeps."""
        payload = self.template.tobytes() + json.dumps([self.spacing, list(self.hu_window), self.max_rotation,
                                                        CANDIDATE_PEAKS]).encode()
        return hashlib.sha1(payload).hexdigest()[:16]

    def state_dict(self) -> dict:
        """What a checkpoint stores (tensors and plain types)."""
        return {"template": torch.from_numpy(self.template), "spacing": self.spacing, "hu_window": list(self.hu_window),
                "max_rotation": self.max_rotation, "stats": self.stats}

    @classmethod
    def from_state_dict(cls, state: dict) -> FemurLocator:
        return cls(np.asarray(state["template"], dtype=np.float32), float(state["spacing"]),
                   tuple(float(v) for v in state["hu_window"]), float(state.get("max_rotation", 0.0)),
                   dict(state.get("stats") or {}))


class LocateFemur(tio.Transform):
    """Record the located ROI centre (RAS mm) and the patient's pose in the subject as ``roi_center_mm`` and
    ``roi_rotation`` (read by ``RoiCrop``)."""

    def __init__(self, locator: FemurLocator, **kwargs):
        super().__init__(**kwargs)
        self.locator = locator
        self.args_names = ["locator"]

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        location = self.locator.locate(subject["image"])
        subject["roi_center_mm"] = location.center_mm
        subject["roi_rotation"] = location.rotation
        subject["locator_score"] = location.score
        subject.update_attributes()  # TorchIO's Crop copies a subject's attributes, not keys set after creation
        return subject
