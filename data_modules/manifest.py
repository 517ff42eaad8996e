"""Cohort manifests: one CSV row per subject, validated before anything trains.

Required columns: ``subject_id``, ``image``, ``label``, ``sex`` (M/F; ``male``/``female`` and 1/2 are
accepted too). Paths may be absolute or relative to the manifest's folder. Any other column (age,
site, ...) is kept as a covariate. ``label`` may be empty for prediction-only manifests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from data_modules.scan_io import ScanHeader, read_header, read_voxels
from data_modules.errors import UserError, exception_line

REQUIRED_COLUMNS = ("subject_id", "image", "label", "sex")
SEX_CODES = {"m": "M", "male": "M", "1": "M", "f": "F", "female": "F", "2": "F"}
COHORTS = ("all", "male", "female")


class ManifestError(UserError, ValueError):
    """A manifest has problems; the message lists one line per problem, naming the subject (the command line prints
    each as ``<manifest>: <problem>``)."""

    def __init__(self, manifest: Path | str, problems: list[str]):
        super().__init__(*(f"{manifest}: {p}" for p in problems))
        self.problems = problems
        self.args = (f"{manifest}: {len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems),)


def read_manifest(path: str | Path, require_labels: bool = True) -> pd.DataFrame:
    """Read a manifest into a table with absolute paths and normalised sex codes (no file checks)."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(path, [f"manifest file not found: {path}"])
    try:
        table = pd.read_csv(path, dtype={"subject_id": str, "sex": str})
    except pd.errors.EmptyDataError:
        raise ManifestError(path, ["the file is empty; a manifest is a CSV with a header row "
                                   "(subject_id,image,label,sex) and one row per subject"]) from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ManifestError(path, [f"not a readable CSV ({exception_line(exc)}); "
                                   "a manifest is a comma-separated text file, one row per subject"]) from None
    problems = [f"missing column '{c}'" for c in REQUIRED_COLUMNS if c not in table.columns]
    if problems:
        raise ManifestError(path, problems + [f"columns present: {', '.join(map(str, table.columns))}"])
    if table.empty:
        raise ManifestError(path, ["the manifest lists no subjects"])
    base = path.parent

    def resolve(value: object) -> str | None:
        if pd.isna(value) or str(value).strip() == "":
            return None
        p = Path(str(value)).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    table = table.copy()
    table["subject_id"] = table["subject_id"].astype(str).str.strip()
    table["image"] = table["image"].map(resolve)
    table["label"] = table["label"].map(resolve)
    table["sex"] = table["sex"].map(lambda s: SEX_CODES.get(str(s).strip().lower(), f"?{s}"))
    problems = []
    for sid, count in table["subject_id"].value_counts().items():
        if count > 1:
            problems.append(f"{sid}: duplicate subject_id ({count} rows)")
    for row in table.itertuples():
        if row.sex.startswith("?"):
            problems.append(f"{row.subject_id}: unknown sex code '{row.sex[1:]}' (use M or F)")
        if pd.isna(row.image):
            problems.append(f"{row.subject_id}: no image path")
        if require_labels and pd.isna(row.label):
            problems.append(f"{row.subject_id}: no label path")
    if problems:
        raise ManifestError(path, problems)
    return table


# a scan that holds even part of a proximal femur spans more than this along every axis (a femoral head is ~45 mm
# across); a header spacing in the wrong unit (0.07 for 0.7 mm) makes the field of view a tenth or less of that
MIN_FIELD_OF_VIEW_MM = 20.0


