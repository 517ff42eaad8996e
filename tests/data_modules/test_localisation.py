"""Femur localisation: the ROI lands on the femur whatever the framing, training refuses cut labels, a checkpoint alone
places the ROI in new scans, predict's QC flags what it cannot vouch for, and the right femur is a mirror away."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio
from scipy import ndimage
from scipy.spatial.transform import Rotation

from data_modules.cohort import raw_subject
from data_modules.datamodule import FemurDataModule
from data_modules.errors import UserError
from data_modules.localisation import FemurLocator, box_center_mm, head_center_mm, rotation_matrix
from data_modules.synthetic.reframe import FRAMINGS, Framing, reframe
from data_modules.roi import Box, label_coverage
from data_modules.transforms import RoiCrop
from stvnet.cli import main as cli_main
from stvnet.inference import read_checkpoint_info
from stvnet.localise import measure, summary
from stvnet.metrics import evaluate_case
from stvnet.qc import edges_touched, qc_record, training_range
from tests.conftest import tiny_data_args

HARD = ("abdomen-to-thigh", "off-centre left 60 mm", "rotated +15 deg (axial)", "rolled -15 deg (coronal)",
        "left hip only", "metal: right hip prosthesis")


def _box_at(start, size, spacing=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, Box]:
    affine = np.diag([*spacing, 1.0])
    shifted = affine.copy()
    shifted[:3, 3] = np.asarray(start) * np.asarray(spacing)
    return affine, Box(shifted, tuple(size))


def test_label_coverage_gives_the_share_inside_and_where_the_rest_is():
    label = np.zeros((10, 10, 10), np.uint8)
    label[2:6, 3:5, 0:8] = 1  # 4 x 2 x 8 voxels
    assert label_coverage(label, *_box_at((0, 0, 0), (10, 10, 10))) == (1.0, "")
    inside, cut = label_coverage(label, *_box_at((3, 0, 2), (10, 10, 10), (2.0, 1.0, 2.5)))
    assert inside == pytest.approx(3 / 4 * 6 / 8)
    assert cut == "left 2 mm, inferior 5 mm"  # one column of 2 mm on the left, two slices of 2.5 mm below
    assert label_coverage(label, *_box_at((0, 0, 0), (10, 4, 10)))[1] == "anterior 1 mm"


def test_roi_crop_centres_the_box_on_the_located_point():
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = (-50, 10, 7)
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, 40, 30, 20), affine=affine))
    subject["roi_center_mm"] = np.array([-20.0, 30.0, 37.0])  # voxel (15, 10, 10)
    subject.update_attributes()
    roi = RoiCrop((8, 6, 4))(subject)
    centre = roi["image"].affine @ np.array([4.0, 3.0, 2.0, 1.0])  # the box's middle voxel, in mm
    assert np.allclose(centre[:3], [-20.0, 30.0, 37.0])
    assert torch.equal(roi["image"].data, subject["image"].data[:, 11:19, 7:13, 8:12])


@pytest.fixture(scope="module")
def fold0(tiny_cohort, tmp_path_factory) -> FemurDataModule:
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path_factory.mktemp("splits"), roi_max_rotation=20.0))
    dm.prepare_data()
    return dm


@pytest.mark.heavy
@pytest.mark.not_in_mutation_run
def test_the_template_finds_the_femur_under_hard_framings(fold0):
    per_case = measure(fold0, tuple(f for f in FRAMINGS if f.name in HARD))
    assert set(per_case["framing"]) == set(HARD)
    assert len(per_case) == len(HARD) * (len(fold0.subject_ids("val")) + len(fold0.subject_ids("test")))
    # the 128 mm ROI leaves >= 12 mm around the femur: errors stay inside that margin and at most one label of the
    # 36 loses a sliver (on the realistic generator's faint bone, one femur rolled by 15 deg lost 8 mm, 1.1%)
    assert per_case["error_mm"].max() < 10.0, per_case
    assert (per_case["label_in_roi"] >= 0.98).all() and (per_case["cut"] != "").sum() <= 1, per_case
    table = summary(per_case)
    assert table.loc["all framings", "n"] == len(per_case)
    assert table.loc["all framings", "whole label in ROI"] == (per_case["label_in_roi"] == 1.0).mean() >= 35 / 36


def test_the_template_is_built_from_training_scans_only(fold0):
    train = set(fold0.subject_ids("train"))
    assert len(fold0.locator.stats["volume_ml"]) == len(train)
    rows = fold0.table[fold0.table["subject_id"].isin(train)]
    again = FemurLocator.build([raw_subject(r) for _, r in rows.iterrows()], fold0.hparams.hu_window,
                               max_rotation=20.0)
    assert np.array_equal(again.template, fold0.locator.template)
    restored = FemurLocator.from_state_dict(fold0.state_dict()["locator"])  # what a checkpoint carries
    assert np.array_equal(restored.template, fold0.locator.template) and restored.stats == fold0.locator.stats
    assert restored.max_rotation == 20.0  # a checkpoint turns the ROI as its training did


def test_training_stops_on_labels_cut_by_the_roi_one_line_per_subject(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", roi_size=(12, 12, 12)))  # 48 mm
    with pytest.raises(UserError) as err:
        dm.setup("fit")
    lines = str(err.value).splitlines()
    train = dm.subject_ids("train")
    assert len(lines) == len(train) + 1
    assert all(line.startswith(sid + ": ") and "% of the femur label lies outside the ROI (" in line
               and " mm beyond its edge)" in line for sid, line in zip(sorted(train), sorted(lines[:-1])))
    assert lines[-1].startswith(f"{len(train)} subject(s) would train on cut labels: enlarge --data.roi_size")


SIDES_ALL = ["left", "right", "posterior", "anterior", "inferior", "superior"]


def test_qc_ranges_and_edges():
    assert training_range([1.0, 3.0]) == (0.5, 3.5)
    image = tio.ScalarImage(tensor=torch.zeros(1, 6, 6, 6), affine=np.diag([-1.0, -1.0, 1.0, 1.0]))  # LPS voxels
    mask = np.zeros((6, 6, 6), np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    assert edges_touched(mask, image, margin_mm=1.0) == [] and edges_touched(mask, image, margin_mm=3.0) == SIDES_ALL
    mask[0, 3, 3] = 1  # first LPS voxel on x: the patient's right edge
    mask[3, 3, 5] = 1
    assert edges_touched(mask, image, margin_mm=1.0) == ["right", "superior"]


def _test_case(run, tiny_cohort) -> tuple[str, tio.Subject]:
    sid = json.loads((run / "splits.json").read_text())["test"][0]
    row = pd.read_csv(tiny_cohort).set_index("subject_id").loc[sid]
    return sid, tio.Subject(image=tio.ScalarImage(tiny_cohort.parent / row["image"]),
                            label=tio.LabelMap(tiny_cohort.parent / row["label"]))


def _dice(mask_path, label: tio.LabelMap) -> float:
    mask = tio.LabelMap(mask_path)
    assert np.allclose(mask.affine, label.affine, atol=1e-4)
    return evaluate_case(mask.data[0].numpy() > 0, label.data[0].numpy() > 0, label.spacing)["dice"]


@pytest.mark.slow
def test_a_checkpoint_segments_reframed_scans_as_well_as_the_original(trained_runs, tiny_cohort, tmp_path):
    run = trained_runs["vnet"]
    assert read_checkpoint_info(run / "checkpoints" / "last.ckpt").locator is not None  # the template travels along
    _, subject = _test_case(run, tiny_cohort)
    scans, labels = tmp_path / "scans", {}
    scans.mkdir()
    for framing in (Framing("original"), *(f for f in FRAMINGS if f.name in HARD)):
        name = framing.name.replace(" ", "_")
        framed = reframe(subject, framing)
        framed["image"].save(scans / f"{name}.nii.gz")
        labels[name] = framed["label"]
    out = tmp_path / "masks"
    assert cli_main(["predict", str(scans), "--checkpoint", str(run), "--out", str(out)]) == 0
    dice = {name: _dice(out / f"{name}.nii.gz", label) for name, label in labels.items()}
    assert dice["original"] > 0.6, dice  # an 8-epoch network of 8 channels on 4 mm voxels
    # a longer or off-centre field of view: the ROI lands on the same anatomy, the masks agree
    assert abs(dice["abdomen-to-thigh"] - dice["original"]) <= 0.01, dice
    assert abs(dice["off-centre_left_60_mm"] - dice["original"]) <= 0.01, dice
    # a patient turned 15 degrees: the ROI turns with the patient, so the network sees the femur as in training, up
    # to the interpolation of a second resampling at 4 mm (-0.009 and -0.007 here; make train's checkpoint: the
    # README's localisation table)
    assert all(abs(d - dice["original"]) <= 0.02 for d in dice.values()), dice
    qc = pd.read_csv(out / "qc.csv", keep_default_na=False).set_index("name")
    verdict = qc["flags"].str.replace(r"[0-9.]+", "#", regex=True)  # which checks failed, not the exact values
    assert verdict["abdomen-to-thigh"] == verdict["original"]  # the same verdict on the same anatomy
    located = np.array(json.loads((out / "abdomen-to-thigh.qc.json").read_text())["roi_center_mm"])
    assert np.linalg.norm(located - box_center_mm(labels["abdomen-to-thigh"])) < 10.0


@pytest.mark.slow
def test_the_right_femur_is_segmented_by_mirroring(trained_runs, tiny_cohort, tmp_path):
    run = trained_runs["vnet"]
    _, subject = _test_case(run, tiny_cohort)
    image = nib.load(subject["image"].path)
    # the same patient mirrored left-right: the labelled femur is now the right one
    data = np.asanyarray(image.dataobj)
    axis = int(np.argmax(np.abs(image.affine[0, :3])))  # the voxel axis along x
    mirror = tmp_path / "mirror.nii.gz"
    nib.save(nib.Nifti1Image(np.flip(data, axis).copy(), image.affine, image.header), str(mirror))
    assert cli_main(["predict", str(subject["image"].path), "-c", str(run), "--out", str(tmp_path / "left")]) == 0
    assert cli_main(["predict", str(mirror), "-c", str(run), "--out", str(tmp_path / "right"), "--side", "right"]) == 0
    left = np.asarray(nib.load(next((tmp_path / "left").glob("*.nii.gz"))).dataobj)
    right = np.asarray(nib.load(tmp_path / "right" / "mirror.nii.gz").dataobj)
    assert left.sum() > 100
    assert evaluate_case(np.flip(right, axis), left, (1, 1, 1))["dice"] > 0.98
    record = json.loads((tmp_path / "right" / "mirror.qc.json").read_text())
    left_record = json.loads(next((tmp_path / "left").glob("*.qc.json")).read_text())
    assert record["side"] == "right" and len(record["flags"]) == len(left_record["flags"])  # the same verdict


@pytest.mark.slow
def test_predict_flags_a_scan_without_bone_and_strict_fails(trained_runs, tiny_cohort, tmp_path, capsys):
    _, subject = _test_case(trained_runs["vnet"], tiny_cohort)
    water = tmp_path / "water.nii.gz"  # a phantom of water with CT noise (10 HU): no bone anywhere
    noise = 10.0 * torch.randn(subject["image"].data.shape, generator=torch.Generator().manual_seed(0))
    tio.ScalarImage(tensor=noise, affine=subject["image"].affine).save(water)
    out = tmp_path / "masks"
    assert cli_main(["predict", str(water), "-c", str(trained_runs["vnet"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    # whatever a network of 8 epochs makes of water (nothing, or a blob: it differs between machines), QC says so
    assert "water: WARNING: " in err and "bone fraction around the femur unlike the training scans" in err
    record = json.loads((out / "water.qc.json").read_text())
    assert any(flag.startswith("bone fraction around the femur unlike the training scans") for flag in record["flags"])
    assert ("empty mask: no femur found" in record["flags"]) == (record["volume_ml"] == 0.0)
    assert len(record["roi_center_mm"]) == 3 and len(record["p95_hu_training_range"]) == 2
    assert cli_main(["predict", str(water), "-c", str(trained_runs["vnet"]), "--out", str(tmp_path / "strict"),
                     "--strict"]) == 1


def test_an_empty_mask_is_flagged_and_its_volume_is_zero(tiny_cohort):
    scan = str(tiny_cohort.parent / pd.read_csv(tiny_cohort)["image"].iloc[0])
    mask = np.zeros(tio.ScalarImage(scan).spatial_shape, dtype=np.uint8)
    record = qc_record(scan, mask, locator=None)
    assert record["volume_ml"] == 0.0 and "empty mask: no femur found" in record["flags"]
    mask[tuple(s // 2 for s in mask.shape)] = 1
    assert "empty mask: no femur found" not in qc_record(scan, mask, locator=None)["flags"]


@pytest.mark.slow
def test_a_femur_cut_by_the_field_of_view_is_flagged(trained_runs, tiny_cohort, tmp_path, capsys):
    _, subject = _test_case(trained_runs["vnet"], tiny_cohort)
    canonical = tio.ToCanonical()(subject)
    lowest = int(np.argwhere(canonical["label"].data[0].numpy() > 0)[:, 2].min())
    cut = tio.Crop((0, 0, 0, 0, lowest + 6, 0))(canonical)  # the scan now starts 6 slices into the femur
    cut["image"].save(tmp_path / "short.nii.gz")
    out = tmp_path / "masks"
    assert cli_main(["predict", str(tmp_path / "short.nii.gz"), "-c", str(trained_runs["vnet"]), "--out", str(out),
                     "--strict"]) == 1
    flag = "the femur reaches beyond the scan's inferior edge by ~"
    assert f"short: WARNING: {flag}" in capsys.readouterr().err
    record = json.loads((out / "short.qc.json").read_text())
    assert any(f.startswith(flag) and f.endswith("mm: the field of view cuts it off") for f in record["flags"])
    assert 10 < record["femur_beyond_scan_mm"]["inferior"] < 45, record  # 6 slices of 4 mm were cut
    assert (out / "short.nii.gz").is_file()  # the mask is still written, and marked


def test_the_roi_turns_with_the_patient(fold0):
    """A patient turned 12 degrees: the locator finds the turn and the ROI shows the femur as in the original scan; an
    axis-aligned ROI (``roi_max_rotation: 0``) does not."""
    row = fold0.table.set_index("subject_id").loc[fold0.subject_ids("test")[0]]
    subject = raw_subject(row.rename_axis(None).to_frame().T.assign(subject_id=row.name).iloc[0])
    original, turned = fold0.preprocess(subject), fold0.preprocess(reframe(subject, Framing("t", degrees=(0, 0, 12))))
    found = turned["roi_rotation"] @ original["roi_rotation"].T  # the turn between the two scans' poses
    # within about one step of the coarse sweeps (5 deg): 4.6 deg on the v4 cohort's 4 mm voxels (v3: under 4)
    assert np.degrees(Rotation.from_matrix(found.T @ rotation_matrix((0, 0, 12))).magnitude()) < 6.0

    def overlap(a: tio.Subject, b: tio.Subject) -> float:
        x, y = a["label"].data > 0, b["label"].data > 0
        return float(2 * (x & y).sum() / (x.sum() + y.sum()))

    axis_aligned = FemurDataModule(**{**fold0.hparams, "roi_max_rotation": 0.0})
    fixed = axis_aligned.preprocess(reframe(subject, Framing("t", degrees=(0, 0, 12))))
    # 4 mm voxels resampled twice: 0.87 for the turned ROI against 0.83 for the axis-aligned one (v3: 0.90, 0.80)
    assert overlap(turned, original) > 0.85 and overlap(turned, original) > overlap(fixed, axis_aligned.preprocess(subject)) + 0.03


def test_a_turned_femur_beats_an_unturned_look_alike():
    """The axis-aligned correlation can favour a look-alike over a turned femur (a scan's top slice repeated up the
    abdomen did so on the v4 cohort, 228 mm off); the pose is searched at the best few peaks and the best posed match
    wins."""
    rng = np.random.default_rng(0)

    def smooth(shape):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.5)
        return (field / field.std()).astype(np.float32)

    template = smooth((24, 24, 28))
    locator = FemurLocator(template, 6.0, (-200.0, 1200.0), max_rotation=20.0)
    scan = np.zeros((100, 40, 44), np.float32)
    scan[8:32, 8:32, 8:36] = ndimage.rotate(template, 20, axes=(0, 1), reshape=False, order=1, mode="nearest")
    scan[62:86, 8:32, 8:36] = 0.75 * template + 0.66 * smooth(template.shape)  # correlates 0.75 unturned
    found = locator.locate_coarse(tio.ScalarImage(tensor=torch.from_numpy(scan[None]), affine=np.diag([6.0, 6.0, 6.0, 1.0])))
    assert np.abs(found.center_mm / 6.0 - [20.0, 20.0, 22.0]).max() < 1.5  # the turned femur's centre, in voxels
    assert found.score > 0.85


def _ball_on_a_shaft(spacing=(1.0, 1.0, 1.0)) -> tio.Subject:
    """A 12 mm femoral head centred at RAS (40, 50, 70) mm on a 6 mm shaft running down to z = 5 mm, in a
    soft-tissue scan; voxels of ``spacing`` mm."""
    shape = tuple(int(round(n / s)) for n, s in zip((80, 100, 100), spacing))
    grid = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij"), -1)
    head = np.linalg.norm(grid - [40.0, 50.0, 70.0], axis=-1) <= 12.0
    shaft = (np.hypot(grid[..., 0] - 40.0, grid[..., 1] - 50.0) <= 6.0) & (grid[..., 2] >= 5.0) & (grid[..., 2] <= 70.0)
    label = (head | shaft).astype(np.uint8)
    affine = np.diag([*spacing, 1.0])
    image = np.where(label > 0, 700.0, 40.0).astype(np.float32)
    return tio.Subject(image=tio.ScalarImage(tensor=image[None], affine=affine),
                       label=tio.LabelMap(tensor=torch.from_numpy(label[None]), affine=affine))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.0)])
def test_head_center_is_the_centre_of_the_largest_sphere_in_the_femur_top(spacing):
    center, radius = head_center_mm(_ball_on_a_shaft(spacing)["label"])
    assert np.linalg.norm(center - [40.0, 50.0, 70.0]) <= spacing[2]
    assert radius == pytest.approx(12.0, abs=spacing[2])


@pytest.mark.parametrize("below", [20.0, 40.0])
def test_a_field_of_view_cut_below_the_head_ends_there_and_keeps_the_head(below):
    cut = reframe(_ball_on_a_shaft(), Framing("cut", below_head_mm=below))
    lowest_z = cut["image"].affine[2, 3]  # world z of the first remaining slice (canonical, 1 mm)
    assert 70.0 - below - 1.0 <= lowest_z <= 70.0 - below
    label = cut["label"].data[0].numpy()
    assert label[..., -1].sum() == 0 and label.sum() < _ball_on_a_shaft()["label"].data.sum()
    assert label[40, 50, int(round(70.0 - lowest_z))] == 1  # the head centre is still in view
