"""The realism report (`stvnet synth --report`): each tissue measured on exactly its voxels, against published ranges."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from data_modules.realism import PROFILE_MM, PUBLISHED, in_range, measure_cohort
from data_modules.synthetic import read_parameters
from stvnet.cli import main as cli_main
from tests.conftest import png_colours


@pytest.fixture(scope="module")
def measured(tiny_cohort):
    return measure_cohort(tiny_cohort, subjects=3)


def test_each_tissue_is_measured_on_its_own_voxels(tiny_cohort, measured):
    """The generator renders trabecular bone at the subject's trabecular_hu, muscle at 45 and fat at -100 HU (plus
    texture and noise): the medians measured on the re-rendered masks find those values, so no mask mixes tissues."""
    table, pooled, _ = measured
    params = {p.subject_id: p for p in read_parameters(tiny_cohort.parent / "parameters.csv")}
    for row in table.rename(columns={"trabecular median": "trabecular"}).itertuples():
        assert row.trabecular == pytest.approx(params[row.subject_id].trabecular_hu, abs=40.0)
    assert table["muscle median"].between(35.0, 55.0).all()
    assert table["fat median"].between(-115.0, -85.0).all()
    assert (table["cortical p99"] > table["trabecular p99"] + 300.0).all()
    assert set(pooled) == {"femur", "cortical", "trabecular", "pelvis", "muscle", "fat"}


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
                          "muscle median": [45.0] * 4, "fat median": [-100.0, -100.0, -20.0, -100.0]})
    checks = in_range(table).set_index("tissue")
    assert checks.loc["trabecular", "inside"] == 0.5 and checks.loc["fat", "inside"] == 0.75
    assert checks.loc["trabecular", "lowest"] == 40.0 and checks.loc["trabecular", "highest"] == 360.0
    assert checks.loc["cortical", "published"] == "300 to 1500 HU"


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
    assert (width, height) == (1040, 560) and colours["published range"] > 1000 and colours["real CT"] > 50
    assert png_colours(cohort / "realism" / "views.png", {})[0] == (960, 400)


def test_synth_report_refuses_a_cohort_without_its_parameters(tiny_cohort, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort.parent, cohort)
    (cohort / "parameters.csv").unlink()
    assert cli_main(["synth", "--out", str(cohort), "--report"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parameters.csv" in err[0] and str(cohort) in err[0]
