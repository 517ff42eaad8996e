"""A persistent preprocessed cache: every scan is reoriented, windowed and resampled once, shared by everything.

What is stored. Per (scan, settings) an entry folder holds the scan in canonical (RAS) orientation, HU-windowed to
[0, 1] and resampled to ``target_spacing`` (``image.npy``, float32), its label (``label.npy``: uint8, or float32 soft
labels with ``label_interpolation: linear``), the same scan at
the locator's coarse 6 mm spacing (``coarse.npy``), and ``meta.json`` (affines, the label's bounding-box centre and
the QC statistics the femur template needs). What is *not* stored is anything fold-dependent: the femur template is
built per fold from the training entries' coarse scans, and the ROI is cut from the memory-mapped volume when a
loader worker reads a subject, so one entry serves every fold, cohort, run, sweep trial and DDP rank.

Why memory-mapped ``.npy``. Reading a 64^3 ROI out of a memory-mapped volume touches ~1 MB of it, so resident memory
is bounded by the loader queues, not by the cohort; ``.npy`` needs no extra dependency, is read by every tool, and
works on any shared file system a cluster mounts. (Zarr or LitData chunks stream better from object storage; they can
replace :func:`write_entry` / :func:`read_roi` without touching the datamodule.)

Keys. An entry's folder name hashes the scan's and label's path, size and modification time with the preprocessing
settings and :data:`CACHE_VERSION`, so touching a scan or changing a setting invalidates exactly the affected entries.
Entries are written into a temporary folder and renamed into place, so a build killed at any point leaves nothing that
reads as valid; a build lock lets one process build while other ranks wait.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
from filelock import FileLock
from tqdm.auto import tqdm

from data_modules.errors import UserError, exception_line
from data_modules.localisation import (
    COARSE_SPACING,
    FemurLocator,
    box_center_mm,
    coarse,
    label_statistics,
    raw_statistics,
)
from data_modules.manifest import ManifestError, voxel_problems
from data_modules.roi import Box, label_coverage, read_box
from data_modules.scan_io import fingerprint, read_voxels
from data_modules.transforms import RoiCrop, windowed

#: bump when what an entry holds or how it is computed changes: every entry is rebuilt
CACHE_VERSION = 2


@dataclass(frozen=True)
class CacheSettings:
    """The preprocessing settings an entry depends on."""

    target_spacing: tuple[float, float, float] | None
    hu_window: tuple[float, float]
    coarse_spacing: float = COARSE_SPACING
    label_interpolation: str = "nearest"

    def digest(self) -> str:
        payload = json.dumps({"version": CACHE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


def entry_name(image: str, label: str | None, settings: CacheSettings) -> str:
    """The entry folder of one scan (and label) under one set of settings."""
    payload = json.dumps([fingerprint(image), fingerprint(label) if label else [None], settings.digest()])
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def write_entry(folder: Path, image: str, label: str | None, settings: CacheSettings, subject_id: str = "") -> list[str]:
    """Check every voxel of one scan and preprocess it into ``folder`` atomically (a temporary sibling folder renamed
    into place). Returns the voxel problems found (then nothing is written)."""
    sid = subject_id or image
    voxels = {}
    for kind, path in (("image", image), ("label", label)):
        try:
            voxels[kind] = read_voxels(path) if path else None
        except Exception as exc:  # noqa: BLE001 (nibabel, gzip and SimpleITK raise many types for a broken file)
            return [f"{sid}: {kind} {path} cannot be read to its end ({exception_line(exc)}); the file is "
                    "damaged or incomplete: copy or export it again"]
    problems = voxel_problems(sid, voxels["image"], voxels["label"])
    if problems:
        return problems
    subject = tio.Subject(image=tio.ScalarImage(image), **({"label": tio.LabelMap(label)} if label else {}))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        fine = windowed(settings.target_spacing, settings.hu_window, settings.label_interpolation)(subject)
        np.save(tmp / "image.npy", fine["image"].data[0].numpy().astype(np.float32))
        meta = {"image": image, "label": label, "affine": fine["image"].affine.tolist(),
                "minimum": float(fine["image"].data.min())}
        low = coarse(subject["image"], settings.hu_window, settings.coarse_spacing)
        np.save(tmp / "coarse.npy", low.data[0].numpy().astype(np.float32))
        meta["coarse_affine"] = low.affine.tolist()
        if label:
            on_grid = fine["label"].data[0].numpy()
            soft = settings.label_interpolation == "linear"
            np.save(tmp / "label.npy", on_grid.astype(np.float32) if soft else (on_grid > 0).astype(np.uint8))
            center = box_center_mm(subject["label"])
            meta["label_center_mm"] = center.tolist()
            meta["stats"] = {**raw_statistics(subject["image"], center, settings.coarse_spacing),
                             **label_statistics(subject["label"])}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, folder)  # atomic: the entry exists completely or not at all
        except OSError:  # another process finished the same entry first
            if not (folder / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return []


def single_threaded() -> None:
    """One thread each for torch and ITK (TorchIO's reading and resampling): a build worker owns one core."""
    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _build_one(job: tuple[str, str, str, str | None, CacheSettings]) -> list[str]:
    folder, subject_id, image, label, settings = job
    try:
        return write_entry(Path(folder), image, label, settings, subject_id)
    except UserError as exc:  # a scan the locator or preprocessing cannot use: one line, named
        return [f"{subject_id}: {image}: {line}" for line in exc.lines]
    except Exception as exc:  # name the scan instead of a deep SimpleITK/torch traceback
        raise RuntimeError(f"{subject_id}: preprocessing {image} failed ({exception_line(exc)})") from None


class PreprocessedCache:
    """Entries of one set of settings under ``root/<settings digest>/``."""

    def __init__(self, root: str | Path, settings: CacheSettings):
        self.settings = settings
        self.root = Path(root) / settings.digest()
        self._found: dict[str, dict] = {}  # locator digest -> entry name -> where its ROI lies (see locate)
        self._new: set[str] = set()

    def folder(self, image: str, label: str | None) -> Path:
        return self.root / entry_name(image, label, self.settings)

    def build(self, scans: Sequence[tuple[str, str, str | None]], workers: int | None = None,
              source: str | Path = "cohort") -> int:
        """Make sure every ``(subject_id, image, label)`` has an entry; returns how many were built. One process
        builds (with ``workers`` processes, default all cores) while others wait on the lock, then find everything in
        place. Scans whose voxels are unusable (NaN, a label that is not binary or is empty) get no entry: they are
        listed, one line per subject, in a :class:`~data_modules.manifest.ManifestError` of ``source``."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / ".build.lock")):
            jobs = [(str(self.folder(i, lbl)), sid, i, lbl, self.settings) for sid, i, lbl in scans
                    if not (self.folder(i, lbl) / "meta.json").is_file()]
            if not jobs:
                return 0
            workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
            problems: list[str] = []
            with tqdm(total=len(jobs), desc=f"preprocessing into {self.root}", unit="scan") as progress:
                if workers == 1:
                    results = (_build_one(job) for job in jobs)
                    for found in results:
                        problems += found
                        progress.update()
                else:
                    # spawned, single-threaded workers: forking a process whose torch thread pool is running can
                    # deadlock the children, and one torch and ITK thread per worker avoids oversubscribing the cores
                    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=single_threaded) as pool:
                        for found in pool.map(_build_one, jobs):
                            problems += found
                            progress.update()
            if problems:
                raise ManifestError(source, problems)
            return len(jobs)

    def meta(self, image: str, label: str | None) -> dict:
        return json.loads((self.folder(image, label) / "meta.json").read_text())

    def coarse(self, image: str, label: str | None) -> tio.ScalarImage:
        """The entry's 6 mm windowed scan (what the femur template is built from and matched against)."""
        folder = self.folder(image, label)
        meta = self.meta(image, label)
        data = torch.from_numpy(np.load(folder / "coarse.npy"))[None]
        return tio.ScalarImage(tensor=data, affine=np.array(meta["coarse_affine"]))

    def locator(self, scans: Iterable[tuple[str, str | None]], hu_window: Sequence[float],
                max_rotation: float = 0.0) -> FemurLocator:
        """The femur template of training scans, from their entries (no scan is read again)."""
        scans = list(scans)
        metas = [self.meta(i, lbl) for i, lbl in scans]
        return FemurLocator.from_coarse([self.coarse(i, lbl) for i, lbl in scans], [m["label_center_mm"] for m in metas],
                                        [m["stats"] for m in metas], hu_window, self.settings.coarse_spacing,
                                        max_rotation)

    def subject(self, image: str, label: str | None, roi_size: Sequence[int] | None, locator: FemurLocator | None = None,
                roi_center: Sequence[float] | None = None, **attributes: object) -> tio.Subject:
        """A subject whose ROI is read from the memory-mapped entry when a loader touches it: ``roi_size`` voxels
        centred where ``locator`` finds the femur, else at the ``roi_center`` fractions of the field of view (the
        whole volume when ``roi_size`` is ``None``). Records the ROI centre and how much of the label it holds
        (``label_in_roi``, ``label_cut``), exactly as :func:`~data_modules.transforms.preprocessing` does."""
        folder = self.folder(image, label)
        meta = self.meta(image, label)
        affine = np.array(meta["affine"])
        shape = np.load(folder / "image.npy", mmap_mode="r").shape
        if roi_size is None:
            box = Box(affine, tuple(int(n) for n in shape))
            center_mm = (affine @ np.append((np.asarray(shape) - 1) / 2.0, 1.0))[:3]
        else:
            center_mm, rotation, found = None, None, None
            if locator is not None:
                found = self.locate(locator, image, label)
                center_mm, rotation = np.asarray(found["center_mm"]), np.asarray(found["rotation"])
                attributes.update(locator_score=found["score"], roi_rotation=rotation)
            box = RoiCrop(roi_size, roi_center).box(affine, shape, center_mm, rotation)
            if center_mm is None:
                center_mm = (box.affine @ np.append(np.asarray(box.size) / 2.0, 1.0))[:3]
        images: dict[str, tio.Image] = {"image": tio.ScalarImage(
            folder / "image.npy", reader=RoiReader(affine, box, meta["minimum"]))}
        if label:
            coverage = (found or {}).setdefault("coverage", {})
            key = json.dumps([list(box.size), np.round(box.affine, 4).tolist()])
            if key not in coverage:  # reading the whole label: once per box, then from the locations file
                coverage[key] = list(label_coverage(np.load(folder / "label.npy", mmap_mode="r"), affine, box))
                if locator is not None:
                    self._new.add(locator.digest())
            attributes.update(label_in_roi=coverage[key][0], label_cut=coverage[key][1])
            nearest = self.settings.label_interpolation == "nearest"
            images["label"] = tio.LabelMap(folder / "label.npy", reader=RoiReader(affine, box, 0.0, nearest=nearest))
        return tio.Subject(**images, roi_center_mm=np.asarray(center_mm, float), **attributes)


    def locate(self, locator: FemurLocator, image: str, label: str | None) -> dict:
        """Where ``locator`` puts the ROI of an entry (centre, rotation, score; and label coverages once computed),
        read from ``locations/<locator digest>.json`` when any process found it before (every rank, trial and run of
        a fold shares its template), else found now and kept for :meth:`save_locations`."""
        digest = locator.digest()
        if digest not in self._found:
            path = self.root / "locations" / f"{digest}.json"
            self._found[digest] = json.loads(path.read_text()) if path.is_file() else {}
        table, name = self._found[digest], entry_name(image, label, self.settings)
        if name not in table:
            try:
                location = locator.locate_coarse(self.coarse(image, label))
            except UserError as exc:
                raise UserError(*(f"{image}: {line}" for line in exc.lines)) from None
            table[name] = {"center_mm": location.center_mm.tolist(), "rotation": location.rotation.tolist(),
                           "score": location.score}
            self._new.add(digest)
        return table[name]

    def save_locations(self) -> None:
        """Write the locations found since the last save (merged with what other processes wrote; atomic)."""
        folder = self.root / "locations"
        folder.mkdir(parents=True, exist_ok=True)
        for digest in sorted(self._new):
            path = folder / f"{digest}.json"
            with FileLock(str(path) + ".lock"):
                merged = json.loads(path.read_text()) if path.is_file() else {}
                for name, record in self._found[digest].items():
                    merged.setdefault(name, {}).update(record)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(merged))
                os.replace(tmp, path)
        self._new.clear()


class RoiReader:
    """A TorchIO reader that returns only a box of a memory-mapped ``.npy`` volume (``fill`` outside it) and the box's
    affine: the same voxels and affine as :class:`~data_modules.transforms.RoiCrop` cutting the whole volume."""

    def __init__(self, affine: np.ndarray, box: Box, fill: float, nearest: bool = False):
        self.affine, self.box, self.fill, self.nearest = affine, box, fill, nearest

    def __call__(self, path: str | Path) -> tuple[torch.Tensor, np.ndarray]:
        volume = np.load(path, mmap_mode="r")
        data = read_box(volume, self.affine, self.box, self.fill, self.nearest)
        return torch.from_numpy(data)[None], self.box.affine.copy()
