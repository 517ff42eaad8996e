"""A cohort and its folds: the validated manifest rows of one sub-cohort and the stratified splits made of them.

The splits file is written once per (manifest, cohort, split protocol) under ``splits_dir`` and reused by every fold,
run, trial and rank (:func:`data_modules.folds.load_or_create_splits`); the datamodule reads subjects through here, so
which subjects a fold trains, validates and tests on is decided in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torchio as tio

from data_modules.folds import (
    fold_subjects,
    key_digest,
    load_or_create_splits,
    splits_key,
)
from data_modules.manifest import ManifestError, filter_cohort, validate_manifest


@dataclass
class CohortSplits:
    """The rows of ``cohort`` in ``manifest`` and their folds (read and split on first use)."""

    manifest: Path
    cohort: str = "all"
    n_folds: int = 10
    test_fraction: float = 0.1
    seed: int = 0
    strata: list[str] = field(default_factory=lambda: ["sex"])
    splits_dir: Path = Path("runs/splits")
    voxels: bool = True  # check voxel content on reading (False when the cache build checks it once per scan)
    _table: pd.DataFrame | None = field(default=None, init=False, repr=False)
    _splits: dict | None = field(default=None, init=False, repr=False)

    def path(self, table: pd.DataFrame) -> Path:
        """Where these splits live: one file per manifest and splits key (subjects, cohort, protocol)."""
        key = splits_key(table, self.n_folds, self.test_fraction, self.seed, self.strata, self.cohort)
        stem = self.manifest.resolve().parent.name + "_" + self.manifest.stem
        return self.splits_dir / f"{stem}_{self.cohort}_k{self.n_folds}_seed{self.seed}_{key_digest(key)}.json"

    def _load(self) -> None:
        if self._table is not None:
            return
        table = filter_cohort(validate_manifest(self.manifest, voxels=self.voxels), self.cohort)
        if table.empty:
            raise ManifestError(self.manifest, [f"no subjects in cohort '{self.cohort}' (column 'sex' holds "
                                                "M for male, F for female); choose another --data.cohort"])
        problems = strata_problems(table, self.strata)
        if problems:
            raise ManifestError(self.manifest, problems)
        self._splits = load_or_create_splits(self.path(table), table, n_folds=self.n_folds,
                                             test_fraction=self.test_fraction, seed=self.seed, strata=self.strata,
                                             cohort=self.cohort)
        self._table = table

    @property
    def table(self) -> pd.DataFrame:
        """The cohort's validated manifest rows."""
        self._load()
        assert self._table is not None
        return self._table

    @property
    def splits(self) -> dict:
        """The splits file's content: ``folds`` (train/val ids each), ``test`` and the splits ``key``."""
        self._load()
        assert self._splits is not None
        return self._splits

    def subject_ids(self, fold: int, split: str) -> list[str]:
        """Subject ids of ``train``, ``val`` or ``test`` of one fold."""
        return fold_subjects(self.splits, fold)[split]

    def rows(self, fold: int, split: str) -> pd.DataFrame:
        """The manifest rows of one fold's split."""
        return self.table[self.table["subject_id"].isin(set(self.subject_ids(fold, split)))]

    def save(self, folder: str | Path, fold: int) -> Path:
        """Copy the splits (plus the fold, cohort and absolute manifest path) into a run folder as ``splits.json``:
        the run's own record of its subjects, which evaluate and compare read."""
        out = Path(folder) / "splits.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = dict(self.splits, fold=fold, cohort=self.cohort, manifest=str(self.manifest.resolve()))
        out.write_text(json.dumps(payload, indent=2))
        return out


def raw_subject(row: pd.Series) -> tio.Subject:
    """A TorchIO subject (scan, label when present, id, sex) of one manifest row, not yet read or preprocessed."""
    fields: dict[str, object] = {"image": tio.ScalarImage(row["image"]), "subject_id": row["subject_id"],
                                 "sex": row["sex"]}
    if row["label"] is not None:
        fields["label"] = tio.LabelMap(row["label"])
    return tio.Subject(**fields)


def strata_problems(table: pd.DataFrame, strata: list[str]) -> list[str]:
    """One line per stratification column the manifest lacks, and per subject with no value in one it has."""
    missing = [c for c in strata if c not in table.columns]
    if missing:
        return [f"no column {', '.join(map(repr, missing))} for --data.strata {list(strata)} (its columns: "
                f"{', '.join(table.columns)}); add the column or stratify by others ([] for none)"]
    return [f"{row.subject_id}: no value in column '{c}' (a --data.strata column); fill it in or stratify by others"
            for c in strata for row in table[table[c].isna()].itertuples()]
