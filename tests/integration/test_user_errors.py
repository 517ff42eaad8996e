"""Bad input never becomes a traceback, a wrong result or a lost run: each kind of bad input gets one line per problem
(``stvnet <cmd>: error: <where>: <problem>; ...``), exit status 2, and leaves no output behind."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from stvnet.cli import main as cli_main
from tests.conftest import ROOT, tiny_train_args


def _absolute(tiny_cohort: Path) -> pd.DataFrame:
    table = pd.read_csv(tiny_cohort)
    for column in ("image", "label"):
        table[column] = [str(tiny_cohort.parent / p) for p in table[column]]
    return table


def _nifti(tmp: Path, name: str, data: np.ndarray, like: str) -> str:
    """A NIfTI of ``data`` on the grid of the scan ``like``."""
    image = nib.Nifti1Image(data, nib.load(like).affine)
    path = tmp / name
    nib.save(image, str(path))
    return str(path)


def _truncated(tmp: Path, source: str) -> str:
    path = tmp / "truncated.nii.gz"
    raw = gzip.decompress(Path(source).read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2])[:-8])  # cut in the middle of the voxels, no gzip trailer
    return str(path)


def _break(kind: str, table: pd.DataFrame, tmp: Path) -> tuple[pd.DataFrame, str]:
    """The manifest with one kind of bad input in its first subject, and the line the user must see."""
    sid, image, label = table.loc[0, "subject_id"], table.loc[0, "image"], table.loc[0, "label"]
    shape = nib.load(image).shape
    if kind == "missing image":
        table.loc[0, "image"] = str(tmp / "nowhere.nii.gz")
        return table, f"{sid}: image file not found: {tmp / 'nowhere.nii.gz'}"
    if kind == "empty image cell":
        table.loc[0, "image"] = ""
        return table, f"{sid}: no image path"
    if kind == "non-binary label":
        table.loc[0, "label"] = _nifti(tmp, "multi.nii.gz", np.full(shape, 2, np.uint8), image)
        return table, f"{sid}: label is not binary (values 2)"
    if kind == "empty label":
        table.loc[0, "label"] = _nifti(tmp, "empty.nii.gz", np.zeros(shape, np.uint8), image)
        return table, f"{sid}: label is empty (no femur voxels)"
    if kind == "2D image":
        table.loc[0, "image"] = _nifti(tmp, "flat.nii.gz", np.zeros(shape[:2], np.int16), image)
        return table, f"{sid}: image is not 3D (shape {shape[:2]})"
    if kind == "label on another grid":
        table.loc[0, "label"] = _nifti(tmp, "small.nii.gz", np.ones((8, 8, 8), np.uint8), image)
        return table, f"{sid}: image shape {shape} and label shape (8, 8, 8) differ"
    if kind == "unknown sex":
        table.loc[0, "sex"] = "X"
        return table, f"{sid}: unknown sex code 'X' (use M or F)"
    if kind == "duplicate id":
        table.loc[1, "subject_id"] = sid
        return table, f"{sid}: duplicate subject_id (2 rows)"
    if kind == "truncated scan":
        table.loc[0, "image"] = _truncated(tmp, image)  # its header reads: the cache build reads the voxels
        return table, f"{sid}: image {tmp / 'truncated.nii.gz'} cannot be read to its end (EOFError: "
    if kind == "missing label file":
        table.loc[0, "label"] = str(tmp / "gone.nii.gz")
        return table, f"{sid}: label file not found: {tmp / 'gone.nii.gz'}"
    if kind == "label not an image":
        (tmp / "text.nii.gz").write_text("not an image")
        table.loc[0, "label"] = str(tmp / "text.nii.gz")
        return table, f"{sid}: label is not a readable NIfTI or NRRD (ImageFileError: "
    if kind == "NaN voxels":  # the header is fine: the cache build reads the voxels once
        data = np.asanyarray(nib.load(image).dataobj).astype(np.float32)
        data[3, 3, 3] = np.nan
        table.loc[0, "image"] = _nifti(tmp, "nan.nii.gz", data, image)
        return table, f"{sid}: image contains NaN or inf values"
    if kind == "zero spacing":
        bad = nib.load(image)
        bad = nib.Nifti1Image(np.asanyarray(bad.dataobj), bad.affine)
        bad.header["pixdim"][2] = 0.0
        nib.save(bad, str(tmp / "flat_voxels.nii.gz"))
        table.loc[0, "image"] = str(tmp / "flat_voxels.nii.gz")
        return table, f"{sid}: image voxel spacing (3.0, 0.0, 4.0) is not positive (fix the image header)"
    if kind == "one value":  # a blank export: every voxel air
        table.loc[0, "image"] = _nifti(tmp, "blank.nii.gz", np.full(shape, -1000, np.int16), image)
        return table, f"{sid}: image holds one value (-1000) in every voxel: not a CT scan"
    if kind == "spacing in the wrong unit":  # 3 mm voxels written as 0.03: a field of view of a few mm
        for column, name in (("image", "small_image.nii.gz"), ("label", "small_label.nii.gz")):
            source = nib.load(table.loc[0, column])
            nib.save(nib.Nifti1Image(np.asanyarray(source.dataobj), np.diag([0.03, 0.03, 0.04, 1.0])), str(tmp / name))
            table.loc[0, column] = str(tmp / name)
        return table, f"{sid}: image field of view "
    if kind == "label shifted off the image":
        moved = nib.load(label)
        affine = moved.affine.copy()
        affine[0, 3] += 30.0
        nib.save(nib.Nifti1Image(np.asanyarray(moved.dataobj), affine), str(tmp / "moved.nii.gz"))
        table.loc[0, "label"] = str(tmp / "moved.nii.gz")
        return table, f"{sid}: image and label affines differ (they must share one voxel grid)"
    if kind == "folder without DICOM":
        (tmp / "series").mkdir()
        table.loc[0, "image"] = str(tmp / "series")
        return table, f"{sid}: image is not a readable NIfTI, NRRD or DICOM series (ValueError: {tmp / 'series'}: no DICOM series"
    raise AssertionError(kind)


def _run_files(out: Path) -> list[Path]:
    """Files under a runs folder other than the shared splits (written once a manifest validates)."""
    return [p for p in out.rglob("*") if p.is_file() and (out / "splits") not in p.parents]


KINDS = ("missing image", "empty image cell", "non-binary label", "empty label", "2D image", "label on another grid",
         "unknown sex", "duplicate id", "truncated scan", "folder without DICOM", "missing label file",
         "label not an image", "NaN voxels", "zero spacing", "label shifted off the image", "one value", "spacing in the wrong unit")


@pytest.mark.parametrize("kind", KINDS)
def test_train_refuses_a_bad_manifest_in_one_line_and_leaves_no_run(kind, tiny_cohort, tmp_path, capsys):
    table, expected = _break(kind, _absolute(tiny_cohort), tmp_path)
    manifest = tmp_path / "manifest.csv"
    table.to_csv(manifest, index=False)
    out = tmp_path / "runs"
    assert cli_main(["train", *tiny_train_args(manifest, out, epochs=1)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stvnet train: error: ")]
    assert lines and lines[0].startswith(f"stvnet train: error: {manifest}: {expected}"), err[-2000:]
    assert "Traceback" not in err
    assert not _run_files(out), "a refused run left files behind"


@pytest.mark.parametrize(("kind", "content", "expected"), [
    ("empty file", "", "the file is empty; a manifest is a CSV with a header row"),
    ("header only", "subject_id,image,label,sex\n", "the manifest lists no subjects"),
    ("missing column", "subject_id,image,sex\ns1,a.nii.gz,F\n", "missing column 'label'"),
])
def test_train_refuses_a_manifest_without_subjects_in_one_line(kind, content, expected, tmp_path, capsys):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(content)
    out = tmp_path / "runs"
    assert cli_main(["train", *tiny_train_args(manifest, out, epochs=1)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"stvnet train: error: {manifest}: {expected}"), err
    assert all(line.startswith("stvnet train: error: ") for line in err) and not _run_files(out)


def test_a_folder_that_holds_a_run_is_never_trained_into(tiny_cohort, tmp_path, capsys):
    run = tmp_path / "finished"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: the old one\n")
    (run / "checkpoints" / "best-epoch=9.ckpt").write_bytes(b"old weights")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = tiny_train_args(tiny_cohort, tmp_path / "runs", epochs=1) + ["--run.dir", str(run)]
    assert cli_main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"stvnet train: error: --run.dir {run}: holds a run already (config.yaml, checkpoints, metrics); resume it "
        f"with --ckpt_path {run}/checkpoints/last.ckpt, choose a new --run.dir, or pass --run.overwrite true to "
        "replace it")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # untouched


@pytest.mark.slow
def test_cut_labels_stop_training_with_one_line_per_subject_and_no_run(tiny_cohort, tmp_path, capsys):
    out = tmp_path / "runs"
    args = tiny_train_args(tiny_cohort, out, epochs=1) + ["--data.roi_size", "[12, 12, 12]"]
    assert cli_main(["train", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("stvnet train: error: ") for line in lines[-3:])
    assert "% of the femur label lies outside the ROI (" in lines[-2] and "would train on cut labels" in lines[-1]
    assert not _run_files(out)


def test_debug_shows_the_traceback_of_a_user_error(tiny_cohort, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STVNET_DEBUG", "1")
    table = _absolute(tiny_cohort)
    table.loc[0, "sex"] = "X"
    table.to_csv(tmp_path / "manifest.csv", index=False)
    assert cli_main(["train", *tiny_train_args(tmp_path / "manifest.csv", tmp_path / "runs", epochs=1)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "stvnet train: error: " in err


def _sweep_space(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"base_config": str(ROOT / "experiments" / "vnet.yaml"), **spec}))
    return path


@pytest.mark.parametrize(("spec", "expected"), [
    ({"search_space": {"model.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}},
     ["unknown section 'search_space'; did you mean 'space'?", "'space' names no parameters to tune"]),
    ({"space": {}}, ["'space' names no parameters to tune; add at least one under 'space:'"]),
    ({"space": {"model.net.init_args.base_chanels": {"type": "categorical", "choices": [4, 8]}}},
     ["space key 'model.net.init_args.base_chanels' is not an option of"]),
    ({"space": {"model.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}},
     ["parameter 'model.lr' has low 0.01 > high 0.0001"]),
    ({"space": {"model.lr": {"type": "float", "low": 0.0, "high": 1e-2, "log": True}}},
     ["parameter 'model.lr' is sampled on a log scale, so low must be > 0 (got 0.0)"]),
    ({"space": {"model.lr": {"type": "float", "low": 1e-4, "high": 1e-2}}, "overrides": {"trainer.max_epoch": 3}},
     ["overrides key 'trainer.max_epoch' is not an option of", "did you mean 'trainer.max_epochs'"]),
])
def test_a_search_space_that_would_tune_nothing_is_refused_before_any_trial(spec, expected, tmp_path, capsys):
    space = _sweep_space(tmp_path, **spec)
    out = tmp_path / "sweeps"
    assert cli_main(["sweep", "--space", str(space), "--trials", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"stvnet sweep: error: {space}: ")]
    assert len(lines) == len(err.strip().splitlines()), err  # nothing but its one-line problems
    for part in expected:
        assert any(part in line for line in lines), (part, err)
    assert not out.exists()  # no study, no trial folder


@pytest.mark.parametrize("space", sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml")))
def test_the_shipped_search_spaces_name_real_options(space):
    from stvnet.sweep import resolved_config, validate_space

    spec = yaml.safe_load((ROOT / "sweeps" / space).read_text())
    validate_space(spec, resolved_config(ROOT / spec["base_config"]), space)  # raises on any unknown key


@pytest.mark.parametrize("kind", ["truncated", "not a checkpoint", "no state_dict", "another model's"])
def test_predict_refuses_an_unusable_checkpoint_in_one_line(kind, tiny_cohort, tmp_path, capsys):
    import torch

    ckpt = tmp_path / "model.ckpt"
    if kind == "truncated":
        torch.save({"state_dict": {"w": torch.zeros(1000)}, "epoch": 3}, ckpt)
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif kind == "not a checkpoint":
        ckpt.write_text("epoch: 3\n")
    elif kind == "no state_dict":
        torch.save({"weights": torch.zeros(3)}, ckpt)
    else:  # a Lightning checkpoint of some other network
        torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}, "epoch": 3, "hyper_parameters": {}}, ckpt)
    scan = _absolute(tiny_cohort).loc[0, "image"]
    out = tmp_path / "masks"
    assert cli_main(["predict", scan, "-c", str(ckpt), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"stvnet predict: error: {ckpt}: not a")
    assert "give a .ckpt written by stvnet train" in err[0] and not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated", "2D", "zero spacing", "spacing in cm", "one value", "NaN voxels"])
def test_predict_never_writes_a_mask_from_a_scan_it_could_not_read_whole(kind, trained_runs, tiny_cohort, tmp_path,
                                                                         capsys):
    source = _absolute(tiny_cohort).loc[0, "image"]
    image = nib.load(source)
    data = np.asanyarray(image.dataobj).astype(np.float32)
    scan = tmp_path / f"{kind.replace(' ', '_')}.nii.gz"
    if kind == "truncated":
        scan = Path(_truncated(tmp_path, source))
        expected = "cannot be read to its end (EOFError"
    elif kind == "2D":
        nib.save(nib.Nifti1Image(data[:, :, 0], image.affine), str(scan))
        expected = f"is not a 3D scan (shape {data.shape[:2]})"
    elif kind == "zero spacing":
        bad = nib.Nifti1Image(data, image.affine)
        bad.header["pixdim"][1] = 0.0
        nib.save(bad, str(scan))
        expected = "voxel spacing (0.0, 3.0, 4.0) is not positive"
    elif kind == "spacing in cm":  # the header says 0.3 mm where the scan has 3 mm: the field of view is ~3 cm
        nib.save(nib.Nifti1Image(data, np.diag([0.3, 0.3, 0.4, 1.0])), str(scan))
        expected = "is too small to hold a femoral head"
    elif kind == "one value":
        nib.save(nib.Nifti1Image(np.full_like(data, -1000.0), image.affine), str(scan))
        expected = "holds one value (-1000) in every voxel: not a CT scan"
    else:
        data[2, 2, 2] = np.nan
        nib.save(nib.Nifti1Image(data, image.affine), str(scan))
        expected = "contains NaN or inf values"
    out = tmp_path / "masks"
    assert cli_main(["predict", str(scan), "-c", str(trained_runs["vnet"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"stvnet predict: error: {scan.name.split('.')[0]}: ") and expected in err[-1], err
    assert not list(out.glob("*.nii.gz"))  # no mask


def test_a_library_exception_is_named_on_one_line_without_terminal_colours():
    """What a one-line error quotes of torch's, nibabel's or SimpleITK's exception: its type and its first line."""
    from data_modules.errors import exception_line

    exc = RuntimeError("\x1b[1mWeights only load failed\x1b[0m. Either\n\t(1) re-run with weights_only=False")
    assert exception_line(exc) == "RuntimeError: Weights only load failed. Either"
    assert exception_line(ValueError("x" * 500)) == "ValueError: " + "x" * 200
    assert exception_line(KeyError()) == "KeyError: "
