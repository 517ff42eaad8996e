"""Writing a synthetic cohort: NIfTI images and labels, ``parameters.csv`` and the manifest, and the default cohort
that a run without a manifest trains on (the one entry point the data pipeline uses)."""

from __future__ import annotations

import ast
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from data_modules.synthetic.anatomy import SubjectParams, femur_shape, render_subject, sample_params, sample_surroundings
from data_modules.synthetic.clinical import render_clinical

#: acquisitions: ``default`` (the embedded cohort's grid) or ``clinical`` (hip QCT size, see
#: :mod:`data_modules.synthetic.clinical`)
PRESETS = ("default", "clinical")
#: the generator's version: a change that alters the cohort's bytes bumps it, so the default cohort (a folder named
#: after it) is written afresh instead of an older one being reused; runs on an older cohort keep their files
GENERATOR_VERSION = 4
DEFAULT_COHORT_DIR = f"data/synthetic-v{GENERATOR_VERSION}"


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    # nibabel writes gzip with a zero mtime, so output bytes depend only on content
    nib.save(img, str(path))


def _write_one(args: tuple[SubjectParams, tuple[float, float, float], str, str]) -> dict[str, object]:
    prm, spacing, out, preset = args
    torch.set_num_threads(1)  # one process per core
    out_dir = Path(out)
    if preset == "clinical":
        image, label, affine = render_clinical(prm)
    else:
        image, label, affine = render_subject(prm, spacing)
    img_path = out_dir / "images" / f"{prm.subject_id}.nii.gz"
    lbl_path = out_dir / "labels" / f"{prm.subject_id}.nii.gz"
    _save(image, affine, img_path)
    _save(label, affine, lbl_path)
    return {
        "subject_id": prm.subject_id,
        "image": f"images/{img_path.name}",
        "label": f"labels/{lbl_path.name}",
        "sex": prm.sex,
        "age": prm.age,
        "head_diameter_mm": round(2 * prm.head_radius, 2),
        "neck_shaft_angle_deg": round(femur_shape(prm).neck_shaft_angle, 2),
        "trabecular_hu": round(prm.trabecular_hu, 1),
        "osteoporotic": prm.osteoporotic,
        "joint_space_mm": round(prm.joint_space, 2),
        "metal": sample_surroundings(prm).metal,
        "shape": "x".join(str(n) for n in image.shape),
        "spacing_mm": "x".join(f"{abs(affine[i, i]):.3g}" for i in range(3)),
    }


def make_cohort(
    out_dir: str | Path,
    n_subjects: int = 40,
    seed: int = 0,
    spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
    female_fraction: float = 216 / 397,
    workers: int = 2,
    preset: str = "default",
    progress: bool = True,
) -> Path:
    """Write a synthetic cohort (NIfTI images, labels, ``manifest.csv``) and return the manifest path.

    The F:M ratio defaults to the paper's (216 women, 181 men). Subjects are rendered in parallel
    processes; the result does not depend on ``workers``. ``preset: clinical`` acquires the same anatomy like a
    clinical hip QCT scan (512 x 512 x 150-300 voxels, per-subject spacing; :mod:`data_modules.synthetic.clinical`) and ignores
    ``spacing``. ``progress`` shows a progress bar (on stderr).
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got '{preset}'")
    if n_subjects < 2:
        raise ValueError(f"n_subjects must be >= 2, got {n_subjects}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_female = int(round(n_subjects * female_fraction))
    sexes = np.array(["F"] * n_female + ["M"] * (n_subjects - n_female))
    rng.shuffle(sexes)
    params = [sample_params(i, str(sx), rng) for i, sx in enumerate(sexes)]
    jobs = [(prm, tuple(float(s) for s in spacing), str(out), preset) for prm in params]
    rows = []
    with tqdm(total=len(jobs), desc=f"writing the synthetic cohort in {out}", unit="scan", disable=not progress) as bar, \
            ProcessPoolExecutor(max_workers=workers) if workers > 1 else nullcontext() as pool:
        for row in (pool.map(_write_one, jobs) if pool else map(_write_one, jobs)):
            rows.append(row)
            bar.update()
    pd.DataFrame([asdict(p) for p in params]).to_csv(out / "parameters.csv", index=False)
    manifest = out / "manifest.csv"
    tmp = out / f".manifest.{os.getpid()}.tmp"
    pd.DataFrame(rows).to_csv(tmp, index=False)
    tmp.replace(manifest)  # last and atomic: a cohort with a manifest is complete, even after an interrupted run
    return manifest


def read_parameters(path: str | Path) -> list[SubjectParams]:
    """Read back a cohort's ``parameters.csv`` (to re-render or inspect a subject's anatomy)."""
    table = pd.read_csv(path, dtype={"subject_id": str, "sex": str})
    fields = SubjectParams.__dataclass_fields__
    missing = [name for name in fields if name not in table.columns]
    if missing:
        raise ValueError(f"{path}: written by an older generator (no {', '.join(missing)}); regenerate the cohort "
                         "with `stvnet synth`")
    casts = {"int": int, "bool": bool}
    out = []
    for row in table.to_dict("records"):
        values = {}
        for name, f in fields.items():
            v = row[name]
            values[name] = tuple(ast.literal_eval(v)) if "tuple" in str(f.type) else casts.get(str(f.type), lambda x: x)(v)
        out.append(SubjectParams(**values))
    return out


def cohort_fingerprint(manifest: str | Path) -> str:
    """SHA-256 over every file of a cohort listed in its manifest (for determinism checks)."""
    manifest = Path(manifest)
    digest = hashlib.sha256(manifest.read_bytes())
    table = pd.read_csv(manifest)
    for col in ("image", "label"):
        for rel in table[col]:
            digest.update((manifest.parent / rel).read_bytes())
    return digest.hexdigest()


def default_manifest(cohort_dir: str | Path = DEFAULT_COHORT_DIR, n_subjects: int = 40,
                     seed: int = 0) -> Path:  # pragma: no mutate block (a mutant regenerates a cohort: minutes each)
    """The embedded synthetic cohort's manifest, generated on first use."""
    manifest = Path(cohort_dir) / "manifest.csv"
    if manifest.is_file():
        return manifest
    manifest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(manifest) + ".lock"):  # concurrent first runs: one generates, the others wait for it
        if not manifest.is_file():
            print(f"Generating the synthetic QCT cohort ({n_subjects} subjects) in {cohort_dir} ...", flush=True)
            make_cohort(cohort_dir, n_subjects=n_subjects, seed=seed)
    return manifest
