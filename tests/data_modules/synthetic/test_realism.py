"""The realism report (`stvnet synth --report`): each tissue measured on exactly its voxels, against published ranges."""

from __future__ import annotations

import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_modules.synthetic.realism import PROFILE_MM, PUBLISHED, REAL_CT, in_range, measure_cohort, tissue_masks
from data_modules.synthetic import make_cohort, read_parameters
from data_modules.synthetic.anatomy import coverage, normal_extent, anatomy, sample_params, sample_surroundings
from stvnet.cli import main as cli_main
from tests.conftest import png_colours


@pytest.fixture(scope="module")
def measured(tiny_cohort):
    return measure_cohort(tiny_cohort, subjects=3)


def test_each_tissue_is_measured_on_its_own_voxels(tiny_cohort, measured):
    """The generator renders trabecular bone at its density field, muscle at the subject's muscle_hu, fat at its
    fat_hu, urine and the vertebrae at theirs (plus texture and noise): the medians measured on the re-rendered masks
    find those values, so no mask mixes tissues."""
    table, pooled, _ = measured
    params = {p.subject_id: p for p in read_parameters(tiny_cohort.parent / "parameters.csv")}
    manifest = pd.read_csv(tiny_cohort, dtype={"subject_id": str}).set_index("subject_id")
    for row in table.itertuples(index=False):
        prm = params[row.subject_id]
        img = nib.load(str(tiny_cohort.parent / manifest.loc[row.subject_id, "image"]))
        sdfs, _ = anatomy(prm, tuple(abs(float(img.affine[i, i])) for i in range(3)),
                          origin=tuple(float(v) for v in img.affine[:3, 3]), shape=img.shape)
        rendered = np.median(sdfs["left_trabecular"][tissue_masks(prm, img.affine, img.shape)["trabecular"]])
        assert row[table.columns.get_loc("trabecular median")] == pytest.approx(rendered, abs=40.0)
        assert row[table.columns.get_loc("muscle median")] == pytest.approx(prm.muscle_hu, abs=10.0)
        assert row[table.columns.get_loc("fat median")] == pytest.approx(prm.fat_hu, abs=15.0)
        around = sample_surroundings(prm)
        assert row[table.columns.get_loc("bladder median")] == pytest.approx(around.bladder_hu, abs=10.0)
        assert row[table.columns.get_loc("vertebra median")] == pytest.approx(around.spine_hu, abs=40.0)
    assert (table["cortical p99"] > table["trabecular p99"] + 150.0).all()  # at 3 x 3 x 4 mm the thin shell is smeared
    assert set(pooled) == {"femur", "cortical", "trabecular", "pelvis", "muscle", "fat", "bladder", "vertebra"}


@pytest.mark.heavy
@pytest.mark.not_in_mutation_run
def test_the_default_cohorts_tissues_fall_inside_the_published_ranges(tmp_path):
    """Issue 16's acceptance: every subject's trabecular median, cortical p99, muscle and fat medians lie inside the
    published QCT ranges at the default cohort's voxel size, and at the real CT's 3 mm the femur's median and upper
    percentiles are within 40% of the real scan's (the first generator's were 2.6, 2.4 and 1.8 times them)."""
    manifest = make_cohort(tmp_path, n_subjects=3, seed=0, workers=2)
    table, _, _ = measure_cohort(manifest)
    assert (in_range(table)["inside"] == 1.0).all(), in_range(table)
    # subjects spread widely (96-277 HU femur medians at 3 mm over 10 v4 subjects, whose medians were 213 / 414 / 509
    # HU), so three subjects' median is held to 40% of the one real scan's
    for stat, real in REAL_CT["femur"].items():
        assert table[f"femur {stat} at 3 mm"].median() == pytest.approx(real, rel=0.4)


def test_bone_density_falls_with_age_and_osteoporosis_and_narrow_joints_come_with_osteoarthritis():
    rng = np.random.default_rng(0)
    people = [sample_params(i, sex, rng) for i in range(400) for sex in ("F", "M")]
    ages = np.array([p.age for p in people])
    trabecular = np.array([p.trabecular_hu for p in people])
    assert np.corrcoef(ages, trabecular)[0, 1] < -0.3
    assert np.corrcoef(ages, [p.cortical_thickness for p in people])[0, 1] < -0.1
    old = ages >= 75
    porotic = np.array([p.osteoporotic for p in people])
    assert trabecular[porotic & old].mean() < 0.8 * trabecular[~porotic & old].mean()
    assert porotic[old].mean() > porotic[~old].mean()
    arthritic = np.array([p.osteoarthritic for p in people])
    joint = np.array([p.joint_space for p in people])
    assert joint[arthritic].max() <= 1.5 <= joint[~arthritic].min()
    assert all(p.head_cortex < p.thin_cortex < p.cortical_thickness for p in people)
    assert all(p.pelvis_hu < p.trabecular_hu for p in people if 50.0 < p.pelvis_hu)


