"""``stvnet predict``: segment new scans (one file, a folder or a manifest) with one or more checkpoints, the left
or (mirrored) right femur, with a QC record per scan (:mod:`stvnet.qc`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nibabel as nib
import pandas as pd
from tqdm.auto import tqdm

from data_modules.errors import (InvalidInput, MissingInput, UserError, exception_line, output_folder,
                                 refuse_blocked_folder)
from data_modules.manifest import checked_scan
from data_modules.scan_io import NIFTI_SUFFIXES
from stvnet.inference import Predictor, ensemble_segment, find_checkpoint, mirrored, scan_image
from stvnet.qc import qc_record


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def collect_inputs(inputs: list[str]) -> list[tuple[str, Path]]:
    """``(name, image path)`` pairs from scan files, DICOM series folders, folders of NIfTI files and manifest CSVs."""
    items: list[tuple[str, Path]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
            if not files:  # a DICOM series (checked when it is read)
                items.append((path.name, path))
            items += [(_stem(p), p) for p in files]
        elif path.suffix == ".csv":
            try:
                table = pd.read_csv(path, dtype=str)
            except pd.errors.EmptyDataError:
                raise InvalidInput(f"{path}: the file is empty; a manifest CSV needs an 'image' column") from None
            if "image" not in table.columns:
                raise InvalidInput(f"{path}: a manifest needs an 'image' column")
            for i, row in table.iterrows():
                image = Path(row["image"])
                image = image if image.is_absolute() else path.parent / image
                items.append((str(row.get("subject_id", _stem(image))) if "subject_id" in table else _stem(image), image))
        elif path.is_file():
            items.append((_stem(path), path))
        else:
            raise MissingInput(f"{path}: no such file or folder")
    return items


def check_options(threshold: float, out: Path, side: str) -> None:
    """Refuse, before anything is read or written, a threshold that is not a probability, an ``--out`` that is a
    file and a side other than left or right."""
    if side not in ("left", "right"):
        raise InvalidInput(f"--side {side}: must be 'left' or 'right'")
    if not 0.0 < threshold < 1.0:
        raise InvalidInput(f"--threshold {threshold}: must be a probability in (0, 1), e.g. 0.5")
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"--out {out}: is a file; give a folder for the masks")
    refuse_blocked_folder(out, "--out")


def predict(inputs: list[str], checkpoints: list[str], out: str | Path, threshold: float = 0.5,
            keep_largest: bool = False, overwrite: bool = False, device: str = "auto",
            side: str = "left") -> tuple[list[Path], list[str], int]:
    """Write ``<out>/<name>.nii.gz`` masks with a QC record each (``<name>.qc.json``, ``qc.csv``); returns the written
    masks, one error line per failed input and the number of scans QC flagged (each flag is printed on stderr)."""
    out = Path(out)
    check_options(threshold, out, side)
    items = collect_inputs(inputs)
    resolved_inputs = {p.resolve() for _, p in items}
    predictors = [Predictor.from_checkpoint(find_checkpoint(c), device=device) for c in checkpoints]
    output_folder(out, "--out")
    written, errors, records = [], [], []
    for name, image in tqdm(items, desc="predict", unit="scan"):
        target = out / f"{name}.nii.gz"
        if target.resolve() in resolved_inputs:
            errors.append(f"{name}: output {target} would overwrite an input scan; choose another --out")
            continue
        if target.exists() and not overwrite:
            errors.append(f"{name}: {target} exists (pass --overwrite to replace it)")
            continue
        problems, original, voxels = checked_scan(name, image)  # never a mask from a scan not read whole
        if problems:
            errors += problems
            continue
        t0 = time.perf_counter()
        try:  # the scan is read once; the right side is mirrored in memory; each template searches it once
            scan = scan_image(voxels, original.affine)
            source, locations = (mirrored(scan) if side == "right" else scan), {}
            mask, _ = ensemble_segment(predictors, source, threshold=threshold, keep_largest=keep_largest,
                                       locations=locations)
            locator = predictors[0].locator
            record = qc_record(source, mask, locator, side, locations.get(locator.digest()) if locator else None)
        except UserError as exc:  # a scan the locator cannot use, named
            errors += [f"{name}: {line}" for line in exc.lines]
            continue
        except Exception as exc:  # one bad scan does not stop the batch
            errors.append(f"{name}: prediction failed ({exception_line(exc)})")
            continue
        nib.save(nib.Nifti1Image(mask, original.affine), str(target))
        record = {"name": name, **record, "scan": str(image), "mask": str(target)}
        (out / f"{name}.qc.json").write_text(json.dumps(record, indent=2))
        records.append(record)
        written.append(target)
        tqdm.write(f"{name}: {record['volume_ml']:.1f} mL femur in {time.perf_counter() - t0:.1f} s -> {target}")
        for flag in record["flags"]:
            print(f"stvnet predict: {name}: WARNING: {flag}", file=sys.stderr)
    if records:
        table = pd.DataFrame([{**r, "flags": "; ".join(r["flags"])} for r in records])
        table.to_csv(out / "qc.csv", index=False)
    return written, errors, sum(bool(r["flags"]) for r in records)