def geometry_problems(sid: str, shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[str]:
    """What the header alone rules out: a spacing that is not positive, a field of view too small for a femoral head
    (a header spacing in the wrong unit, e.g. 0.03 mm for 3 mm)."""
    if min(spacing) <= 0:
        return [f"{sid}: image voxel spacing {tuple(spacing)} is not positive (fix the image header)"]
    extent = tuple(float(n) * float(s) for n, s in zip(shape[:3], spacing[:3]))
    if min(extent) < MIN_FIELD_OF_VIEW_MM:
        shown = " x ".join(f"{e:.3g}" for e in extent)
        return [f"{sid}: image field of view {shown} mm (spacing {', '.join(f'{s:.3g}' for s in spacing[:3])} mm) "
                f"is too small to hold a femoral head (under {MIN_FIELD_OF_VIEW_MM:g} mm along an axis); the header's "
                "voxel spacing is probably in the wrong unit: fix it"]
    return []


def voxel_problems(sid: str, image: np.ndarray, label: np.ndarray | None) -> list[str]:
    """What reading every voxel can find: NaN/inf or a single value in the scan, a label that is not binary or is
    empty."""
    problems = []
    if not np.isfinite(image).all():
        problems.append(f"{sid}: image contains NaN or inf values")
    elif image.size and image.min() == image.max():
        problems.append(f"{sid}: image holds one value ({float(image.min()):g}) in every voxel: not a CT scan; "
                        "check the file or its export")
    if label is not None:
        values = np.unique(label)
        if not set(values.tolist()) <= {0, 1}:
            shown = ", ".join(f"{v:g}" for v in values[:6])
            problems.append(f"{sid}: label is not binary (values {shown}{'...' if len(values) > 6 else ''})")
        elif 1 not in values:
            problems.append(f"{sid}: label is empty (no femur voxels)")
    return problems


def scan_problems(name: str, path: str | Path) -> list[str]:
    """What stops a scan from being segmented, one line each: unreadable, not 3D, spacing not positive or a field of
    view too small for a femur, voxels that end early, are not finite or are all one value."""
    return checked_scan(name, path)[0]


def checked_scan(name: str, path: str | Path) -> tuple[list[str], ScanHeader | None, np.ndarray | None]:
    """:func:`scan_problems`, with the header and the (3D) voxels that check read when it found none: ``stvnet
    predict`` segments those instead of reading the scan again."""
    try:
        header = read_header(path)
    except Exception as exc:  # noqa: BLE001 (nibabel and SimpleITK raise several types for unreadable files)
        return [f"{name}: cannot read {path} as NIfTI, NRRD or a DICOM series ({exception_line(exc)})"], None, None
    if len(header.shape) != 3 and not (len(header.shape) == 4 and header.shape[3] == 1):
        return [f"{name}: {path} is not a 3D scan (shape {header.shape}); give the whole CT volume"], None, None
    geometry = geometry_problems(name, header.shape, header.spacing)
    if geometry:
        return [line.replace(f"{name}: image", f"{name}: {path}", 1) for line in geometry], None, None
    try:
        voxels = read_voxels(path)
    except Exception as exc:  # noqa: BLE001
        return [f"{name}: {path} cannot be read to its end ({exception_line(exc)}); the file is damaged or "
                "incomplete: copy or export it again"], None, None
    problems = [p.replace(f"{name}: image ", f"{name}: {path} ", 1) for p in voxel_problems(name, voxels, None)]
    return (problems, None, None) if problems else ([], header, voxels.reshape(header.shape[:3]))


def _check_subject(row: pd.Series, voxels: bool) -> list[str]:
    sid = row["subject_id"]
    problems: list[str] = []
    # an empty cell reaches here as None or NaN (pandas keeps whichever the column's other cells allow)
    paths = {kind: None if pd.isna(row[kind]) else row[kind] for kind in ("image", "label")}
    for kind, p in paths.items():
        if p is not None and not Path(p).exists():
            problems.append(f"{sid}: {kind} file not found: {p}")
    if problems:
        return problems
    try:
        image = read_header(paths["image"])
    except Exception as exc:  # nibabel and SimpleITK raise several types for unreadable files
        return [f"{sid}: image is not a readable NIfTI, NRRD or DICOM series ({type(exc).__name__}: {exc})"]
    if len(image.shape) != 3 and not (len(image.shape) == 4 and image.shape[3] == 1):
        return [f"{sid}: image is not 3D (shape {image.shape})"]
    geometry = geometry_problems(sid, image.shape, image.spacing)
    if geometry:
        return geometry
    if paths["label"] is None:  # a missing label that is required was named by read_manifest
        return voxel_problems(sid, read_voxels(paths["image"]), None) if voxels else []
    try:
        label = read_header(paths["label"])
    except Exception as exc:
        return problems + [f"{sid}: label is not a readable NIfTI or NRRD ({type(exc).__name__}: {exc})"]
    if label.shape[:3] != image.shape[:3]:
        return problems + [f"{sid}: image shape {image.shape[:3]} and label shape {label.shape[:3]} differ"]
    if not np.allclose(label.affine, image.affine, atol=1e-3):
        problems.append(f"{sid}: image and label affines differ (they must share one voxel grid)")
    if voxels:
        problems += voxel_problems(sid, read_voxels(paths["image"]), read_voxels(paths["label"]))
    return problems


def validate_manifest(path: str | Path, require_labels: bool = True, voxels: bool = True) -> pd.DataFrame:
    """Read a manifest and check every subject's files; raise :class:`ManifestError` listing all problems.

    ``voxels=False`` checks headers only (files, 3D, positive spacing, shapes and affines): the preprocessed cache
    checks the voxels of each scan once, when it builds the scan's entry, instead of on every run."""
    table = read_manifest(path, require_labels=require_labels)
    problems: list[str] = []
    for _, row in table.iterrows():
        problems.extend(_check_subject(row, voxels))
    if problems:
        raise ManifestError(path, problems)
    return table


def filter_cohort(table: pd.DataFrame, cohort: str) -> pd.DataFrame:
    """Keep all subjects, or only men / only women (the paper's sex-specific experiments)."""
    if cohort not in COHORTS:
        raise ValueError(f"cohort must be one of {COHORTS}, got '{cohort}'")
    if cohort == "all":
        return table.reset_index(drop=True)
    code = "M" if cohort == "male" else "F"
    return table[table["sex"] == code].reset_index(drop=True)
