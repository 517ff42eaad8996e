"""``stvnet predict``: segment new scans (one file, a folder or a manifest) with one or more checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import pandas as pd
from tqdm.auto import tqdm

from stvnet.inference import Predictor, ensemble_segment, find_checkpoint

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def collect_inputs(inputs: list[str]) -> list[tuple[str, Path]]:
    """``(name, image path)`` pairs from NIfTI files, folders of NIfTI files and manifest CSVs."""
    items: list[tuple[str, Path]] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
            if not files:
                raise FileNotFoundError(f"{path}: folder holds no .nii/.nii.gz files")
            items += [(_stem(p), p) for p in files]
        elif path.suffix == ".csv":
            table = pd.read_csv(path, dtype=str)
            if "image" not in table.columns:
                raise ValueError(f"{path}: a manifest needs an 'image' column")
            for i, row in table.iterrows():
                image = Path(row["image"])
                image = image if image.is_absolute() else path.parent / image
                items.append((str(row.get("subject_id", _stem(image))) if "subject_id" in table else _stem(image), image))
        elif path.is_file():
            items.append((_stem(path), path))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return items


def predict(inputs: list[str], checkpoints: list[str], out: str | Path, threshold: float = 0.5,
            keep_largest: bool = False, overwrite: bool = False, device: str = "auto") -> tuple[list[Path], list[str]]:
    """Write ``<out>/<name>.nii.gz`` masks; returns the written files and one error line per failed input."""
    out = Path(out)
    items = collect_inputs(inputs)
    resolved_inputs = {p.resolve() for _, p in items}
    predictors = [Predictor.from_checkpoint(find_checkpoint(c), device=device) for c in checkpoints]
    out.mkdir(parents=True, exist_ok=True)
    written, errors = [], []
    for name, image in tqdm(items, desc="predict", unit="scan"):
        target = out / f"{name}.nii.gz"
        if target.resolve() in resolved_inputs:
            errors.append(f"{name}: output {target} would overwrite an input scan; choose another --out")
            continue
        if target.exists() and not overwrite:
            errors.append(f"{name}: {target} exists (pass --overwrite to replace it)")
            continue
        try:
            nib.load(str(image)).header  # readable as NIfTI?
        except Exception as exc:
            errors.append(f"{name}: cannot read {image} as NIfTI ({type(exc).__name__}: {exc})")
            continue
        t0 = time.perf_counter()
        try:
            mask, affine = ensemble_segment(predictors, image, threshold=threshold, keep_largest=keep_largest)
        except Exception as exc:  # one bad scan does not stop the batch
            errors.append(f"{name}: prediction failed ({type(exc).__name__}: {exc})")
            continue
        nib.save(nib.Nifti1Image(mask, affine), str(target))
        written.append(target)
        tqdm.write(f"{name}: {int(mask.sum())} femur voxels in {time.perf_counter() - t0:.1f} s -> {target}")
    return written, errors
