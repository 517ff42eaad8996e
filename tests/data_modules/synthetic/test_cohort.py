"""The synthetic cohort: deterministic, anatomically labelled (left proximal femur only), sex differences, the
surroundings of real pelvic CT (spine, bladder, bowel gas, vessels, metal) and framing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_modules.synthetic.realism import tissue_masks
from data_modules.synthetic import cohort_fingerprint, make_cohort, read_parameters
from data_modules.synthetic.anatomy import FOV_LENGTH_MM, FOV_Z_LIMITS_MM, HIP_Z_MM, anatomy, render_subject, sample_params, sample_surroundings
from tests.conftest import TINY_SPACING


@pytest.mark.slow
def test_same_seed_gives_byte_identical_cohort(tmp_path):
    """Serial and parallel generation write the same bytes; another seed writes another cohort."""
    serial = make_cohort(tmp_path / "serial", n_subjects=3, seed=7, spacing=TINY_SPACING, workers=1)
    parallel = make_cohort(tmp_path / "parallel", n_subjects=3, seed=7, spacing=TINY_SPACING, workers=2)
    assert cohort_fingerprint(parallel) == cohort_fingerprint(serial)
    other = make_cohort(tmp_path / "other", n_subjects=3, seed=8, spacing=TINY_SPACING, workers=1)
    assert cohort_fingerprint(other) != cohort_fingerprint(serial)


def test_manifest_columns_and_sex_ratio(tiny_cohort):
    table = pd.read_csv(tiny_cohort)
    assert {"subject_id", "image", "label", "sex", "age"} <= set(table.columns)
    assert set(table["sex"]) == {"M", "F"}
    # the paper's 216 F : 181 M ratio, rounded
    assert (table["sex"] == "F").sum() == round(14 * 216 / 397)


def test_label_is_exactly_the_left_femur(tiny_cohort):
    table = pd.read_csv(tiny_cohort)
    row = table.iloc[0]
    image = nib.load(tiny_cohort.parent / row["image"])
    label = np.asarray(nib.load(tiny_cohort.parent / row["label"]).dataobj)
    np.testing.assert_allclose(image.header.get_zooms(), TINY_SPACING)
    # world x of every labelled voxel: the patient's left is negative x in RAS
    idx = np.argwhere(label > 0)
    world = nib.affines.apply_affine(image.affine, idx)
    assert (world[:, 0] < -20).all(), "a labelled voxel lies on the patient's right side"
    prm = read_parameters(tiny_cohort.parent / "parameters.csv")[0]
    assert prm.subject_id == row["subject_id"]
    sdfs, affine = anatomy(prm, TINY_SPACING)
    np.testing.assert_allclose(affine, image.affine)
    np.testing.assert_array_equal(label > 0, sdfs["label"] < 0)
    assert not ((label > 0) & (sdfs["left"] >= 0)).any()
    # the shaft below the proximal-femur cut is bone in the image but not labelled
    assert ((sdfs["left"] < 0) & (label == 0)).sum() > 50
    assert not ((label > 0) & (sdfs["right"] < 0)).any()
    assert not ((label > 0) & (sdfs["pelvis"] < 0)).any()
    # distractors with bone intensities exist outside the label (pelvis and the right femur)
    hu = np.asarray(image.dataobj)
    assert ((sdfs["pelvis"] < 0).sum()) > 0 and ((sdfs["right"] < 0).sum()) > 0
    assert (hu[(label == 0) & (sdfs["pelvis"] < -1)] > 100).mean() > 0.8


def test_men_have_larger_heads_and_women_lower_density():
    rng = np.random.default_rng(0)
    men = [sample_params(i, "M", rng) for i in range(30)]
    women = [sample_params(i, "F", rng) for i in range(30)]
    assert min(2 * m.head_radius for m in men) >= 48.0 and max(2 * w.head_radius for w in women) <= 45.0
    assert np.mean([m.trabecular_hu for m in men]) > np.mean([w.trabecular_hu for w in women]) + 30


def _people(n: int) -> list:
    rng = np.random.default_rng(0)
    return [sample_params(i, "F" if i % 2 else "M", rng) for i in range(n)]


def test_framing_ranges_from_hips_only_to_abdomen_or_thigh_and_always_holds_the_hip():
    frames = [sample_surroundings(p) for p in _people(400)]
    low, high = np.array([f.fov_z_mm for f in frames]).T
    assert ((high - low >= FOV_LENGTH_MM[0]) & (high - low <= FOV_LENGTH_MM[1])).all()
    assert (low <= HIP_Z_MM[0]).all() and (high >= HIP_Z_MM[1]).all()  # the label and the acetabulum in every scan
    assert (low >= FOV_Z_LIMITS_MM[0]).all() and (high <= FOV_Z_LIMITS_MM[1]).all()
    # L5 in view (expected 11%), the thigh in view (8%); bounds > 3 standard errors below for 400 subjects
    assert (high > 115.0).mean() > 0.06 and (low < -170.0).mean() > 0.04
    assert (high < 70.0).mean() > 0.1  # hips only
    metal = pd.Series([f.metal for f in frames]).value_counts(normalize=True)
    assert 0.02 < metal["prosthesis"] < 0.09 and 0.02 < metal["screws"] < 0.09


def _rendered(kind: str, abdomen: bool = False, spacing=(2.0, 2.0, 3.0)):
    """The first subject whose surroundings have ``kind`` of metal (and with ``abdomen`` its L5 and a bowel gas pocket
    of >= 8 mm in view), rendered: (params, surroundings, distance fields, HU image, label, affine)."""
    for prm in _people(400):
        around = sample_surroundings(prm)
        in_view = around.fov_z_mm[1] > 140.0 and any(g[3] >= 8.0 for g in around.gas)
        if around.metal == kind and (in_view or not abdomen):
            sdfs, _ = anatomy(prm, spacing)
            image, label, affine = render_subject(prm, spacing)
            return prm, around, sdfs, image, label, affine
    raise AssertionError(f"no subject with {kind} metal")


def test_spine_bladder_gas_and_vessels_show_at_their_densities_outside_the_label():
    prm, around, sdfs, image, label, _ = _rendered("none", abdomen=True)
    inside = {name: (sdfs[name] < -3.0) & (label == 0) for name in ("bladder", "gas", "vessels")}
    assert np.median(image[inside["bladder"]]) == pytest.approx(around.bladder_hu, abs=15.0)
    assert np.median(image[inside["gas"]]) < -700.0
    assert np.median(image[(sdfs["vessels"] < -2.5)]) == pytest.approx(around.blood_hu, abs=25.0)
    vertebra = sdfs["spine"] < -4.0
    assert vertebra[:, :, -10:].any(), "the L5 vertebra is in view of an abdomen-framed scan"
    assert np.median(image[vertebra]) == pytest.approx(around.spine_hu, abs=50.0)
    for name in ("spine", "bladder", "gas", "vessels"):
        assert not ((sdfs[name] < 0) & (label > 0)).any(), f"{name} overlaps the labelled femur"


@pytest.mark.parametrize("kind", ["prosthesis", "screws"])
def test_metal_in_the_right_hip_saturates_and_streaks_but_spares_the_left_femur(kind):
    prm, _, sdfs, image, label, affine = _rendered(kind)
    metal = sdfs["metal"] < -1.5
    assert (image[metal] >= 3000).mean() > 0.9
    assert not ((sdfs["metal"] < 3.0) & (label > 0)).any()
    # streaks: muscle (the realism report's mask: away from bone, metal and organs) varies more in slices through the
    # metal than in the others
    soft = tissue_masks(prm, affine, image.shape)["muscle"]
    through = metal.any(axis=(0, 1))
    assert through.any() and not through.all()
    spread = [np.std(image[:, :, k][soft[:, :, k]]) for k in range(image.shape[2])]
    # (1.3-1.7x over the first four prosthesis subjects, 1.00x with the streaks removed)
    assert np.median(np.array(spread)[through]) > 1.2 * np.median(np.array(spread)[~through])
    if kind == "prosthesis":  # the right femoral head is replaced, not overlaid
        assert sdfs["right"].min() < 0
        assert not ((sdfs["right"] < 0) & (sdfs["metal"] < -prm.head_radius * 0.5)).any()
