"""The synthetic cohort: deterministic, anatomically labelled (left proximal femur only), sex differences."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_modules.synthetic import anatomy, cohort_fingerprint, make_cohort, read_parameters, sample_params
from tests.conftest import TINY_SPACING


@pytest.mark.not_in_mutation_run
def test_same_seed_gives_byte_identical_cohort(tmp_path, tiny_cohort):
    again = make_cohort(tmp_path / "again", n_subjects=14, seed=7, spacing=TINY_SPACING, workers=2)
    assert cohort_fingerprint(again) == cohort_fingerprint(tiny_cohort)
    other = make_cohort(tmp_path / "other", n_subjects=14, seed=8, spacing=TINY_SPACING, workers=1)
    assert cohort_fingerprint(other) != cohort_fingerprint(tiny_cohort)


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
