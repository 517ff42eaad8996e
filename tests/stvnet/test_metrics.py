"""Metrics in mm against shapes with known answers and against MONAI as an independent implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from stvnet.metrics import METRIC_KEYS, dice, directed_surface_distances, evaluate_case


def sphere(shape, center, radius, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    grids = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grids, center)) <= radius**2


def test_identical_masks():
    a = sphere((30, 30, 30), (15, 15, 15), 8)
    m = evaluate_case(a, a, (0.7, 0.7, 2.5))
    assert set(m) == set(METRIC_KEYS)
    assert m["dice"] == m["jaccard"] == m["sensitivity"] == m["specificity"] == m["precision"] == 1.0
    assert m["hd"] == m["hd95"] == m["assd"] == m["rvd"] == 0.0


@pytest.mark.parametrize("axis,k,spacing", [(0, 3, (1.0, 1.0, 1.0)), (2, 2, (0.7, 0.7, 2.5)), (1, 4, (0.5, 0.8, 3.0))])
def test_shifted_sphere_hausdorff_is_shift_times_spacing(axis, k, spacing):
    a = sphere((40, 40, 40), (20, 20, 20), 9)
    b = np.roll(a, k, axis=axis)
    m = evaluate_case(b, a, spacing)
    assert m["hd"] == pytest.approx(k * spacing[axis], abs=1e-9)
    assert 0 < m["assd"] < m["hd"]


def test_concentric_spheres_hausdorff_is_radius_difference():
    spacing = (1.0, 1.0, 1.0)
    inner = sphere((50, 50, 50), (25, 25, 25), 10, spacing)
    outer = sphere((50, 50, 50), (25, 25, 25), 16, spacing)
    m = evaluate_case(inner, outer, spacing)
    assert abs(m["hd"] - 6.0) <= 1.0
    assert m["sensitivity"] < 1.0 and m["precision"] == 1.0 and m["rvd"] < 0


def test_anisotropic_spheres_in_mm():
    spacing = (0.7, 0.7, 2.5)
    shape = (100, 100, 30)
    inner = sphere(shape, (35, 35, 37.5), 12, spacing)
    outer = sphere(shape, (35, 35, 37.5), 20, spacing)
    m = evaluate_case(inner, outer, spacing)
    assert abs(m["hd"] - 8.0) <= max(spacing)
    # the same masks in voxels would give a very different number: the spacing is honoured
    assert abs(evaluate_case(inner, outer)["hd"] - m["hd"]) > 1.0


def test_overlap_counts():
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros((10, 10, 10), bool)
    a[:4] = True  # 400 voxels
    b[2:6] = True  # 400 voxels, 200 shared
    m = evaluate_case(a, b)
    assert m["dice"] == pytest.approx(0.5)
    assert m["jaccard"] == pytest.approx(200 / 600)
    assert m["sensitivity"] == pytest.approx(0.5) and m["precision"] == pytest.approx(0.5)
    assert m["specificity"] == pytest.approx(400 / 600)
    assert m["hd"] == pytest.approx(2.0)
    assert dice(a, b) == m["dice"] and dice(torch.from_numpy(a), b.astype(np.uint8)) == m["dice"]


def test_empty_masks_are_handled_consistently():
    empty = np.zeros((20, 20, 20), bool)
    full = sphere((20, 20, 20), (10, 10, 10), 5)
    both = evaluate_case(empty, empty, (1.0, 1.0, 2.0))
    assert both["dice"] == 1.0 and both["hd"] == 0.0 and both["hd95"] == 0.0 and both["assd"] == 0.0
    assert both["rvd"] == 0.0 and dice(empty, empty) == 1.0 and dice(empty, full) == dice(full, empty) == 0.0
    diag = float(np.linalg.norm([20, 20, 40]))
    missed = evaluate_case(empty, full, (1.0, 1.0, 2.0))
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0 and missed["rvd"] == -1.0
    assert missed["hd"] == missed["hd95"] == missed["assd"] == pytest.approx(diag)
    spurious = evaluate_case(full, empty, (1.0, 1.0, 2.0))
    assert spurious["dice"] == 0.0 and spurious["precision"] == 0.0 and spurious["sensitivity"] == 1.0
    assert np.isnan(spurious["rvd"]) and spurious["hd"] == pytest.approx(diag)


def test_accepts_torch_and_01_and_rejects_bad_input():
    a = sphere((16, 16, 16), (8, 8, 8), 5)
    m_np = evaluate_case(a, a.astype(np.uint8))
    m_t = evaluate_case(torch.from_numpy(a).float(), torch.from_numpy(a))
    assert m_np == m_t
    with pytest.raises(ValueError, match=r"pred must be binary .* such as \[2\.5\]"):
        evaluate_case(a * 2.5, a)
    labels = np.arange(16 ** 3).reshape(16, 16, 16) % 9  # values 0..8: the message shows the first five bad ones
    with pytest.raises(ValueError, match=r"target must be binary .* such as \[2, 3, 4, 5, 6\]$"):
        evaluate_case(a, labels)
    for metric in (evaluate_case, dice):  # the hard Dice names its arguments the same way
        with pytest.raises(ValueError, match=r"^pred must be binary"):
            metric(a * 2.5, a)
        with pytest.raises(ValueError, match=r"^target must be binary"):
            metric(a, a * 3)
    with pytest.raises(ValueError, match="differ"):
        evaluate_case(a, a[:-1])
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(a, a, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):  # a zero voxel size is no spacing at all
        evaluate_case(a, a, (1.0, 0.0, 1.0))


def test_surface_on_array_border_counts():
    a = np.ones((6, 6, 6), bool)  # fills the array: every border voxel is surface
    b = a.copy()
    b[0] = False
    assert evaluate_case(a, b)["hd"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_monai_on_random_shapes(seed):
    monai_metrics = pytest.importorskip("monai.metrics", reason="MONAI is a dev dependency")
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(20, 40, size=3))
    spacing = tuple(float(v) for v in rng.uniform(0.5, 3.0, size=3))
    a = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5) > 0.05
    b = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5) > 0.05
    ours = evaluate_case(a, b, spacing)
    p = torch.from_numpy(a)[None, None].double()
    t = torch.from_numpy(b)[None, None].double()
    hd = monai_metrics.HausdorffDistanceMetric()(p, t, spacing=spacing).item()
    hd95 = monai_metrics.HausdorffDistanceMetric(percentile=95)(p, t, spacing=spacing).item()
    assd = monai_metrics.SurfaceDistanceMetric(symmetric=True)(p, t, spacing=spacing).item()
    dice = monai_metrics.DiceMetric()(p, t).item()
    assert ours["dice"] == pytest.approx(dice, abs=1e-6)
    # MONAI works in float32: our float64 HD rounds to exactly its value
    assert np.float32(ours["hd"]) == np.float32(hd)
    # same surface distances: at MONAI's float32 precision the 95th percentiles agree within 1e-6 mm ...
    d_pt, d_tp = directed_surface_distances(a, b, spacing)
    hd95_f32 = max(torch.quantile(torch.from_numpy(d.astype(np.float32)), 0.95).item() for d in (d_pt, d_tp))
    assert abs(hd95_f32 - hd95) <= 1e-6
    # ... and our float64 value differs only by MONAI's float32 interpolation rounding
    assert abs(ours["hd95"] - hd95) <= 2e-5
    assert abs(ours["assd"] - assd) <= 1e-3


@pytest.mark.parametrize("seed", range(3))
def test_surface_distances_equal_a_distance_transform_and_ignore_empty_margins(seed):
    """KD-tree distances match scipy's EDT on the full array, and padding with background changes nothing."""
    rng = np.random.default_rng(100 + seed)
    shape = (30, 26, 22)
    spacing = tuple(float(v) for v in rng.uniform(0.4, 3.0, size=3))
    a = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > 0.1
    b = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0) > 0.1
    surface_a = a & ~ndimage.binary_erosion(a, border_value=0)
    surface_b = b & ~ndimage.binary_erosion(b, border_value=0)
    edt_to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    edt_to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    d_ab, d_ba = directed_surface_distances(a, b, spacing)
    assert np.sort(d_ab) == pytest.approx(np.sort(edt_to_b), abs=1e-9)
    assert np.sort(d_ba) == pytest.approx(np.sort(edt_to_a), abs=1e-9)
    # the same masks placed off-centre in a much larger scan: only specificity (more background) may change
    pad = ((7, 40), (3, 50), (25, 2))
    big = evaluate_case(np.pad(a, pad), np.pad(b, pad), spacing)
    small = evaluate_case(a, b, spacing)
    for key in METRIC_KEYS:
        if key != "specificity":
            assert big[key] == pytest.approx(small[key], abs=1e-12), key
    size = np.pad(a, pad).size
    fp, tn = np.count_nonzero(a & ~b), size - np.count_nonzero(a | b)
    assert big["specificity"] == pytest.approx(tn / (tn + fp), abs=1e-12)


