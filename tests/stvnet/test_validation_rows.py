"""Per-subject validation rows and the epoch means a validation epoch logs, on batches with known answers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio

from stvnet.losses import segmentation_loss
from stvnet.metrics import evaluate_case
from stvnet.validation_rows import case_rows, epoch_means

SPACING = (2.0, 3.0, 4.0)


def known_batch() -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Two subjects on an 8 x 10 x 12 grid of 2 x 3 x 4 mm: a box label each, predictions shifted by known amounts."""
    gt = np.zeros((2, 1, 8, 10, 12), bool)
    gt[0, 0, 2:6, 3:7, 4:8] = True
    gt[1, 0, 1:5, 2:8, 2:10] = True
    pred = np.zeros_like(gt)
    pred[0, 0, 3:7, 3:7, 4:8] = True  # shifted one voxel along the first axis
    pred[1, 0] = gt[1, 0]  # exact
    logits = torch.from_numpy(np.where(pred, 4.0, -4.0).astype(np.float32))
    affine = np.diag([*SPACING, 1.0])
    batch = {"label": {tio.DATA: torch.from_numpy(gt.astype(np.float32)), tio.AFFINE: torch.from_numpy(affine)[None]},
             "image": {tio.DATA: torch.zeros(gt.shape), tio.AFFINE: torch.from_numpy(affine)[None].repeat(2, 1, 1)},
             "subject_id": ["s0", "s1"], "sex": ["F", "M"]}
    return {"logits": logits}, batch, pred, gt


def test_each_subject_gets_its_own_dice_and_loss():
    out, batch, pred, gt = known_batch()
    rows = case_rows(out, batch, threshold=0.5, loss_kind="dice_bce", surface_metrics=False)
    assert [r["subject_id"] for r in rows] == ["s0", "s1"] and [r["sex"] for r in rows] == ["F", "M"]
    assert rows[0]["dice"] == pytest.approx(2 * 48 / 128)  # 3 of 4 slabs of 16 voxels overlap: 2 * 48 / (64 + 64)
    assert rows[1]["dice"] == 1.0
    for i, row in enumerate(rows):
        expected = segmentation_loss(out["logits"][i:i + 1], torch.from_numpy(gt[i:i + 1].astype(np.float32)),
                                     "dice_bce")
        assert row["loss"] == pytest.approx(float(expected))
    assert rows[0]["loss"] > rows[1]["loss"]
    assert set(rows[0]) == {"subject_id", "sex", "loss", "dice"}


def test_surface_metrics_are_in_mm_of_the_rois_spacing():
    out, batch, pred, gt = known_batch()
    rows = case_rows(out, batch, threshold=0.5, loss_kind="dice", surface_metrics=True)
    expected = evaluate_case(pred[0, 0], gt[0, 0], SPACING)
    for metric in ("dice", "sensitivity", "specificity", "hd", "hd95", "assd"):
        assert rows[0][metric] == pytest.approx(expected[metric])
    assert rows[0]["hd"] == pytest.approx(SPACING[0])  # the one-voxel shift is along the 2 mm axis


def test_the_threshold_decides_the_mask_and_a_prior_gets_its_own_dice():
    out, batch, _, gt = known_batch()
    out["logits"] = torch.where(out["logits"] > 0, torch.tensor(0.5), torch.tensor(-4.0))  # sigmoid 0.62 inside
    prior = torch.from_numpy(gt.astype(np.float32)) * 0.9
    prior[0, 0, :, :, :6] = 0.0  # half of subject 0's prior is lost
    rows = case_rows({**out, "prior": prior}, batch, threshold=0.7, loss_kind="dice", surface_metrics=False)
    assert [r["dice"] for r in rows] == [0.0, 0.0]  # nothing is above 0.7
    assert rows[1]["prior_dice"] == 1.0
    assert rows[0]["prior_dice"] == pytest.approx(2 * 32 / (64 + 32))
    assert "backbone_dice" not in rows[0]


def test_an_st_vnet_row_scores_its_backbone_alone_beside_the_fused_output():
    out, batch, _, gt = known_batch()
    backbone = torch.where(torch.from_numpy(gt), torch.tensor(3.0), torch.tensor(-3.0))
    backbone[1] = -3.0  # subject 1's backbone finds nothing; the fused output (the known batch's) still does
    rows = case_rows({**out, "prior": backbone.sigmoid(), "backbone_logits": backbone}, batch, threshold=0.5,
                     loss_kind="dice", surface_metrics=False)
    assert [r["backbone_dice"] for r in rows] == [1.0, 0.0]
    assert rows[1]["dice"] > 0


def test_epoch_means_average_every_metric_and_each_sex():
    table = pd.DataFrame({"subject_id": ["a", "b", "c"], "sex": ["M", "F", "F"], "dice": [0.9, 0.6, 0.8],
                          "loss": [0.1, 0.4, 0.3]})
    means = epoch_means(table)
    assert means == pytest.approx({"dice": 0.7666667, "loss": 0.2666667, "subjects": 3.0, "dice_male": 0.9,
                                   "dice_female": 0.7})
    only_women = epoch_means(table[table["sex"] == "F"])
    assert "dice_male" not in only_women and only_women["dice_female"] == pytest.approx(0.7)


def test_rows_use_the_loss_asked_for_and_the_spacing_of_a_turned_roi():
    """A turned ROI (rotation times spacing in the affine) is measured along its own axes: the spacing is the norm of
    each *column*; the loss is the one configured (the paper's Dice, not the default Dice + BCE)."""
    out, batch, pred, gt = known_batch()
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    turned = np.eye(4)
    turned[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(SPACING)
    batch["image"][tio.AFFINE] = torch.from_numpy(turned)[None].repeat(2, 1, 1)
    rows = case_rows(out, batch, threshold=0.5, loss_kind="dice", surface_metrics=True)
    assert rows[0]["hd"] == pytest.approx(SPACING[0])
    expected = segmentation_loss(out["logits"][:1], torch.from_numpy(gt[:1].astype(np.float32)), "dice")
    assert rows[0]["loss"] == pytest.approx(float(expected))
    assert rows[0]["loss"] != pytest.approx(float(segmentation_loss(out["logits"][:1], torch.from_numpy(
        gt[:1].astype(np.float32)), "dice_bce")))


def test_a_probability_exactly_at_the_threshold_is_background():
    """Strictly above the threshold is femur, for the network's output and for the warped prior (0.5) alike."""
    out, batch, _, gt = known_batch()
    at = torch.where(torch.from_numpy(gt), torch.tensor(0.0), torch.tensor(-4.0))  # sigmoid(0) = 0.5 on the label
    prior = torch.from_numpy(gt.astype(np.float32)) * 0.5
    rows = case_rows({"logits": at, "prior": prior}, batch, threshold=0.5, loss_kind="dice", surface_metrics=False)
    assert [r["dice"] for r in rows] == [0.0, 0.0] and [r["prior_dice"] for r in rows] == [0.0, 0.0]
