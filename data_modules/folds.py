"""The paper's splits: a stratified held-out test set plus stratified k-fold cross-validation.

10% of the subjects (stratified by sex, or any manifest columns) are held out as a test set, and
``StratifiedKFold`` splits the remaining 90% into ten folds. Splits are written once to JSON and
reused, so every model and every run of a fold sees the same subjects. The ``folds`` entry has
nnU-Net's ``splits_final.json`` shape (a list of ``{"train": [...], "val": [...]}``).

Splits are a function of their *key*: the subjects with their stratification values (not the manifest's row order),
the cohort, ``n_folds``, ``test_fraction``, ``strata`` and ``seed``. The key is stored in the file and checked on
every read, so saved splits are never reused for another protocol.
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

from data_modules.errors import InvalidInput

SPLITS_VERSION = 2


def strata_key(table: pd.DataFrame, strata: list[str]) -> pd.Series:
    """One label per subject combining the stratification columns (e.g. ``"F"`` or ``"F|site2"``)."""
    missing = [c for c in strata if c not in table.columns]
    if missing:
        raise InvalidInput(f"--data.strata {list(strata)}: {', '.join(map(repr, missing))} not a column of the manifest "
                           f"(its columns: {', '.join(table.columns)}); stratify by its columns ([] for none)")
    if not strata:
        return pd.Series(["all"] * len(table), index=table.index)
    return table[strata].astype(str).agg("|".join, axis=1)


def splits_key(table: pd.DataFrame, n_folds: int = 10, test_fraction: float = 0.1, seed: int = 0,
               strata: list[str] | None = None, cohort: str = "all") -> dict:
    """Everything that defines a set of splits; ``subjects`` hashes each subject with its strata, in id order."""
    strata = ["sex"] if strata is None else list(strata)
    ordered = table.assign(subject_id=table["subject_id"].astype(str)).sort_values("subject_id", kind="stable")
    rows = "\n".join(f"{sid}\t{key}" for sid, key in zip(ordered["subject_id"], strata_key(ordered, strata)))
    return {"subjects": hashlib.sha256(rows.encode()).hexdigest()[:16], "cohort": cohort, "n_folds": int(n_folds),
            "test_fraction": float(test_fraction), "strata": strata, "seed": int(seed)}


def key_digest(key: dict) -> str:
    """A short name for a splits key (part of the splits file's name)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def hold_out_test(ids: list[str], key: list[str], test_fraction: float, seed: int) -> tuple[list, list, list]:
    """``(development ids, test ids, development strata)``: ``round(n * test_fraction)`` subjects held out,
    stratified when every stratum can give one (else at random)."""
    n_test = int(round(len(ids) * test_fraction))
    if n_test == 0:
        return ids, [], key
    counts = pd.Series(key).value_counts()
    stratify = key if counts.min() >= 2 and n_test >= len(counts) else None
    dev_ids, test_ids, dev_key, _ = train_test_split(ids, key, test_size=n_test, random_state=seed, stratify=stratify)
    return dev_ids, test_ids, dev_key


def make_splits(
    table: pd.DataFrame,
    n_folds: int = 10,
    test_fraction: float = 0.1,
    seed: int = 0,
    strata: list[str] | None = None,
    cohort: str = "all",
) -> dict:
    """Split subjects into a stratified test set and ``n_folds`` stratified CV folds (independent of row order)."""
    strata = ["sex"] if strata is None else list(strata)
    key_of_splits = splits_key(table, n_folds, test_fraction, seed, strata, cohort)
    table = table.assign(subject_id=table["subject_id"].astype(str)).sort_values("subject_id", kind="stable")
    ids = table["subject_id"].tolist()
    key = strata_key(table, strata).tolist()
    if n_folds < 2:
        raise InvalidInput(f"data.n_folds {n_folds}: cross-validation needs at least 2 folds")
    if not 0.0 <= test_fraction < 1.0:
        raise InvalidInput(f"data.test_fraction {test_fraction}: must be in [0, 1) (the paper holds out 0.1)")
    dev_ids, test_ids, dev_key = hold_out_test(ids, key, test_fraction, seed)
    per_stratum = pd.Series(dev_key).value_counts()
    if len(dev_ids) < n_folds or per_stratum.max() < n_folds:
        raise InvalidInput(
            f"cohort '{cohort}': {len(dev_ids)} subjects remain after holding out the test set "
            f"({per_stratum.to_dict()} by {'/'.join(strata) or 'stratum'}), too few for "
            f"{n_folds} stratified folds; use fewer folds (--data.n_folds) or a larger cohort"
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
        "key": key_of_splits,
        "seed": seed,
        "strata": strata,
        "n_folds": n_folds,
        "test_fraction": test_fraction,
        "test": sorted(test_ids),
        "folds": folds,
        "counts": {
            "test": pd.Series([by_id[i] for i in test_ids], dtype=str).value_counts().to_dict(),
            "folds": [pd.Series([by_id[i] for i in f["val"]]).value_counts().to_dict() for f in folds],
        },
    }


def load_or_create_splits(
    path: str | Path,
    table: pd.DataFrame,
    n_folds: int = 10,
    test_fraction: float = 0.1,
    seed: int = 0,
    strata: list[str] | None = None,
    cohort: str = "all",
) -> dict:
    """Reuse the splits at ``path`` if their key matches this cohort and protocol, else create and write them.

    Concurrent runs (sweep workers, jobs of an array) race to create the same file: a lock next to it makes
    exactly one of them write it and the others read the finished file. Existing splits are read without the
    lock (writes are atomic), so a read-only splits folder made by a collaborator works.
    """
    path = Path(path)
    expected = splits_key(table, n_folds, test_fraction, seed, strata, cohort)
    if not path.is_file():
        # deterministic, so made outside the lock; a protocol the cohort cannot fill is refused before any file
        splits = make_splits(table, n_folds=n_folds, test_fraction=test_fraction, seed=seed, strata=strata,
                             cohort=cohort)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if not path.is_file():
                tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps(splits, indent=2))
                tmp.replace(path)  # atomic: a reader without the lock never sees half a file
                return splits
    splits = json.loads(path.read_text())
    check_key(path, splits.get("key"), expected)
    return splits


