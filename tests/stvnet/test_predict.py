"""`stvnet predict`: masks come back in each input's own grid, whatever its orientation and spacing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio

from stvnet.cli import main as cli_main
from stvnet.inference import Predictor, find_checkpoint, largest_component
from stvnet.metrics import evaluate_case


def _dice(pred_path, label_path) -> float:
    label = nib.load(label_path)
    pred = np.asarray(nib.load(pred_path).dataobj)
    return evaluate_case(pred, np.asarray(label.dataobj), label.header.get_zooms()[:3])["dice"]


@pytest.mark.slow
def test_predict_on_reoriented_resampled_scan_matches_its_own_ground_truth(trained_runs, tiny_cohort, tmp_path):
    run = trained_runs["vnet"]
    sid = json.loads((run / "splits.json").read_text())["test"][0]
    row = pd.read_csv(tiny_cohort).set_index("subject_id").loc[sid]
    image, label = tiny_cohort.parent / row["image"], tiny_cohort.parent / row["label"]
    subject = tio.Subject(image=tio.ScalarImage(image), label=tio.LabelMap(label))
    moved = tio.Compose([tio.ToOrientation("PIR"), tio.Resample((2.5, 3.5, 3.2))])(subject)
    scans = tmp_path / "scans"
    scans.mkdir()
    moved["image"].save(scans / "moved.nii.gz")
    moved["label"].save(tmp_path / "moved_label.nii.gz")
    tio.ToOrientation("LPI")(subject)["image"].save(scans / "flipped.nii.gz")  # the same voxels, axes reversed
    (scans / "original.nii.gz").symlink_to(image)

    out = tmp_path / "masks"
    assert cli_main(["predict", str(scans), "--checkpoint", str(run), "--out", str(out)]) == 0
    original, shifted = out / "original.nii.gz", out / "moved.nii.gz"
    # each mask lies on its own input's grid and orientation
    moved_img = nib.load(scans / "moved.nii.gz")
    assert nib.load(shifted).shape == moved_img.shape
    assert np.allclose(nib.load(shifted).affine, moved_img.affine, atol=1e-4)
    assert nib.aff2axcodes(nib.load(shifted).affine) == ("P", "I", "R")
    dice_original = _dice(original, label)
    dice_moved = _dice(shifted, tmp_path / "moved_label.nii.gz")
    # the mask in the scan's grid scores what the network scores on its own (ROI) grid, up to resampling
    predictor = Predictor.from_checkpoint(find_checkpoint(run), device="cpu")
    roi = predictor.transform(tio.Subject(image=tio.ScalarImage(image), label=tio.LabelMap(label)))
    with torch.inference_mode():
        roi_mask = predictor.model.predict_proba(roi["image"].data[None].float())[0, 0].numpy() > predictor.model.threshold
    dice_roi = evaluate_case(roi_mask, roi["label"].data[0].numpy() > 0.5, roi["image"].spacing)["dice"]
    assert dice_roi > 0.5 and abs(dice_original - dice_roi) < 0.03, (dice_original, dice_roi)
    # a scan stored with its axes reversed holds the same voxels: its mask, brought back to RAS, is the same mask
    back, first = (nib.as_closest_canonical(nib.load(path)) for path in (out / "flipped.nii.gz", original))
    assert np.allclose(back.affine, first.affine, atol=1e-4) and np.asarray(first.dataobj).sum() > 0
    assert evaluate_case(np.asarray(back.dataobj), np.asarray(first.dataobj), (1, 1, 1))["dice"] > 0.999
    # reorienting and resampling the scan leaves the segmentation quality unchanged
    assert abs(dice_moved - dice_original) < 0.05
    # never overwrite: a second call refuses (a user error: status 2), inputs are untouched
    assert cli_main(["predict", str(scans), "--checkpoint", str(run), "--out", str(out)]) == 2
    assert cli_main(["predict", str(scans / "moved.nii.gz"), "--checkpoint", str(run), "--out", str(scans),
                     "--overwrite"]) == 2
    assert np.array_equal(np.asarray(nib.load(scans / "moved.nii.gz").dataobj), np.asarray(moved_img.dataobj))


@pytest.mark.slow
def test_ensemble_of_two_checkpoints_and_bad_inputs(trained_runs, tiny_cohort, tmp_path, capsys):
    row = pd.read_csv(tiny_cohort).iloc[0]
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file")
    manifest = tmp_path / "new.csv"
    pd.DataFrame({"subject_id": ["a", "broken"], "image": [str(tiny_cohort.parent / row["image"]), str(bad)]}).to_csv(manifest, index=False)
    out = tmp_path / "masks"
    code = cli_main(["predict", str(manifest), "-c", str(trained_runs["vnet"]), "-c", str(trained_runs["vnet_b"]),
                     "--out", str(out), "--largest-component"])
    assert code == 2  # one input failed (a user error) ...
    err = capsys.readouterr().err
    assert f"stvnet predict: error: broken: cannot read {bad} as NIfTI, NRRD or a DICOM series" in err
    mask = np.asarray(nib.load(out / "a.nii.gz").dataobj)  # ... the other was written
    assert mask.shape == nib.load(tiny_cohort.parent / row["image"]).shape
    assert find_checkpoint(trained_runs["vnet"]).suffix == ".ckpt"


def test_largest_component_keeps_the_biggest_island():
    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:10, 2:10, 2:10] = 1
    mask[15:17, 15:17, 15:17] = 1
    kept = largest_component(mask)
    assert kept.sum() == 8**3 and kept[16, 16, 16] == 0


@pytest.mark.slow
def test_predict_reads_each_scan_once_and_searches_it_once_per_template(trained_runs, tiny_cohort, tmp_path,
                                                                       monkeypatch):
    """An ensemble of checkpoints sharing a femur template (two of one run), QC included and the right side
    mirrored in memory: one read of the scan's voxels (the check before inference), none by TorchIO, one femur
    search."""
    import data_modules.manifest
    import torchio.data.image
    from data_modules.localisation import FemurLocator

    calls = {"read": 0, "torchio read": 0, "search": 0}

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(data_modules.manifest, "read_voxels", counted("read", data_modules.manifest.read_voxels))
    monkeypatch.setattr(torchio.data.image, "read_image", counted("torchio read", torchio.data.image.read_image))
    monkeypatch.setattr(FemurLocator, "locate_coarse", counted("search", FemurLocator.locate_coarse))
    scan = tiny_cohort.parent / pd.read_csv(tiny_cohort)["image"].iloc[0]
    run = str(trained_runs["vnet"])
    for side in ("left", "right"):
        calls.update({key: 0 for key in calls})
        out = tmp_path / side
        assert cli_main(["predict", str(scan), "-c", run, "-c", run, "--out", str(out), "--side", side]) == 0
        assert calls == {"read": 1, "torchio read": 0, "search": 1}, (side, calls)
        record = json.loads((out / f"{scan.name.split('.')[0]}.qc.json").read_text())
        assert record["side"] == side and len(record["roi_center_mm"]) == 3
