"""DICOM in: a series folder (what scanners and PACS export) is read with its geometry and HU rescale, validated in a
manifest, preprocessed like the NIfTI it came from, and segmented by predict into a NIfTI mask in the series' grid."""

from __future__ import annotations

import json
import locale

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torchio as tio

from data_modules.cache import CacheSettings, PreprocessedCache
from data_modules.manifest import ManifestError, validate_manifest
from data_modules.scan_io import read_header, read_voxels, write_dicom_series
from stvnet.cli import main as cli_main

SETTINGS = CacheSettings((4.0, 4.0, 4.0), (-200.0, 1800.0))


def _first(tiny_cohort) -> pd.Series:
    row = pd.read_csv(tiny_cohort).iloc[0].copy()
    row["image"], row["label"] = str(tiny_cohort.parent / row["image"]), str(tiny_cohort.parent / row["label"])
    return row


@pytest.mark.parametrize(("slope", "intercept", "tolerance"), [(1, -1024, 0), (2, -1000, 1)])
def test_a_series_reads_back_as_the_scan_it_was_written_from(tiny_cohort, tmp_path, slope, intercept, tolerance):
    nifti = _first(tiny_cohort)["image"]
    series = write_dicom_series(nifti, tmp_path / "series", slope, intercept)
    first = sitk.ImageFileReader()
    first.SetFileName(str(sorted(series.iterdir())[0]))
    first.ReadImageInformation()
    assert (first.GetMetaData("0028|1053").strip(), first.GetMetaData("0028|1052").strip()) == (str(slope), str(intercept))
    header, reference = read_header(series), read_header(nifti)
    assert header.shape == reference.shape and np.allclose(header.spacing, reference.spacing)
    assert np.allclose(header.affine, reference.affine, atol=1e-4)
    dicom, original = tio.ScalarImage(series), tio.ScalarImage(nifti)
    assert np.allclose(dicom.affine, original.affine, atol=1e-4)
    difference = np.abs(dicom.data.double() - np.round(original.data.double()))
    assert difference.max() <= tolerance  # HU back through the stored values and the rescale (slope 2: 1 HU steps)
    assert np.array_equal(read_voxels(series), dicom.data[0].numpy())  # the voxel checks see what training sees


def test_a_manifest_of_series_validates_and_preprocesses_like_its_nifti(tiny_cohort, tmp_path):
    row = _first(tiny_cohort)
    series = write_dicom_series(row["image"], tmp_path / "series")
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame([{"subject_id": "dcm", "image": str(series), "label": row["label"], "sex": row["sex"]}]).to_csv(manifest, index=False)
    assert list(validate_manifest(manifest)["subject_id"]) == ["dcm"]
    cache = PreprocessedCache(tmp_path / "cache", SETTINGS)
    assert cache.build([("dcm", str(series), row["label"]), ("nii", row["image"], row["label"])], workers=1) == 2
    for name in ("image.npy", "label.npy", "coarse.npy"):
        assert np.array_equal(np.load(cache.folder(str(series), row["label"]) / name),
                              np.load(cache.folder(row["image"], row["label"]) / name)), name
    (series / "slice0003.dcm").touch()  # a changed series is a new entry
    assert cache.build([("dcm", str(series), row["label"])], workers=1) == 1


def test_a_folder_that_holds_no_series_is_named_in_one_line(tiny_cohort, tmp_path):
    row = _first(tiny_cohort)
    (tmp_path / "empty").mkdir()
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame([{"subject_id": "s1", "image": str(tmp_path / "empty"), "label": row["label"], "sex": "F"}]).to_csv(manifest, index=False)
    with pytest.raises(ManifestError, match=r"s1: image is not a readable NIfTI, NRRD or DICOM series \(ValueError: "
                                            r".*empty: no DICOM series in this folder"):
        validate_manifest(manifest)


@pytest.mark.slow
def test_predict_segments_a_series_as_it_segments_the_nifti(trained_runs, tiny_cohort, tmp_path):
    run = trained_runs["vnet"]
    sid = json.loads((run / "splits.json").read_text())["test"][0]
    row = pd.read_csv(tiny_cohort).set_index("subject_id").loc[sid]
    nifti = tiny_cohort.parent / row["image"]
    series = write_dicom_series(nifti, tmp_path / "in" / f"series-{sid}")
    assert cli_main(["predict", str(nifti), str(series), "-c", str(run), "--out", str(tmp_path / "out")]) == 0
    from_nifti = nib.load(tmp_path / "out" / f"{nifti.name[:-7]}.nii.gz")
    from_series = nib.load(tmp_path / "out" / f"series-{sid}.nii.gz")
    assert np.allclose(from_series.affine, from_nifti.affine, atol=1e-4)  # the mask lies in the series' own grid
    assert np.asarray(from_nifti.dataobj).sum() > 100
    assert np.array_equal(np.asarray(from_series.dataobj), np.asarray(from_nifti.dataobj))


def test_writing_a_series_leaves_the_process_locale_alone(tiny_cohort, tmp_path):
    before = locale.setlocale(locale.LC_ALL)
    write_dicom_series(_first(tiny_cohort)["image"], tmp_path / "series")
    assert locale.setlocale(locale.LC_ALL) == before  # GDCM sets "C": reports with "±" would then fail to write
