"""Reading scans whatever their format: NIfTI files, other ITK formats (NRRD, MHA) and DICOM series folders.

One place decides how a path is read, so the manifest check, the cache, predict and evaluate agree. NIfTI headers are
read by nibabel, with the spacing as stored (nibabel's loader turns a stored zero spacing into 1 mm); everything else
by SimpleITK, which TorchIO also uses to read the voxels. A folder is one DICOM series (what scanners and PACS
export): its slices are ordered by position and each slice's rescale slope and intercept applied, so voxels are in HU.
A DICOM header check reads the first and last slice only.
"""

from __future__ import annotations

import locale
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from torchio.data.io import get_ras_affine_from_sitk

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: LPS (DICOM, ITK) to RAS (NIfTI, TorchIO) world coordinates
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class ScanHeader:
    """What a scan's header says: the stored shape, the voxel-to-RAS-mm affine and the spacing as stored."""

    shape: tuple[int, ...]
    affine: np.ndarray
    spacing: tuple[float, float, float]


def is_nifti(path: str | Path) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def dicom_series(folder: str | Path) -> list[str]:
    """The files of the one DICOM series in ``folder``, ordered by slice position."""
    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise ValueError(f"{folder}: no DICOM series in this folder (expected the slices of one CT series)")
    if len(ids) > 1:
        raise ValueError(f"{folder}: {len(ids)} DICOM series in one folder; give the folder of one series")
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0]))


def _slice_info(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


def _dicom_header(folder: str | Path) -> ScanHeader:
    files = dicom_series(folder)
    first, last = _slice_info(files[0]), _slice_info(files[-1])
    direction = np.array(first.GetDirection(), float).reshape(3, 3)
    sx, sy = first.GetSpacing()[:2]
    origin0, origin1 = np.array(first.GetOrigin(), float), np.array(last.GetOrigin(), float)
    if len(files) > 1:
        step = (origin1 - origin0) / (len(files) - 1)
    else:
        step = direction[:, 2] * first.GetSpacing()[2]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = direction[:, 0] * sx, direction[:, 1] * sy, step, origin0
    size = first.GetSize()
    return ScanHeader((int(size[0]), int(size[1]), len(files)), LPS_TO_RAS @ lps,
                      (float(sx), float(sy), float(np.linalg.norm(step))))


def read_header(path: str | Path) -> ScanHeader:
    """The header of a NIfTI file, an ITK-readable file (NRRD, MHA) or a DICOM series folder, without the voxels."""
    if Path(path).is_dir():
        return _dicom_header(path)
    if is_nifti(path):
        image = nib.load(str(path))
        with nib.openers.ImageOpener(str(path)) as fileobj:
            stored = nib.Nifti1Header.from_fileobj(fileobj, check=False)["pixdim"][1:4]
        return ScanHeader(tuple(int(n) for n in image.shape), np.asarray(image.affine, float),
                          tuple(float(z) for z in stored))
    reader = _slice_info(str(path))
    return ScanHeader(tuple(int(n) for n in reader.GetSize()), get_ras_affine_from_sitk(reader),
                      tuple(float(s) for s in reader.GetSpacing()[:3]))


def read_voxels(path: str | Path) -> np.ndarray:
    """Every voxel of a scan, indexed (i, j, k) like nibabel and TorchIO index it (nibabel for NIfTI, whose values it
    keeps as stored: TorchIO's reader would hide NaNs)."""
    if is_nifti(path):
        return np.asanyarray(nib.load(str(path)).dataobj)
    if Path(path).is_dir():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(dicom_series(path))
        return sitk.GetArrayFromImage(reader.Execute()).transpose()
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).transpose()


def fingerprint(path: str | Path) -> list:
    """What identifies a scan's content cheaply: its resolved path, size and modification time (for a DICOM folder,
    the total over its files and the latest time), which the preprocessed cache keys on."""
    path = Path(path)
    if path.is_dir():
        stats = [os.stat(p) for p in sorted(path.iterdir()) if p.is_file()]
        return [str(path.resolve()), len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)]
    st = os.stat(path)
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def write_dicom_series(image: str | Path, folder: str | Path, slope: float = 1.0, intercept: float = -1024.0) -> Path:
    """Write a scan (any format SimpleITK reads) as a CT DICOM series, as scanners export them: int16 slices with
    rescale ``slope`` (an integer, as GDCM requires for integer pixels) and ``intercept`` tags, GDCM storing
    ``(HU - intercept) / slope``. For tests, and to hand synthetic scans to DICOM tools."""
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's DICOM writer resets the process locale to "C" (ASCII text I/O)
    try:
        return _write_dicom_series(image, Path(folder), slope, intercept)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_series(image: str | Path, folder: Path, slope: float, intercept: float) -> Path:
    volume = sitk.ReadImage(str(image), sitk.sitkFloat64)
    hu = np.clip(np.round(sitk.GetArrayFromImage(volume)), -32768, 32767).astype(np.int16)  # (z, y, x)
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.array(volume.GetDirection()).reshape(3, 3)
    study, series = "1.2.826.0.1.3680043.2.1125.1." + _uid_suffix(), "1.2.826.0.1.3680043.2.1125.2." + _uid_suffix()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(hu.shape[0]):
        plane = sitk.GetImageFromArray(hu[k][None])  # one slice as a 3D image of depth 1
        plane.SetSpacing(volume.GetSpacing())
        plane.SetDirection(volume.GetDirection())
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        plane.SetOrigin(position)
        tags = {
            "0008|0060": "CT", "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0020|000d": study, "0020|000e": series,
            "0008|0018": f"{series}.{k + 1}", "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in position),
            "0020|0037": "\\".join(f"{v:.6f}" for v in (*direction[:, 0], *direction[:, 1])),
            "0018|0050": f"{volume.GetSpacing()[2]:.6f}",
            "0028|1052": f"{intercept:g}", "0028|1053": f"{slope:g}", "0028|1054": "HU",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:04d}.dcm"))
        writer.Execute(plane)
    return folder


def _uid_suffix() -> str:
    return str(int.from_bytes(os.urandom(8), "big"))
