"""Per-subject validation rows: one row of metrics per validated subject, in mm of the ROI's own spacing; across DDP
ranks (a distributed sampler pads the last batch with repeated subjects) rows are gathered from every rank and each
subject is kept once before anything is averaged."""

from __future__ import annotations

from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torchio as tio

from stvnet.losses import segmentation_loss
from stvnet.metrics import dice, evaluate_case


def case_rows(out: dict[str, torch.Tensor], batch: dict, threshold: float, loss_kind: str,
              surface_metrics: bool) -> list[dict[str, Any]]:
    """One row per subject of a validation batch: id, sex, its loss, Dice (and sensitivity, specificity, HD, HD95,
    ASSD with ``surface_metrics``) of the thresholded prediction, and for an ST-V-Net the Dice of the warped prior
    and of its backbone alone (what the fused prior adds is ``dice - backbone_dice``)."""
    soft = batch["label"][tio.DATA].float()  # soft labels (label_interpolation: linear) are femur above one half
    target = soft > 0.5
    affine = torch.as_tensor(batch["image"][tio.AFFINE][0], dtype=torch.float64)
    spacing = torch.linalg.norm(affine[:3, :3], dim=0).tolist()
    pred = (torch.sigmoid(out["logits"]) > threshold).cpu().numpy()
    gt = target.cpu().numpy()
    rows = []
    for i in range(gt.shape[0]):
        # the loss is a per-subject row like the metrics, so DDP's padded duplicates are dropped before averaging
        loss = segmentation_loss(out["logits"][i:i + 1], soft[i:i + 1], loss_kind)
        row = {"subject_id": batch["subject_id"][i], "sex": batch["sex"][i], "loss": float(loss)}
        row.update(evaluate_case(pred[i, 0], gt[i, 0], spacing) if surface_metrics else {"dice": dice(pred[i, 0], gt[i, 0])})
        if "prior" in out:
            row["prior_dice"] = dice((out["prior"][i, 0] > 0.5).cpu().numpy(), gt[i, 0])
        if "backbone_logits" in out:
            row["backbone_dice"] = dice((torch.sigmoid(out["backbone_logits"][i, 0]) > threshold).cpu().numpy(), gt[i, 0])
        rows.append(row)
    return rows


def epoch_means(table: pd.DataFrame) -> dict[str, float]:
    """What a validation epoch logs: the mean of every metric over subjects, the number of subjects, and the mean
    Dice of each sex present."""
    means = {m: float(table[m].mean()) for m in table.columns if m not in ("subject_id", "sex")}
    means["subjects"] = float(len(table))
    for sex, name in (("M", "male"), ("F", "female")):
        part = table[table["sex"] == sex]
        if len(part):
            means[f"dice_{name}"] = float(part["dice"].mean())
    return means


def gather_unique(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of every process (this one's alone without DDP), one per ``subject_id``, in id order."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everything: list[list[dict[str, Any]] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everything, rows)
        rows = [r for part in everything for r in (part or [])]
    unique = {r["subject_id"]: r for r in rows}
    return [unique[k] for k in sorted(unique)]
