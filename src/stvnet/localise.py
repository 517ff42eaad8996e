"""``stvnet localise``: measure femur localisation on held-out scans under many framings.

The template is built from one fold's training scans exactly as ``stvnet train`` builds it; each validation and test
scan of that fold is re-framed (:data:`data_modules.synthetic.reframe.FRAMINGS`) and run through the training preprocessing.
Per framing: the localisation error (ROI centre vs the centre of the label's bounding box, in mm), the share of
the label inside the ROI and, given a checkpoint of that fold, the Dice of its masks on the re-framed scans.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torchio as tio

from data_modules.cohort import raw_subject
from data_modules.datamodule import FemurDataModule
from data_modules.errors import output_folder
from data_modules.localisation import box_center_mm
from data_modules.synthetic.reframe import FRAMINGS, Framing, reframe
from stvnet.inference import Predictor
from stvnet.metrics import evaluate_case


def measure(datamodule: FemurDataModule, framings: tuple[Framing, ...] = FRAMINGS,
            predictor: Predictor | None = None) -> pd.DataFrame:
    """One row per (held-out subject, framing): error in mm, label share inside the ROI, what was cut, match score;
    with a ``predictor`` (a checkpoint of this fold) also the Dice of its mask on the re-framed scan."""
    datamodule.prepare_data()
    if datamodule.locator is None:
        raise ValueError("localisation is measured for --data.roi_locator template with a roi_size")
    table = datamodule.table
    held_out = set(datamodule.subject_ids("val")) | set(datamodule.subject_ids("test"))
    rows = []
    for _, row in table[table["subject_id"].isin(held_out)].iterrows():
        subject = raw_subject(row)
        for framing in framings:
            framed = reframe(subject, framing)
            roi = datamodule.preprocess(framed)  # locates the femur (LocateFemur) and crops around it (RoiCrop)
            rows.append({
                "subject_id": row["subject_id"], "framing": framing.name,
                "error_mm": float(np.linalg.norm(roi["roi_center_mm"] - box_center_mm(framed["label"]))),
                "label_in_roi": float(roi["label_in_roi"]), "cut": roi["label_cut"], "score": roi["locator_score"],
            })
            if predictor is not None:
                rows[-1]["dice"] = _dice(predictor, framed)
    return pd.DataFrame(rows)


def _dice(predictor: Predictor, subject: tio.Subject) -> float:
    """Dice of a checkpoint's mask of a (re-framed) scan against its label, in the scan's own grid."""
    with tempfile.TemporaryDirectory(prefix="stvnet-localise-") as tmp:
        path = Path(tmp) / "scan.nii.gz"
        subject["image"].save(path)
        mask, _ = predictor.segment(path)
    label = subject["label"]
    return evaluate_case(mask > 0, label.data[0].numpy() > 0, label.spacing)["dice"]


def summary(per_case: pd.DataFrame) -> pd.DataFrame:
    """Per framing and overall: n, median and worst error, share of subjects with the whole label inside the ROI."""
    def one(group: pd.DataFrame) -> pd.Series:
        return pd.Series({"n": len(group), "median error (mm)": group["error_mm"].median(),
                          "worst error (mm)": group["error_mm"].max(),
                          "whole label in ROI": (group["label_in_roi"] >= 1.0).mean(),
                          "min label share in ROI": group["label_in_roi"].min(),
                          "min match score": group["score"].min(),
                          **({"median Dice": group["dice"].median(), "worst Dice change": group["change"].min()}
                             if "dice" in group else {})})
    if "dice" in per_case:
        original = per_case[per_case["framing"] == FRAMINGS[0].name].set_index("subject_id")["dice"]
        per_case = per_case.assign(change=per_case["dice"] - per_case["subject_id"].map(original))
    order = list(dict.fromkeys(per_case["framing"]))
    table = pd.DataFrame({name: one(per_case[per_case["framing"] == name]) for name in order}).T
    table.loc["all framings"] = one(per_case)
    table["n"] = table["n"].astype(int)
    return table


def markdown(table: pd.DataFrame) -> str:
    """A summary table as Markdown (3 significant digits, shares as percentages)."""
    def cell(column: str, value: object) -> str:
        if column == "n":
            return str(int(value))
        if "share" in column or "whole" in column:
            return f"{100 * float(value):.1f}%"
        return f"{float(value):.3g}"
    lines = ["| framing | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(c, row[c]) for c in table.columns) + " |" for name, row in table.iterrows()]
    return "\n".join(lines)


def run(datamodule: FemurDataModule, out: str | Path, predictor: Predictor | None = None) -> pd.DataFrame:
    """Measure, write ``per_case.csv`` and ``summary.md`` under ``out``, and return the summary."""
    out = output_folder(out, "--out")
    per_case = measure(datamodule, predictor=predictor)
    per_case.to_csv(out / "per_case.csv", index=False)
    table = summary(per_case)
    h = datamodule.hparams
    roi_mm = [round(n * s) for n, s in zip(h.roi_size, h.target_spacing)]
    header = (f"ROI {list(h.roi_size)} voxels at {list(h.target_spacing)} mm ({roi_mm} mm); fold {datamodule.fold} of "
              f"{datamodule.n_folds}: template from {len(datamodule.subject_ids('train'))} training scans, "
              f"{per_case['subject_id'].nunique()} held-out scans (val + test)\n\n")
    (out / "summary.md").write_text(header + markdown(table) + "\n")
    return table
