"""Per-case segmentation metrics in millimetres, with explicit definitions.

Tools disagree on surface metrics, so ours are defined here (and in the README):

* **overlap**: with TP, FP, FN, TN voxel counts, ``dice = 2TP / (2TP + FP + FN)``, ``jaccard = TP / (TP + FP + FN)``,
  ``sensitivity = TP / (TP + FN)``, ``specificity = TN / (TN + FP)``, ``precision = TP / (TP + FP)``,
  ``rvd = (|P| - |T|) / |T|`` (relative volume difference, signed: positive = over-segmentation).
* **surface** of a mask: its voxels with at least one of their six face-neighbours outside the mask; voxels on
  the array border count as surface (outside the array is background).
* **distances**: between voxel centres, scaled by the voxel ``spacing`` (mm, array-axis order), from every
  surface voxel of one mask to the nearest surface voxel of the other (exact Euclidean nearest neighbours,
  found with a KD-tree; identical to a distance transform with ``sampling=spacing``).
* ``hd``: Hausdorff distance, the larger of the two directed maxima; ``hd95``: the larger of the two directed
  95th percentiles (linear interpolation, as NumPy and MONAI); ``assd``: the mean of all surface distances
  pooled over both directions (MONAI's symmetric mean surface distance).

Empty masks, returned the same way every time:

* both empty: overlap scores are 1, ``rvd`` and all distances are 0;
* one empty: ``dice = jaccard = 0``; a ratio whose denominator is zero is 1 (e.g. ``sensitivity`` when the
  target is empty: nothing could be missed); distances are the image diagonal in mm (the worst possible
  distance, finite so that means stay usable); ``rvd`` is ``-1`` for an empty prediction and ``nan`` for an
  empty target (a relative change from zero is undefined).

Everything after one pass over the full arrays is computed inside the bounding box of both masks (plus one
voxel), which gives the exact result while touching a small fraction of a CT volume.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

METRIC_KEYS = ("dice", "jaccard", "sensitivity", "specificity", "precision", "hd", "hd95", "assd", "rvd")
_FACE_NEIGHBOURS = ndimage.generate_binary_structure(3, 1)


def _as_bool(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype != bool:
        binary = array == 1
        if not (binary | (array == 0)).all():
            bad = np.unique(array[~(binary | (array == 0))])[:5].tolist()
            raise ValueError(f"{name} must be binary (bool or 0/1), found values such as {bad}")
        array = binary
    return array


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else float(num) / float(den)


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (array-border voxels are surface)."""
    return mask & ~ndimage.binary_erosion(mask, structure=_FACE_NEIGHBOURS, border_value=0)


def _span(hit: np.ndarray, margin: int) -> slice:
    idx = np.flatnonzero(hit)
    return slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, hit.size))


def _crop_box(a: np.ndarray, b: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """Bounding box of ``a | b`` grown by ``margin`` voxels (``None`` when both are empty).

    One pass over the full arrays (a projection along the first axis); the first axis's extent is then read
    from the much smaller block the projection leaves.
    """
    projection = np.logical_or(a.any(axis=0), b.any(axis=0))
    if not projection.any():
        return None
    rest = tuple(_span(projection.any(axis=tuple(j for j in range(projection.ndim) if j != i)), margin)
                 for i in range(projection.ndim))
    block = (slice(None), *rest)
    first = np.logical_or(a[block].any(axis=tuple(range(1, a.ndim))), b[block].any(axis=tuple(range(1, b.ndim))))
    return (_span(first, margin), *rest)


def directed_surface_distances(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``pred`` to ``target``'s surface, and the reverse.

    Both masks must be non-empty boolean arrays of the same shape. Nearest surface voxels are found exactly with
    a KD-tree over the voxel centres scaled by ``spacing`` (the same values as a Euclidean distance transform
    with ``sampling=spacing``, at a fraction of its cost on CT-sized volumes).
    """
    box = _crop_box(pred, target)
    p, t = pred[box], target[box]
    # a crop edge that is not the array's border has a background margin, so surfaces are unchanged
    scale = np.asarray(spacing, dtype=np.float64)
    points_p = np.argwhere(surface(p)) * scale
    points_t = np.argwhere(surface(t)) * scale
    dist_to_t, _ = cKDTree(points_t).query(points_p)
    dist_to_p, _ = cKDTree(points_p).query(points_t)
    return dist_to_t, dist_to_p


def dice(pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor) -> float:
    """Dice of two binary masks on one grid, by the same rules as :func:`evaluate_case` (1 when both are empty); for
    the loops that need only the overlap (validation without surface metrics, the warped prior)."""
    p, t = _as_bool(pred, "pred"), _as_bool(target, "target")
    return _ratio(2 * np.count_nonzero(p & t), np.count_nonzero(p) + np.count_nonzero(t))


def evaluate_case(
    pred: np.ndarray | torch.Tensor,
    target: np.ndarray | torch.Tensor,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> dict[str, float]:
    """All metrics of one case: keys ``dice, jaccard, sensitivity, specificity, precision, hd, hd95, assd, rvd``.

    ``pred`` and ``target`` are binary 3D arrays (numpy or torch, bool or 0/1) on the same grid; ``spacing`` is
    the voxel size in mm in array-axis order. See the module docstring for definitions and empty-mask rules.
    """
    p = _as_bool(pred, "pred")
    t = _as_bool(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} and target shape {t.shape} differ")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != p.ndim or min(spacing) <= 0:
        raise ValueError(f"spacing must give {p.ndim} positive values, got {spacing}")
    shape, size = p.shape, p.size
    box = _crop_box(p, t)
    if box is not None:  # every foreground voxel lies in the box: count and measure there
        p, t = p[box], t[box]
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    tp = int(np.count_nonzero(p & t))
    fp, fn = n_p - tp, n_t - tp
    tn = size - tp - fp - fn
    out = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "jaccard": _ratio(tp, tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
    }
    if n_t == 0:
        out["rvd"] = 0.0 if n_p == 0 else float("nan")
    else:
        out["rvd"] = (n_p - n_t) / n_t
    if n_p == 0 and n_t == 0:
        out.update(hd=0.0, hd95=0.0, assd=0.0)
    elif n_p == 0 or n_t == 0:
        diagonal = float(np.linalg.norm(np.asarray(shape) * np.asarray(spacing)))
        out.update(hd=diagonal, hd95=diagonal, assd=diagonal)
    else:
        d_pt, d_tp = directed_surface_distances(p, t, spacing)
        out["hd"] = float(max(d_pt.max(), d_tp.max()))
        out["hd95"] = float(max(np.percentile(d_pt, 95), np.percentile(d_tp, 95)))
        out["assd"] = float(np.concatenate([d_pt, d_tp]).mean())
    return {k: float(out[k]) for k in METRIC_KEYS}