def check_key(path: str | Path, saved: dict | None, expected: dict) -> None:
    """Refuse splits whose key differs from the one this run needs, naming what differs."""
    if saved is None:
        raise InvalidInput(f"{path}: these splits record no key (written by an older version); "
                         "delete the file or set data.splits_dir elsewhere to make new ones")
    differ = [k for k in expected if saved.get(k) != expected[k]]
    if differ:
        what = "; ".join("the subjects or their strata differ" if k == "subjects" else
                         f"{k} {saved.get(k)!r} != {expected[k]!r}" for k in differ)
        raise InvalidInput(f"{path}: saved splits were made for another cohort or protocol ({what}); "
                         "delete the file or set data.splits_dir elsewhere to make new ones")


def fold_subjects(splits: dict, fold: int) -> dict[str, list[str]]:
    """The train / val / test subject ids of one fold."""
    n = len(splits["folds"])
    if not 0 <= fold < n:
        raise InvalidInput(f"data.fold {fold}: must be in 0..{n - 1} (data.n_folds is {n})")
    return {"train": splits["folds"][fold]["train"], "val": splits["folds"][fold]["val"], "test": splits["test"]}


def split_record(splits: dict, fold: int) -> dict:
    """What a checkpoint records of its data: the splits key, the fold and its subjects."""
    return {"key": splits.get("key"), "fold": fold, "subjects": fold_subjects(splits, fold)}


def check_same_split(source: dict | None, target: dict, origin: str) -> None:
    """Refuse weights trained on other data than this run's fold: a network trained on another fold, cohort or
    set of splits has seen this fold's validation or test scans in training."""
    if not source or "subjects" not in source:
        raise InvalidInput(f"{origin}: the checkpoint records no training subjects, so it cannot be shown not to have "
                         "seen this fold's validation and test scans; train it with this version of stvnet train")
    seen = set(source["subjects"]["train"]) & (set(target["subjects"]["val"]) | set(target["subjects"]["test"]))
    if source.get("key") != target.get("key") or source.get("fold") != target.get("fold") or seen:
        cohort = (source.get("key") or {}).get("cohort")
        raise InvalidInput(f"{origin}: trained on fold {source.get('fold')} of other splits or another cohort "
                         f"('{cohort}'); it saw {len(seen)} of this run's validation/test subjects in training. "
                         "Start from a network trained on the same fold, cohort and splits")
