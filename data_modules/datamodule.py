"""TorchIO LightningDataModule: manifest -> validated cohort -> stratified folds (:mod:`data_modules.cohort`) ->
loaders.

Training uses whole ROIs (``patch_size: null``) or patches drawn through ``tio.Queue``; validation and test run on
whole ROIs, one subject per batch. With ``cache: true`` each scan is preprocessed once into the persistent on-disk
cache (:mod:`data_modules.cache`) and loader workers read its ROI lazily, so augmentation is the only per-epoch cost.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import lightning as L
import pandas as pd
import torch
import torchio as tio
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from data_modules.cache import CacheSettings, PreprocessedCache
from data_modules.cohort import CohortSplits, raw_subject
from data_modules.folds import split_record
from data_modules.localisation import FemurLocator
from data_modules.options import check_options
from data_modules.roi import ROI_CENTER_FRACTION, refuse_cut_labels
from data_modules.shape_prior import build_shape_prior
from data_modules.synthetic import DEFAULT_COHORT_DIR, default_manifest
from data_modules.transforms import augmentation, preprocessing, sampler

def loader_workers(requested: int, ranks_per_node: int = 1) -> int:
    """Loader worker processes for one rank: ``requested``, but no more than the CPUs this process may run on (its
    affinity: what SLURM's ``--cpus-per-task`` or a container grants) shared among the node's ranks. More workers than
    cores only time-slice them, and the first batch waits for all of them (``stvnet bench --sections data``)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(requested, max(1, cpus // max(1, ranks_per_node)))


def manifest_in_use(manifest: str | Path | None, synthetic_dir: str | Path = DEFAULT_COHORT_DIR) -> Path:
    """The manifest a run reads: the one given, else the synthetic cohort's under ``synthetic_dir``."""
    return Path(manifest) if manifest else Path(synthetic_dir) / "manifest.csv"


class FemurDataModule(L.LightningDataModule):
    """Stratified folds of a QCT femur cohort as TorchIO datasets.

    Args:
        manifest: cohort CSV (``subject_id,image,label,sex,...``); ``None`` uses the synthetic cohort,
            generated under ``synthetic_dir`` on first use.
        cohort: ``all``, ``male`` or ``female``; splits are made within that sub-cohort.
        fold: which of the ``n_folds`` cross-validation folds to train on.
        n_folds, test_fraction, split_seed, strata: the split protocol (paper: 10 folds, 10% test, by sex).
        splits_dir: where split JSON files are written once and reused by every run.
        target_spacing: resampling spacing in mm (``None`` keeps each scan's own).
        roi_size: ROI box in voxels after resampling (``None``: whole volume).
        roi_locator: ``template`` centres the ROI where :mod:`data_modules.localisation` finds the femur (a
            template built from this fold's training scans, stored in checkpoints); ``fraction`` puts it at
            ``roi_center`` of every scan's field of view (the paper's fixed box).
        roi_center: ROI centre as fractions of the canonical field of view (``None``: centre), for ``fraction``.
        roi_max_rotation: with ``template``, the patient's pose is searched within this many degrees about each
            axis and the ROI box turned with it, so every ROI shows the femur in the training pose (0: axis-aligned).
        hu_window: HU range clamped and scaled to [0, 1].
        label_interpolation: how labels reach the ROI grid: ``nearest`` (binary targets, jagged at a coarse spacing) or
            ``linear`` (soft targets: each voxel's share of femur, which keeps the sub-voxel boundary; validation
            thresholds them at 0.5).
        batch_size, num_workers: loader settings for training.
        augment: augmentation strength (0 disables it).
        patch_size: train on patches of this size through ``tio.Queue`` (``None``: whole ROIs).
        patch_sampler, samples_per_volume, queue_length: queue settings for patch training.
        cache: preprocess each scan once into the persistent cache under ``cache_dir`` (shared by every fold, run,
            trial and rank; see :mod:`data_modules.cache`) and read ROIs from it lazily in the loader workers;
            ``false`` preprocesses every scan on every access.
        cache_dir: the persistent cache's folder.
        preprocess_workers: processes that build the cache (``None``: all cores).
        synthetic_dir, synthetic_subjects, synthetic_seed: the default cohort's location and size.
    """

    def __init__(
        self,
        manifest: str | None = None,
        cohort: str = "all",
        fold: int = 0,
        n_folds: int = 10,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        strata: list[str] | None = None,
        splits_dir: str = "runs/splits",
        target_spacing: tuple[float, float, float] | None = (2.3, 2.3, 2.3),
        roi_size: tuple[int, int, int] | None = (64, 64, 64),
        roi_locator: str = "template",
        roi_center: tuple[float, float, float] | None = ROI_CENTER_FRACTION,
        roi_max_rotation: float = 20.0,
        hu_window: tuple[float, float] = (-200.0, 1800.0),
        label_interpolation: str = "linear",
        batch_size: int = 2,
        num_workers: int = 2,
        augment: float = 1.0,
        patch_size: tuple[int, int, int] | None = None,
        patch_sampler: str = "label",
        samples_per_volume: int = 4,
        queue_length: int = 32,
        cache: bool = True,
        cache_dir: str = "data/cache",
        preprocess_workers: int | None = None,
        synthetic_dir: str = DEFAULT_COHORT_DIR,
        synthetic_subjects: int = 40,
        synthetic_seed: int = 0,
    ):  # pragma: no mutate block (save_hyperparameters reads this frame's arguments; a mutmut trampoline hides them)
        super().__init__()
        self.save_hyperparameters()
        check_options(dict(self.hparams))  # every unusable option named at once, before any scan is read
        self.manifest = manifest
        self.cohort = cohort
        self.fold = fold
        self.n_folds = n_folds
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.patch_size = patch_size
        self.store = PreprocessedCache(cache_dir, CacheSettings(
            tuple(float(v) for v in target_spacing) if target_spacing else None,
            (float(hu_window[0]), float(hu_window[1])), label_interpolation=label_interpolation)) if cache else None
        # with the cache, voxels are checked once per scan when its entry is built
        self.folds = CohortSplits(self.manifest_path, cohort, n_folds, test_fraction, split_seed,
                                  list(strata) if strata is not None else ["sex"], Path(splits_dir),
                                  voxels=not cache)
        self.roi_locator = roi_locator
        self._locator: FemurLocator | None = None
        self._preprocess: tio.Compose | None = None
        self.augment = augmentation(augment, label_interpolation)
        self._subjects: dict[str, list[tio.Subject]] = {}

    # ------------------------------------------------------------------ cohort and splits
    @property
    def manifest_path(self) -> Path:
        """The manifest in use (the synthetic cohort's when none was given)."""
        return manifest_in_use(self.manifest, self.hparams.synthetic_dir)

    @property
    def table(self) -> pd.DataFrame:
        """The cohort's validated manifest rows."""
        return self.folds.table

    def prepare_data(self) -> None:
        """Generate the synthetic cohort if needed, validate the manifest, write the splits and build the
        preprocessed cache (local rank 0; the other ranks wait)."""
        if not self.manifest:
            default_manifest(self.hparams.synthetic_dir, self.hparams.synthetic_subjects, self.hparams.synthetic_seed)
        self._build_cache()

    def _build_cache(self) -> None:
        if self.store is not None:
            table = self.folds.table
            self.store.build(list(zip(table["subject_id"], table["image"], table["label"])),
                             self.hparams.preprocess_workers, source=self.manifest_path)

    def subject_ids(self, split: str) -> list[str]:
        """Subject ids of ``train``, ``val`` or ``test`` for the configured fold."""
        return self.folds.subject_ids(self.fold, split)

    # ------------------------------------------------------------------ localisation and preprocessing
    @property
    def locator(self) -> FemurLocator | None:
        """The femur template of this fold (built from its training scans on first use; ``None`` for ``fraction``)."""
        if self.roi_locator != "template" or self.hparams.roi_size is None:
            return None
        if self._locator is None:
            train = self.folds.rows(self.fold, "train")
            if self.store is not None:
                self._build_cache()
                self._locator = self.store.locator(zip(train["image"], train["label"]), self.hparams.hu_window,
                                                   self.hparams.roi_max_rotation)
            else:
                self._locator = FemurLocator.build((raw_subject(row) for _, row in train.iterrows()),
                                                   self.hparams.hu_window, max_rotation=self.hparams.roi_max_rotation)
        return self._locator

    @property
    def preprocess(self) -> tio.Compose:
        """Deterministic preprocessing of this fold (the same in training, evaluation and predict)."""
        if self._preprocess is None:
            h = self.hparams
            self._preprocess = preprocessing(h.target_spacing, h.roi_size, h.roi_center, h.hu_window, self.locator,
                                             h.label_interpolation)
        return self._preprocess

    # ------------------------------------------------------------------ subjects
    def subjects(self, split: str) -> list[tio.Subject]:
        """Subjects of a split: with the cache, preprocessed subjects whose ROI a loader reads from the memory-mapped
        cache when it needs it (nothing is held in memory); without, raw subjects that loaders preprocess."""
        if split not in self._subjects:
            rows = self.folds.rows(self.fold, split)
            if self.store is None:
                self._subjects[split] = [raw_subject(row) for _, row in rows.iterrows()]
            else:
                self._build_cache()
                h = self.hparams
                self._subjects[split] = [
                    self.store.subject(row["image"], row["label"], h.roi_size, locator=self.locator,
                                       roi_center=h.roi_center, subject_id=row["subject_id"], sex=row["sex"])
                    for _, row in rows.iterrows()]
                self.store.save_locations()  # the next rank, trial or run of this fold reads them
        return self._subjects[split]

    def _dataset(self, split: str, train: bool) -> tio.SubjectsDataset:
        steps = [] if self.store is not None else [self.preprocess]
        if train and self.augment is not None:
            steps.append(self.augment)
        transform = tio.Compose(steps) if steps else None
        return tio.SubjectsDataset(self.subjects(split), transform=transform)

    def setup(self, stage: str | None = None) -> None:
        if stage == "fit":
            for split in ("train", "val"):
                subjects = self.subjects(split)
                refuse_cut_labels(subjects if self.store is not None else [self.preprocess(s) for s in subjects],
                                  self.roi_locator)

    # ------------------------------------------------------------------ loaders
    @property
    def loader_workers(self) -> int:
        """The training loader's worker processes: ``num_workers`` capped at this rank's share of the CPUs."""
        workers = loader_workers(self.num_workers, self.trainer.num_devices if self.trainer is not None else 1)
        if workers < self.num_workers:
            rank_zero_warn(f"--data.num_workers {self.num_workers}: this rank has {workers} CPU(s) to itself; using "
                           f"{workers} loader worker(s) (more only time-slice the cores and delay the first batch)")
        return workers

    def train_dataloader(self) -> DataLoader:
        dataset = self._dataset("train", train=True)
        workers = self.loader_workers
        if self.patch_size is None:
            return tio.SubjectsLoader(
                dataset, batch_size=self.batch_size, shuffle=True, num_workers=workers,
                # fresh workers each epoch take their seeds from the per-epoch seeded main process (EpochSeed),
                # so a resumed run draws the same augmentations as the uninterrupted one
                drop_last=len(dataset) > self.batch_size, persistent_workers=False,
            )
        queue = tio.Queue(
            dataset, max_length=self.hparams.queue_length, samples_per_volume=self.hparams.samples_per_volume,
            sampler=sampler(self.hparams.patch_sampler, self.patch_size), num_workers=workers,
        )
        return tio.SubjectsLoader(queue, batch_size=self.batch_size, num_workers=0)

    def _eval_loader(self, split: str) -> DataLoader:
        return tio.SubjectsLoader(self._dataset(split, train=False), batch_size=1, shuffle=False, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # ------------------------------------------------------------------ shape prior and records
    def shape_prior(self, alignment: str = "roi") -> torch.Tensor:
        """Mean femur mask of this fold's *training* subjects in the ROI frame (never val/test labels)."""
        subjects = self.subjects("train")
        # copies: reading a cached subject's label must not keep it in this process's memory
        prepared = [copy.deepcopy(s) for s in subjects] if self.store is not None else [self.preprocess(s) for s in subjects]
        return build_shape_prior([s["label"].data[0] for s in prepared], alignment=alignment)

    def save_splits(self, folder: str | Path) -> Path:
        """The run's own ``splits.json`` (see :meth:`CohortSplits.save`)."""
        return self.folds.save(folder, self.fold)

    # ------------------------------------------------------------------ checkpoint record
    def state_dict(self) -> dict:
        """Saved in every checkpoint: the splits key, fold and subjects the network was trained and validated on, and
        the femur locator (so a checkpoint alone places the ROI in a new scan)."""
        record = split_record(self.folds.splits, self.fold)
        if self.locator is not None:
            record["locator"] = self.locator.state_dict()
        return record

    def load_state_dict(self, state_dict: dict) -> None:
        """A resumed run must go on with the subjects it started with."""
        if state_dict.get("subjects") and split_record(self.folds.splits, self.fold) != {k: v for k, v in state_dict.items()
                                                                                   if k != "locator"}:
            raise ValueError("the checkpoint was trained on other subjects than this configuration selects (another "
                             "fold, cohort, manifest or split protocol): resume with the run's own config.yaml")
