"""Bad manifests fail up front with one line per problem that names the subject."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from data_modules.manifest import ManifestError, filter_cohort, validate_manifest


@pytest.fixture()
def cohort_copy(tmp_path: Path, tiny_cohort: Path) -> Path:
    """A writable copy of the tiny cohort (first four subjects)."""
    table = pd.read_csv(tiny_cohort).head(4)
    for col in ("image", "label"):
        for rel in table[col]:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(tiny_cohort.parent / rel, tmp_path / rel)
    manifest = tmp_path / "manifest.csv"
    table.to_csv(manifest, index=False)
    return manifest


def _problems(manifest: Path) -> list[str]:
    with pytest.raises(ManifestError) as info:
        validate_manifest(manifest)
    return info.value.problems


def _rewrite(manifest: Path, column: str, row: int, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    table = pd.read_csv(manifest)
    path = manifest.parent / table.loc[row, column]
    original = nib.load(path)
    nib.save(nib.Nifti1Image(array, original.affine if affine is None else affine), path)
    return table.loc[row, "subject_id"]


def test_valid_manifest_passes(cohort_copy):
    table = validate_manifest(cohort_copy)
    assert len(table) == 4 and Path(table.loc[0, "image"]).is_absolute()


@pytest.mark.mutation_target("validate_manifest")
def test_missing_file(cohort_copy):
    table = pd.read_csv(cohort_copy)
    (cohort_copy.parent / table.loc[1, "image"]).unlink()
    with pytest.raises(ManifestError) as info:
        validate_manifest(cohort_copy)
    problems = info.value.problems
    assert len(problems) == 1 and problems[0].startswith(table.loc[1, "subject_id"]) and "not found" in problems[0]
    assert info.value.lines == [f"{cohort_copy}: {problems[0]}"]  # the command line names the manifest


def test_shape_mismatch(cohort_copy):
    sid = _rewrite(cohort_copy, "label", 0, np.zeros((5, 5, 5), np.uint8))
    (problem,) = _problems(cohort_copy)
    assert problem.startswith(sid) and "shape" in problem


def test_affine_mismatch(cohort_copy):
    table = pd.read_csv(cohort_copy)
    lbl = nib.load(cohort_copy.parent / table.loc[2, "label"])
    affine = lbl.affine.copy()
    affine[0, 3] += 10.0
    sid = _rewrite(cohort_copy, "label", 2, np.asarray(lbl.dataobj), affine)
    (problem,) = _problems(cohort_copy)
    assert problem.startswith(sid) and "affine" in problem


def test_non_binary_and_empty_labels(cohort_copy):
    table = pd.read_csv(cohort_copy)
    lbl = np.asarray(nib.load(cohort_copy.parent / table.loc[0, "label"]).dataobj).copy()
    lbl[lbl > 0] = 2
    sid0 = _rewrite(cohort_copy, "label", 0, lbl)
    empty = np.zeros(nib.load(cohort_copy.parent / table.loc[1, "label"]).shape, np.uint8)  # scans differ in framing
    sid1 = _rewrite(cohort_copy, "label", 1, empty)
    problems = _problems(cohort_copy)
    assert len(problems) == 2
    assert problems[0].startswith(sid0) and "not binary" in problems[0]
    assert problems[1].startswith(sid1) and "empty" in problems[1]


def test_nan_image_and_not_3d(cohort_copy):
    table = pd.read_csv(cohort_copy)
    img = np.asarray(nib.load(cohort_copy.parent / table.loc[0, "image"]).dataobj).astype(np.float32)
    img[3, 3, 3] = np.nan
    sid0 = _rewrite(cohort_copy, "image", 0, img)
    sid1 = _rewrite(cohort_copy, "image", 1, np.zeros((4, 4), np.int16))
    problems = _problems(cohort_copy)
    assert problems[0].startswith(sid0) and "NaN" in problems[0]
    assert problems[1].startswith(sid1) and "not 3D" in problems[1]


def test_unknown_sex_and_duplicate_ids(cohort_copy):
    table = pd.read_csv(cohort_copy)
    table.loc[0, "sex"] = "X"
    table.loc[3, "subject_id"] = table.loc[2, "subject_id"]
    table.to_csv(cohort_copy, index=False)
    problems = _problems(cohort_copy)
    assert any(p.startswith(table.loc[2, "subject_id"]) and "duplicate" in p for p in problems)
    assert any(p.startswith(table.loc[0, "subject_id"]) and "unknown sex code 'X'" in p for p in problems)


def test_missing_column_is_named(cohort_copy):
    pd.read_csv(cohort_copy).drop(columns=["sex"]).to_csv(cohort_copy, index=False)
    problems = _problems(cohort_copy)
    assert "missing column 'sex'" in problems[0]
    with pytest.raises(ManifestError) as info:
        validate_manifest(cohort_copy)
    assert str(info.value).startswith(f"{cohort_copy}: ")  # the error names the file


def test_cohort_filter(cohort_copy):
    table = validate_manifest(cohort_copy)
    male, female = filter_cohort(table, "male"), filter_cohort(table, "female")
    assert set(male["sex"]) <= {"M"} and set(female["sex"]) <= {"F"}
    assert len(male) + len(female) == len(table)
    with pytest.raises(ValueError, match="cohort must be one of"):
        filter_cohort(table, "children")


def test_zero_voxel_spacing_is_refused_not_read_as_1_mm(cohort_copy):
    table = pd.read_csv(cohort_copy)
    path = cohort_copy.parent / table.loc[1, "image"]
    image = nib.load(path)
    image.header.set_zooms((0.0, 1.0, 2.5))
    nib.save(image, path)
    (line,) = _problems(cohort_copy)
    assert line == f"{table.loc[1, 'subject_id']}: image voxel spacing (0.0, 1.0, 2.5) is not positive (fix the image header)"


def test_header_only_validation_leaves_the_voxels_to_the_cache_build(cohort_copy):
    table = pd.read_csv(cohort_copy)
    label = cohort_copy.parent / table.loc[0, "label"]
    original = nib.load(label)
    nib.save(nib.Nifti1Image(np.zeros(original.shape, np.uint8), original.affine), label)  # empty, same header
    assert len(validate_manifest(cohort_copy, voxels=False)) == 4  # the headers are fine
    assert _problems(cohort_copy) == [f"{table.loc[0, 'subject_id']}: label is empty (no femur voxels)"]


def test_the_error_lists_one_line_per_problem():
    error = ManifestError("cohort.csv", ["sub-1: label is empty (no femur voxels)", "sub-2: no image path"])
    assert str(error) == ("cohort.csv: 2 problem(s):\n  - sub-1: label is empty (no femur voxels)\n"
                          "  - sub-2: no image path")
    assert error.problems == ["sub-1: label is empty (no femur voxels)", "sub-2: no image path"]


def test_scan_problems_accept_sub_millimetre_and_singleton_4d_scans_and_name_the_rest(tmp_path):
    """What predict checks before inference: a 0.7 mm scan and an X x Y x Z x 1 scan are fine; X x Y x Z x 2, 5-D,
    a cut file and an unreadable file each give one line naming the scan and the cause."""
    from data_modules.manifest import checked_scan, scan_problems

    def scan(name: str, shape: tuple[int, ...]) -> Path:
        path = tmp_path / f"{name}.nii.gz"
        voxels = np.random.default_rng(0).integers(-1000, 1500, shape).astype(np.int16)
        nib.save(nib.Nifti1Image(voxels, np.diag([0.7, 0.7, 1.25, 1.0])), str(path))
        return path

    assert scan_problems("a", scan("a", (48, 48, 32))) == []  # 34 x 34 x 40 mm at sub-millimetre voxels
    problems, header, voxels = checked_scan("b", scan("b", (48, 48, 32, 1)))
    assert problems == [] and np.allclose(header.spacing, (0.7, 0.7, 1.25)) and voxels.shape == (48, 48, 32)
    for name, shape in (("c", (8, 8, 8, 2)), ("d", (8, 8, 8, 1, 1))):
        (line,) = scan_problems(name, scan(name, shape))
        assert line.startswith(f"{name}: ") and f"is not a 3D scan (shape {shape})" in line
    whole = tmp_path / "whole.nii"  # uncompressed: the header reads, the voxels end early
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 32), np.int16), np.eye(4)), str(whole))
    cut = tmp_path / "f.nii"
    cut.write_bytes(whole.read_bytes()[:1000])
    (line,) = scan_problems("f", cut)
    assert line.startswith(f"f: {cut} cannot be read to its end (") and line.endswith(
        "the file is damaged or incomplete: copy or export it again")
    (tmp_path / "g.nii.gz").write_text("not an image")
    (line,) = scan_problems("g", tmp_path / "g.nii.gz")
    assert line.startswith("g: cannot read ") and "as NIfTI, NRRD or a DICOM series (" in line
    assert "(NoneType" not in line  # the reader's own exception is named


@pytest.mark.mutation_target("read_manifest")
def test_problems_with_the_manifest_file_itself_name_it(tmp_path):
    cases = {
        "absent.csv": (None, "manifest file not found"),
        "empty.csv": (b"", "the file is empty"),
        "binary.csv": (b"\xff\xfe\x00\x81\x00", "not a readable CSV"),
        "header_only.csv": (b"subject_id,image,label,sex\n", "the manifest lists no subjects"),
    }
    for name, (content, problem) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ManifestError) as info:
            validate_manifest(path)
        (line,) = info.value.problems
        assert problem in line, name
        assert str(info.value).startswith(f"{path}: "), name


@pytest.mark.mutation_target("read_manifest")
def test_ids_stay_text_sex_codes_are_normalised_and_paths_resolved(cohort_copy):
    table = pd.read_csv(cohort_copy)
    table["subject_id"] = ["001", "010", "0100", " 7 "]
    table["sex"] = ["male", "2", " f ", "M"]
    table.loc[3, "image"] = str((cohort_copy.parent / table.loc[3, "image"]).resolve())  # absolute stays absolute
    table.to_csv(cohort_copy, index=False)
    read = validate_manifest(cohort_copy)
    assert list(read["subject_id"]) == ["001", "010", "0100", "7"]
    assert list(read["sex"]) == ["M", "F", "F", "M"]
    for column in ("image", "label"):
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in read[column])
    assert read.loc[0, "image"] == str((cohort_copy.parent / table.loc[0, "image"]).resolve())


def test_rows_without_an_image_or_label_are_named(cohort_copy):
    table = pd.read_csv(cohort_copy)
    image = table.loc[1, "image"]
    table.loc[1, "image"] = None
    table.loc[2, "label"] = None
    table.to_csv(cohort_copy, index=False)
    ids = table["subject_id"]
    assert _problems(cohort_copy) == [f"{ids[1]}: no image path", f"{ids[2]}: no label path"]
    table.loc[1, "image"] = image
    table.to_csv(cohort_copy, index=False)
    assert len(validate_manifest(cohort_copy, require_labels=False)) == 4  # prediction needs no labels
    table.loc[2, "label"] = "   "  # a blank cell is no path either
    table.to_csv(cohort_copy, index=False)
    assert _problems(cohort_copy) == [f"{ids[2]}: no label path"]
    with pytest.raises(ManifestError) as info:
        validate_manifest(cohort_copy)
    assert str(info.value).startswith(f"{cohort_copy}: ")


def test_numeric_sex_codes_with_a_blank_name_only_the_blank_row(cohort_copy):
    """Sex read as text: codes 1/2 stay '1'/'2' (not 1.0/2.0 because one cell is empty), so only that row is named."""
    table = pd.read_csv(cohort_copy)
    table["sex"] = ["1", "2", None, "2"]  # written as 1,2,,2
    table.to_csv(cohort_copy, index=False)
    (problem,) = _problems(cohort_copy)
    assert problem.startswith(f"{table.loc[2, 'subject_id']}: ") and "sex" in problem


def test_unreadable_scans_are_named_with_what_was_expected(cohort_copy):
    table = pd.read_csv(cohort_copy)
    (cohort_copy.parent / table.loc[0, "image"]).write_bytes(b"not a scan")
    (cohort_copy.parent / table.loc[1, "label"]).write_bytes(b"not a label")
    problems = _problems(cohort_copy)
    assert len(problems) == 2
    assert problems[0].startswith(f"{table.loc[0, 'subject_id']}: image is not a readable NIfTI, NRRD or DICOM series")
    assert problems[1].startswith(f"{table.loc[1, 'subject_id']}: label is not a readable NIfTI or NRRD")


def test_scans_without_labels_still_get_their_voxels_checked(cohort_copy):
    """A prediction manifest (no labels): a scan with NaN voxels is named; the others pass."""
    table = pd.read_csv(cohort_copy)
    img = np.asarray(nib.load(cohort_copy.parent / table.loc[2, "image"]).dataobj).astype(np.float32)
    img[1, 1, 1] = np.inf
    sid = _rewrite(cohort_copy, "image", 2, img)
    table = pd.read_csv(cohort_copy)
    table["label"] = None
    table.to_csv(cohort_copy, index=False)
    with pytest.raises(ManifestError) as info:
        validate_manifest(cohort_copy, require_labels=False)
    assert info.value.problems == [f"{sid}: image contains NaN or inf values"]
    assert len(validate_manifest(cohort_copy, require_labels=False, voxels=False)) == 4


def test_singleton_4d_and_sub_millimetre_scans_pass_and_other_shapes_are_named(cohort_copy):
    table = pd.read_csv(cohort_copy)
    image = nib.load(cohort_copy.parent / table.loc[0, "image"])
    label = nib.load(cohort_copy.parent / table.loc[0, "label"])
    fine = np.diag([0.7, 0.7, 0.5, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., None], fine), cohort_copy.parent / table.loc[0, "image"])
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), fine), cohort_copy.parent / table.loc[0, "label"])
    assert len(validate_manifest(cohort_copy)) == 4  # (x, y, z, 1) at 0.7 x 0.7 x 0.5 mm is a 3D scan
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), fine), cohort_copy.parent / table.loc[0, "image"])
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[..., None], fine), cohort_copy.parent / table.loc[0, "label"])
    assert len(validate_manifest(cohort_copy)) == 4  # and so is a singleton 4-D label beside a 3-D image
    two = np.stack([np.asarray(image.dataobj)] * 2, axis=-1)
    nib.save(nib.Nifti1Image(two, fine), cohort_copy.parent / table.loc[0, "image"])
    (problem,) = _problems(cohort_copy)
    assert problem == f"{table.loc[0, 'subject_id']}: image is not 3D (shape {two.shape})"


def test_shape_and_affine_mismatches_are_described_exactly_and_rounding_is_tolerated(cohort_copy):
    table = pd.read_csv(cohort_copy)
    image = nib.load(cohort_copy.parent / table.loc[0, "image"])
    sid = _rewrite(cohort_copy, "label", 0, np.zeros((5, 6, 7), np.uint8))
    (problem,) = _problems(cohort_copy)
    assert problem == f"{sid}: image shape {image.shape[:3]} and label shape (5, 6, 7) differ"
    label = nib.load(cohort_copy.parent / table.loc[1, "label"])
    nearly = label.affine.copy()
    nearly[0, 1] += 5e-4  # a header written with fewer digits: the same grid
    _rewrite(cohort_copy, "label", 1, np.asarray(label.dataobj), nearly)
    _rewrite(cohort_copy, "label", 0, np.zeros(image.shape, np.uint8))  # row 0: right shape now, but empty
    assert _problems(cohort_copy) == [f"{sid}: label is empty (no femur voxels)"]  # row 1's rounding passes
    shifted = label.affine.copy()
    shifted[1, 3] += 0.5  # half a millimetre off: another grid
    sid1 = _rewrite(cohort_copy, "label", 1, np.asarray(label.dataobj), shifted)
    assert f"{sid1}: image and label affines differ (they must share one voxel grid)" in _problems(cohort_copy)


def test_a_non_binary_label_shows_at_most_six_values(cohort_copy):
    table = pd.read_csv(cohort_copy)
    label = np.asarray(nib.load(cohort_copy.parent / table.loc[0, "label"]).dataobj).astype(np.int16)
    label.flat[:5] = np.arange(2, 7)  # seven values: one more than is shown
    sid = _rewrite(cohort_copy, "label", 0, label)
    (problem,) = _problems(cohort_copy)
    assert problem == f"{sid}: label is not binary (values 0, 1, 2, 3, 4, 5...)"
    label.flat[:7] = [2, 3, 4, 5, 0, 0, 0]
    _rewrite(cohort_copy, "label", 0, label)
    (problem,) = _problems(cohort_copy)
    assert problem == f"{sid}: label is not binary (values 0, 1, 2, 3, 4, 5)"
