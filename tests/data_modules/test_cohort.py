"""A cohort and its folds (data_modules/cohort.py): which rows each fold's split holds, the run's own splits record,
raw subjects of manifest rows, and a resumed run refused on other subjects."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torchio as tio

from data_modules.cohort import CohortSplits, raw_subject
from data_modules.datamodule import FemurDataModule
from tests.conftest import tiny_data_args


def test_each_folds_rows_are_its_splits_subjects_and_the_run_record_names_fold_cohort_and_manifest(tiny_cohort,
                                                                                                   tmp_path):
    folds = CohortSplits(tiny_cohort, "female", n_folds=2, splits_dir=tmp_path / "splits")
    women = set(pd.read_csv(tiny_cohort).query("sex == 'F'")["subject_id"])
    assert set(folds.table["subject_id"]) == women
    for fold in (0, 1):
        parts = {s: set(folds.rows(fold, s)["subject_id"]) for s in ("train", "val", "test")}
        assert parts == {s: set(folds.subject_ids(fold, s)) for s in parts}
        assert set().union(*parts.values()) == women and sum(map(len, parts.values())) == len(women)
    record = json.loads(folds.save(tmp_path / "run", fold=1).read_text())
    assert (record["fold"], record["cohort"], record["manifest"]) == (1, "female", str(tiny_cohort.resolve()))
    assert record["folds"] == folds.splits["folds"] and record["test"] == folds.splits["test"]


def test_a_raw_subject_holds_the_rows_scan_label_id_and_sex(tmp_path):
    for name in ("scan.nii.gz", "mask.nii.gz"):
        (tmp_path / name).touch()  # TorchIO checks that the files exist; nothing is read
    row = pd.Series({"subject_id": "s1", "image": tmp_path / "scan.nii.gz", "label": tmp_path / "mask.nii.gz",
                     "sex": "F"})
    subject = raw_subject(row)
    assert (subject["subject_id"], subject["sex"]) == ("s1", "F")
    assert isinstance(subject["image"], tio.ScalarImage) and subject["image"].path.name == "scan.nii.gz"
    assert isinstance(subject["label"], tio.LabelMap) and subject["label"].path.name == "mask.nii.gz"
    assert "label" not in raw_subject(row.copy().replace({tmp_path / "mask.nii.gz": None}))  # to predict: no label


def test_a_run_resumed_on_other_subjects_is_refused(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", fold=0))
    other = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", fold=1))
    dm.load_state_dict(dm.state_dict())  # its own record: accepted
    with pytest.raises(ValueError, match=r"the checkpoint was trained on other subjects than this configuration "
                                         r"selects \(another fold, cohort, manifest or split protocol\): resume with "
                                         r"the run's own config\.yaml"):
        dm.load_state_dict(other.state_dict())


def test_the_run_record_is_written_into_new_folders_indented_with_the_datamodules_fold(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", fold=2))
    path = dm.save_splits(tmp_path / "runs" / "vnet" / "fold2")  # none of these folders exists yet
    assert path == tmp_path / "runs" / "vnet" / "fold2" / "splits.json"
    assert json.loads(path.read_text())["fold"] == 2
    assert path.read_text().startswith('{\n  "')  # two-space indents: a record people read and diff


def test_cached_subjects_carry_their_id_and_sex_for_the_per_sex_metrics(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits"))
    dm.prepare_data()
    dm.setup("fit")
    sexes = pd.read_csv(tiny_cohort, dtype={"subject_id": str}).set_index("subject_id")["sex"]
    subjects = dm.subjects("val")
    assert dm.store is not None and subjects
    assert all(s["sex"] == sexes[s["subject_id"]] for s in subjects)