def _sheet(shape=(12, 12, 12)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[1:11, 1:11, 3] = True  # a 10 x 10 plate one voxel thick: every voxel is on its surface
    return mask


def test_hd95_and_assd_of_a_shifted_plate_equal_the_shift_in_mm():
    target = _sheet()
    pred = np.roll(target, 2, axis=2)
    m = evaluate_case(pred, target, (0.5, 0.7, 2.5))
    assert m["hd"] == pytest.approx(5.0) and m["hd95"] == pytest.approx(5.0) and m["assd"] == pytest.approx(5.0)


def test_one_outlier_moves_hd_but_not_hd95_and_a_known_share_of_assd():
    target = _sheet()
    pred = target.copy()
    pred[5, 5, 7] = True  # 4 slices (10 mm) from the plate; the other 100 prediction voxels lie on it
    m = evaluate_case(pred, target, (0.5, 0.7, 2.5))
    assert m["hd"] == pytest.approx(10.0)
    assert m["hd95"] == pytest.approx(0.0)
    assert m["assd"] == pytest.approx(10.0 / 201)  # one distance of 10 mm among 101 + 100 surface voxels


def test_hd95_is_the_95th_percentile_of_a_known_distance_distribution():
    target = _sheet()
    pred = target.copy()
    pred[1, 1:11, 3] = False
    pred[1, 1:11, 5] = True  # one row of 10 lifted by 2 slices (5 mm); the rest (90) stays on the plate
    m = evaluate_case(pred, target, (0.5, 0.7, 2.5))
    # pred -> plate: 90 x 0 and 10 x 5 mm, so its 95th percentile is 5 mm (a 90th would be 0.5 mm);
    # plate -> pred: 90 x 0 and 10 x 0.5 mm (the neighbouring row)
    assert m["hd"] == pytest.approx(5.0) and m["hd95"] == pytest.approx(5.0)
    assert m["assd"] == pytest.approx((10 * 5.0 + 10 * 0.5) / 200)
