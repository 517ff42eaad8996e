"""The paper's splits: a stratified held-out test set plus stratified k-fold cross-validation.

10% of the subjects (stratified by sex, or any manifest columns) are held out as a test set, and
``StratifiedKFold`` splits the remaining 90% into ten folds. Splits are written once to JSON and
reused, so every model and every run of a fold sees the same subjects. The ``folds`` entry has
nnU-Net's ``splits_final.json`` shape (a list of ``{"train": [...], "val": [...]}``).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import pandas as pd
from filelock import FileLock
from sklearn.model_selection import StratifiedKFold, train_test_split

SPLITS_VERSION = 1


def strata_key(table: pd.DataFrame, strata: list[str]) -> pd.Series:
    """One label per subject combining the stratification columns (e.g. ``"F"`` or ``"F|site2"``)."""
    missing = [c for c in strata if c not in table.columns]
    if missing:
        raise ValueError(f"stratification columns not in the manifest: {missing}")
    if not strata:
        return pd.Series(["all"] * len(table), index=table.index)
    return table[strata].astype(str).agg("|".join, axis=1)


def make_splits(
    table: pd.DataFrame,
    n_folds: int = 10,
    test_fraction: float = 0.1,
    seed: int = 0,
    strata: list[str] | None = None,
) -> dict:
    """Split subjects into a stratified test set and ``n_folds`` stratified CV folds."""
    strata = ["sex"] if strata is None else list(strata)
    ids = table["subject_id"].astype(str).tolist()
    key = strata_key(table, strata).tolist()
    n_test = int(round(len(ids) * test_fraction))
    if n_test > 0:
        counts = pd.Series(key).value_counts()
        stratify = key if counts.min() >= 2 and n_test >= len(counts) else None
        dev_ids, test_ids, dev_key, _ = train_test_split(
            ids, key, test_size=n_test, random_state=seed, stratify=stratify
        )
    else:
        dev_ids, test_ids, dev_key = ids, [], key
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if len(dev_ids) < n_folds:
        raise ValueError(
            f"{len(dev_ids)} subjects remain after holding out the test set, too few for {n_folds} folds; "
            "use fewer folds or a larger cohort"
        )
    skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # a stratum smaller than n_folds is spread as evenly as it can be; that is expected for rare strata
        warnings.filterwarnings("ignore", message="The least populated class")
        fold_indices = list(skf.split(dev_ids, dev_key))
    folds = []
    for train_idx, val_idx in fold_indices:
        folds.append({
            "train": sorted(dev_ids[i] for i in train_idx),
            "val": sorted(dev_ids[i] for i in val_idx),
        })
    by_id = dict(zip(ids, key))
    return {
        "version": SPLITS_VERSION,
        "seed": seed,
        "strata": strata,
        "n_folds": n_folds,
        "test_fraction": test_fraction,
        "subjects_sha256": subjects_digest(ids),
        "test": sorted(test_ids),
        "folds": folds,
        "counts": {
            "test": pd.Series([by_id[i] for i in test_ids], dtype=str).value_counts().to_dict(),
            "folds": [pd.Series([by_id[i] for i in f["val"]]).value_counts().to_dict() for f in folds],
        },
    }


def subjects_digest(ids: list[str]) -> str:
    """A short hash of a set of subject ids, to detect a manifest that changed under saved splits."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def load_or_create_splits(
    path: str | Path,
    table: pd.DataFrame,
    n_folds: int = 10,
    test_fraction: float = 0.1,
    seed: int = 0,
    strata: list[str] | None = None,
) -> dict:
    """Reuse the splits at ``path`` if they match this cohort, else create and write them.

    Concurrent runs (sweep workers, jobs of an array) race to create the same file: a lock next to it makes
    exactly one of them write it and the others read the finished file. Existing splits are read without the
    lock (writes are atomic), so a read-only splits folder made by a collaborator works.
    """
    path = Path(path)
    ids = table["subject_id"].astype(str).tolist()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.is_file():
                splits = make_splits(table, n_folds=n_folds, test_fraction=test_fraction, seed=seed, strata=strata)
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(splits, indent=2))
                tmp.replace(path)  # atomic: a reader without the lock never sees half a file
                return splits
    splits = json.loads(path.read_text())
    if splits.get("subjects_sha256") != subjects_digest(ids):
        raise ValueError(
            f"{path}: saved splits were made for a different set of subjects than this manifest; "
            "delete the file or set data.splits_dir elsewhere to make new ones"
        )
    if splits.get("n_folds") != n_folds:
        raise ValueError(f"{path}: saved splits have {splits.get('n_folds')} folds, config asks for {n_folds}")
    return splits


def fold_subjects(splits: dict, fold: int) -> dict[str, list[str]]:
    """The train / val / test subject ids of one fold."""
    n = len(splits["folds"])
    if not 0 <= fold < n:
        raise ValueError(f"fold must be in 0..{n - 1}, got {fold}")
    return {"train": splits["folds"][fold]["train"], "val": splits["folds"][fold]["val"], "test": splits["test"]}