def test_a_voxel_holds_the_share_of_a_surface_its_extent_across_the_surface_spans():
    """Partial volume: on 1 x 1 x 2.5 mm voxels a surface parallel to the slices is spread over the slice thickness,
    one across them over the pixel; a 0.5 mm shell lying in one 2.5 mm slice fills a fifth of it."""
    z = (np.arange(9) - 4) * 2.5
    across_slices = np.broadcast_to(z[None, None, :], (5, 5, 9)).astype(np.float32)  # distance to the plane z = 0
    extent = normal_extent(across_slices, (1.0, 1.0, 2.5))
    assert np.allclose(extent, 2.5, atol=1e-4)
    x = np.broadcast_to((np.arange(9) - 4.0)[:, None, None], (9, 5, 5)).astype(np.float32)
    assert np.allclose(normal_extent(x, (1.0, 1.0, 2.5)), 1.0, atol=1e-4)
    shell = coverage(across_slices, extent) - coverage(across_slices + 0.5, extent)  # inside: z < 0, core z < -0.5
    assert shell[2, 2, 4] == pytest.approx(0.2) and shell[2, 2, 3] == 0.0 and shell[2, 2, 5] == 0.0


def test_the_joint_space_profile_runs_from_the_heads_core_through_its_cortex(tiny_cohort, measured):
    table, _, profiles = measured
    params = {p.subject_id: p for p in read_parameters(tiny_cohort.parent / "parameters.csv")}
    for profile, sid in zip(profiles, table["subject_id"]):
        prm = params[sid]
        assert profile[0] == pytest.approx(prm.trabecular_hu, abs=120.0)  # the head's centre
        peak_at = PROFILE_MM[np.argmax(profile)]
        assert abs(peak_at - prm.head_radius) <= 8.0  # the brightest point is the head's (or the cup's) cortex


def test_in_range_counts_the_subjects_inside_each_published_range():
    table = pd.DataFrame({"trabecular median": [40.0, 100.0, 300.0, 360.0], "cortical p99": [1000.0] * 4,
                          "muscle median": [45.0] * 4, "fat median": [-100.0, -100.0, -20.0, -100.0],
                          "bladder median": [5.0, np.nan, 30.0, np.nan], "vertebra median": [150.0] * 4})
    checks = in_range(table).set_index("tissue")
    assert checks.loc["trabecular", "inside"] == 0.5 and checks.loc["fat", "inside"] == 0.75
    assert checks.loc["bladder", "inside"] == 0.5  # of the two subjects with a bladder in view
    assert checks.loc["trabecular", "lowest"] == 40.0 and checks.loc["trabecular", "highest"] == 360.0
    assert checks.loc["cortical", "published"] == "300 to 1500 HU"


@pytest.mark.not_in_mutation_run
def test_synth_report_writes_the_table_and_figures(tiny_cohort, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort.parent, cohort)
    assert cli_main(["synth", "--out", str(cohort), "--report", "--report-subjects", "2"]) == 0
    assert "Realism report" in capsys.readouterr().out
    report = (cohort / "realism" / "realism.md").read_text()
    per_subject = pd.read_csv(cohort / "realism" / "per_subject.csv")
    assert len(per_subject) == 2
    for tissue, r in PUBLISHED.items():
        median = per_subject[f"{tissue} {r.statistic}"].median()
        assert f"| {tissue} | {r.statistic} | {r.low:g} to {r.high:g} HU | {r.source} | {median:.0f} |" in report
    (width, height), colours = png_colours(cohort / "realism" / "histograms.png",
                                           {"published range": (0.85, 0.93, 0.85), "real CT": (0.84, 0.15, 0.16)},
                                           tol=0.2)
    assert (width, height) == (1360, 560) and colours["published range"] > 1000 and colours["real CT"] > 50
    assert png_colours(cohort / "realism" / "views.png", {})[0] == (960, 400)


def test_synth_report_refuses_a_cohort_without_its_parameters(tiny_cohort, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort.parent, cohort)
    (cohort / "parameters.csv").unlink()
    assert cli_main(["synth", "--out", str(cohort), "--report"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parameters.csv" in err[0] and str(cohort) in err[0]
