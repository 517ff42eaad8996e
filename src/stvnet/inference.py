"""Inference: a checkpoint alone segments a scan in its own grid.

The checkpoint carries the network (with its shape prior) and the datamodule's hyperparameters, so the
exact training preprocessing (orientation, HU window, spacing, ROI) is rebuilt from it. Probabilities are
computed on the preprocessed ROI (by sliding window with TorchIO's ``GridSampler``/``GridAggregator`` when
the volume is larger than the network's input), then resampled into the input scan's own voxel grid and
thresholded, so the mask lines up with the scan whatever its orientation and spacing.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchio as tio
from scipy import ndimage

from data_modules.errors import MissingInput, UserError, exception_line
from data_modules.localisation import FemurLocator, Location
from data_modules.transforms import preprocessing, to_scan_grid
from stvnet.lightning_module import FemurSegmenter
from stvnet.stages import checkpoint_stage


Scan = str | Path | tio.ScalarImage  # a scan's path, or the scan already read (once, by the caller)
Locations = dict[str, Location]  # template digest -> where that template found the femur in one scan


def read_scan(scan: Scan) -> tio.ScalarImage:
    """The scan in memory: read from its path once, or as given."""
    image = scan if isinstance(scan, tio.ScalarImage) else tio.ScalarImage(scan)
    image.load()
    return image


def scan_image(voxels: np.ndarray, affine: np.ndarray) -> tio.ScalarImage:
    """A scan already read (voxels indexed i, j, k; its RAS affine) as the image inference takes."""
    return tio.ScalarImage(tensor=torch.from_numpy(np.asarray(voxels, np.float32).copy())[None], affine=affine)


def mirrored(image: tio.ScalarImage) -> tio.ScalarImage:
    """The scan mirrored left-right in world space, in memory (same voxels, x negated in the affine): its right
    femur is where a left femur would be, so a left-femur checkpoint segments it; a mask's voxels map back one to
    one."""
    return tio.ScalarImage(tensor=image.data, affine=np.diag([-1.0, 1.0, 1.0, 1.0]) @ image.affine)


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself: when it was written and on which data it was trained."""

    path: Path
    epoch: int
    stage: str  # stage name ('single' for a run without a stage schedule)
    final_stage: bool  # written in the last stage of its schedule (always true without one)
    data_hparams: dict[str, Any]
    split: dict[str, Any] | None  # splits key, fold and subjects (FemurDataModule record)
    locator: FemurLocator | None  # where the ROI goes in a new scan (None: a fixed fraction of the field of view)


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Read a ``stvnet train`` checkpoint's epoch, stage and data record (without building the model; memory-mapped,
    so the weights are not read). Read once per file and command: finding a run's checkpoint, describing the run and
    building its predictor share the read (a rewritten file is read again)."""
    stat = Path(path).stat() if Path(path).is_file() else None
    return _read_checkpoint_info(Path(path), stat.st_mtime_ns if stat else None, stat.st_size if stat else None)


@functools.lru_cache(maxsize=256)
def _read_checkpoint_info(path: Path, mtime_ns: int | None, size: int | None) -> CheckpointInfo:
    ckpt = load_checkpoint(path)
    stage, n_stages = checkpoint_stage(ckpt)
    final = n_stages is None or stage.get("index") == n_stages - 1
    record = ckpt.get("FemurDataModule")
    locator = FemurLocator.from_state_dict(record["locator"]) if record and record.get("locator") else None
    return CheckpointInfo(path, int(ckpt.get("epoch", -1)), str(stage.get("name", "single")), final,
                          dict(ckpt.get("datamodule_hyper_parameters") or {}), record, locator)


#: what torch.load and Lightning raise for a file that is not a checkpoint they can read (truncated, another format)
UNREADABLE = (RuntimeError, EOFError, OSError, KeyError, TypeError, ValueError, AttributeError, pickle.UnpicklingError)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint's dictionary (memory-mapped: the weights are not read; ``weights_only``: nothing is unpickled but
    tensors and plain containers, which is all stvnet writes), or one line saying why it is unusable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except UNREADABLE as exc:
        raise UserError(f"{path}: not a readable checkpoint ({exception_line(exc)}); give a .ckpt "
                        "written by stvnet train, or its run folder") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path}: not a Lightning checkpoint (no state_dict); give a .ckpt written by stvnet train")
    return ckpt


def find_checkpoint(run: str | Path) -> Path:
    """The checkpoint that stands for a run folder (the path itself if a file).

    Policy, the same for evaluate, compare and predict: the best validation Dice among the epochs of the run's
    *final* stage (``best-*.ckpt``, see :class:`~stvnet.callbacks.FinalStageCheckpoint`), so an ST-V-Net is never
    judged by a stage-1 checkpoint (a plain V-Net); else ``last.ckpt`` (e.g. a run that ended before its last stage).
    """
    run = Path(run)
    if run.is_file():
        return run
    if not run.exists():
        raise MissingInput(f"{run}: no such run folder or checkpoint; give a folder written by stvnet train "
                           "(runs/<name>/<cohort>/fold<k>/<time>) or a .ckpt file")
    folder = run / "checkpoints"
    best = [p for p in sorted(folder.glob("best-*.ckpt")) if read_checkpoint_info(p).final_stage]
    if best:
        return best[-1]
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    raise MissingInput(f"{run}: no checkpoint found (expected {folder}/best-*.ckpt or last.ckpt); give a run folder "
                       "written by stvnet train, or a .ckpt file")


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Predictor:
    """A trained model plus the preprocessing it was trained with."""

    model: FemurSegmenter
    data_hparams: dict[str, Any]
    locator: FemurLocator | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    overlap: int = 8

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto") -> "Predictor":
        """Load a model and its preprocessing from a Lightning checkpoint written by ``stvnet train``."""
        path = Path(path)
        dev = pick_device(device)
        info = read_checkpoint_info(path)  # one line if the file is no checkpoint at all
        if info.data_hparams.get("roi_locator", "fraction") == "template" and info.locator is None:
            raise UserError(f"{path}: trained with --data.roi_locator template but holds no femur template; "
                            "retrain it with this version of stvnet train")
        try:
            model = FemurSegmenter.load_from_checkpoint(path, map_location=dev)
        except UNREADABLE as exc:  # e.g. another model's checkpoint
            raise UserError(f"{path}: not a checkpoint of a stvnet model ({exception_line(exc)}); "
                            "give a .ckpt written by stvnet train") from exc
        model.eval().to(dev)
        return cls(model=model, data_hparams=info.data_hparams, locator=info.locator, device=dev)

    @property
    def transform(self) -> tio.Compose:
        h = self.data_hparams
        if "roi_size" not in h:
            raise ValueError("the checkpoint records no preprocessing (train it with a FemurDataModule, e.g. via stvnet train)")
        locator = self.locator if h.get("roi_locator", "fraction") == "template" else None
        return preprocessing(h["target_spacing"], h["roi_size"], h["roi_center"], h["hu_window"], locator,
                             h.get("label_interpolation", "nearest"))

    @property
    def threshold(self) -> float:
        """The probability above which the model calls a voxel femur."""
        return float(self.model.threshold)

    @property
    def patch_size(self) -> tuple[int, int, int] | None:
        """The network input size used in training (patch or ROI), for sliding-window inference."""
        h = self.data_hparams
        size = h.get("patch_size") or h.get("roi_size")
        return tuple(int(s) for s in size) if size else None

    def preprocess(self, image: tio.ScalarImage, label: str | Path | None = None,
                   locations: Locations | None = None) -> tio.Subject:
        """The scan (and its label) through the checkpoint's preprocessing. With ``locations``, the femur search is
        shared: a template that already searched this scan (an ensemble's checkpoints of one fold, QC after
        prediction) reuses what it found, and a new search is added to it."""
        subject = tio.Subject(image=image, **({"label": tio.LabelMap(label)} if label is not None else {}))
        h = self.data_hparams
        locator = self.locator if h.get("roi_locator", "fraction") == "template" else None
        if locator is None or locations is None or h.get("roi_size") is None:
            return self.transform(subject)
        found = locations.get(locator.digest())
        if found is None:
            found = locations[locator.digest()] = locator.locate(image)
        subject = tio.Subject(**dict(subject), roi_center_mm=found.center_mm, roi_rotation=found.rotation,
                              locator_score=found.score)
        return preprocessing(h["target_spacing"], h["roi_size"], h["roi_center"], h["hu_window"], None,
                             h.get("label_interpolation", "nearest"))(subject)

    def probabilities(self, image: tio.ScalarImage, locations: Locations | None = None) -> tio.ScalarImage:
        """Femur probabilities on the preprocessed grid of ``image`` (a float image with that grid's affine)."""
        return self.grid_probabilities(self.preprocess(image, locations=locations))

    @torch.inference_mode()
    def grid_probabilities(self, subject: tio.Subject) -> tio.ScalarImage:
        """Femur probabilities of a subject already preprocessed by :attr:`transform`, on its grid."""
        data = subject["image"].data.float()
        patch = self.patch_size
        if patch is None or all(s <= p for s, p in zip(data.shape[1:], patch)):
            prob = self.model.predict_proba(data[None].to(self.device))[0].cpu()
        else:
            sampler = tio.GridSampler(subject, patch, patch_overlap=self.overlap)
            aggregator = tio.GridAggregator(sampler, overlap_mode="hann")
            loader = tio.SubjectsLoader(sampler, batch_size=1)
            for batch in loader:
                x = batch["image"][tio.DATA].float().to(self.device)
                aggregator.add_batch(self.model.predict_proba(x).cpu(), batch[tio.LOCATION])
            prob = aggregator.get_output_tensor()
        return tio.ScalarImage(tensor=prob.float(), affine=subject["image"].affine)

    def original_probabilities(self, scan: Scan, locations: Locations | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Femur probabilities resampled (linearly) into the input scan's own grid, and that grid's affine."""
        original = read_scan(scan)
        return to_scan_grid(self.probabilities(original, locations), original), original.affine

    def with_ceiling(self, image_path: str | Path, label_path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The femur probabilities of a labelled scan in its own grid, beside its label carried through the same
        preprocessing and back the same way (:mod:`stvnet.ceiling`: what a perfect network would output), and the
        grid's affine. The scan is preprocessed (and the femur located) once for both."""
        original = read_scan(image_path)
        subject = self.preprocess(original, label_path)
        prob = to_scan_grid(self.grid_probabilities(subject), original)
        return prob, to_scan_grid(subject["label"], original), original.affine

    def segment(self, scan: Scan, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Binary mask (uint8) in the input scan's own grid, and that grid's affine."""
        prob, affine = self.original_probabilities(scan)
        thr = self.threshold if threshold is None else threshold
        return (prob > thr).astype(np.uint8), affine


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected component of a binary mask (removes stray islands)."""
    labels, n = ndimage.label(mask > 0, structure=np.ones((3, 3, 3), bool))
    if n <= 1:
        return (mask > 0).astype(np.uint8)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels == sizes.argmax()).astype(np.uint8)


def ensemble_probabilities(predictors: list[Predictor], scan: Scan,
                           locations: Locations | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean femur probability of several models (e.g. all folds) in the scan's own grid, and that grid's affine.
    Give the scan read (:func:`read_scan`) to read it once for all; ``locations`` collects each template's search."""
    if not predictors:
        raise ValueError("an ensemble needs at least one checkpoint")
    total, affine = None, None
    locations = {} if locations is None else locations
    for predictor in predictors:
        prob, affine = predictor.original_probabilities(scan, locations)
        total = prob if total is None else total + prob
    assert total is not None and affine is not None
    return total / len(predictors), affine


def ensemble_segment(predictors: list[Predictor], scan: Scan, threshold: float = 0.5, keep_largest: bool = False,
                     locations: Locations | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Threshold the ensemble's mean probability in the scan's grid (optionally keeping the largest component)."""
    prob, affine = ensemble_probabilities(predictors, scan, locations)
    mask = (prob > threshold).astype(np.uint8)
    return (largest_component(mask) if keep_largest else mask), affine
