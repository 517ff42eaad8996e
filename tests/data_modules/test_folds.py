"""Splits follow the paper: a stratified 10% test set and stratified folds on the rest, stable across calls."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from data_modules.folds import check_same_split, load_or_create_splits, make_splits


def _cohort(n_f: int = 216, n_m: int = 181) -> pd.DataFrame:
    ids = [f"s{i:03d}" for i in range(n_f + n_m)]
    sex = ["F"] * n_f + ["M"] * n_m
    return pd.DataFrame({"subject_id": ids, "sex": np.random.default_rng(0).permutation(sex)})


def test_paper_sized_splits_are_disjoint_complete_and_stratified():
    table = _cohort()
    splits = make_splits(table, n_folds=10, test_fraction=0.1, seed=3)
    test = set(splits["test"])
    assert len(test) == round(0.1 * len(table))
    vals = [set(f["val"]) for f in splits["folds"]]
    dev = set(table["subject_id"]) - test
    # folds partition the development set; the test set is in no fold
    assert set().union(*vals) == dev and sum(map(len, vals)) == len(dev)
    for f in splits["folds"]:
        assert not (set(f["train"]) & set(f["val"])) and set(f["train"]) | set(f["val"]) == dev
        assert not (set(f["train"]) | set(f["val"])) & test
    sex = dict(zip(table["subject_id"], table["sex"]))
    n_dev_f = sum(sex[s] == "F" for s in dev)
    for v in vals:
        n_f = sum(sex[s] == "F" for s in v)
        assert abs(n_f - n_dev_f / 10) <= 1
        assert abs((len(v) - n_f) - (len(dev) - n_dev_f) / 10) <= 1
    n_test_f = sum(sex[s] == "F" for s in test)
    assert abs(n_test_f - 0.1 * 216) <= 1


def test_splits_are_identical_across_calls_and_reused_from_disk(tmp_path):
    table = _cohort(30, 25)
    a = make_splits(table, n_folds=5, seed=1)
    b = make_splits(table, n_folds=5, seed=1)
    assert a == b
    assert make_splits(table, n_folds=5, seed=2)["test"] != a["test"]
    path = tmp_path / "splits.json"
    first = load_or_create_splits(path, table, n_folds=5, seed=1)
    on_disk = json.loads(path.read_text())
    assert on_disk["folds"] == first["folds"] and on_disk["test"] == first["test"]
    # the file is never reused for another protocol: each part of the key that differs is named
    for change, message in (({"seed": 9}, "seed 1 != 9"), ({"test_fraction": 0.2}, "test_fraction 0.1 != 0.2"),
                            ({"strata": []}, "strata"), ({"cohort": "female"}, "cohort 'all' != 'female'")):
        with pytest.raises(ValueError, match=message):
            load_or_create_splits(path, table, **{"n_folds": 5, "seed": 1, **change})


def test_changed_manifest_is_refused(tmp_path):
    path = tmp_path / "splits.json"
    table = _cohort(30, 25)
    load_or_create_splits(path, table, n_folds=5)
    with pytest.raises(ValueError, match="subjects or their strata differ"):
        load_or_create_splits(path, table.iloc[:-1], n_folds=5)
    relabelled = table.assign(sex=table["sex"].where(table.index != 3, "M" if table.loc[3, "sex"] == "F" else "F"))
    with pytest.raises(ValueError, match="subjects or their strata differ"):
        load_or_create_splits(path, relabelled, n_folds=5)


def test_splits_do_not_depend_on_the_manifests_row_order():
    table = _cohort(40, 33)
    shuffled = table.sample(frac=1.0, random_state=5).reset_index(drop=True)
    assert not table["subject_id"].equals(shuffled["subject_id"])
    assert make_splits(shuffled, n_folds=5, seed=2) == make_splits(table, n_folds=5, seed=2)


def test_too_few_subjects_for_folds():
    with pytest.raises(ValueError, match="too few for 10 stratified folds"):
        make_splits(_cohort(4, 4), n_folds=10)


def _create_splits(path: str) -> str:
    try:
        return json.dumps(load_or_create_splits(path, _cohort(20, 20), n_folds=3), sort_keys=True)
    except Exception as exc:  # reported to the parent, which asserts there were none
        return f"ERROR {exc!r}"


def test_concurrent_runs_create_the_splits_once_and_all_read_the_same(tmp_path):
    """Sweep workers and array jobs start together: none may crash or read a half-written file."""
    from concurrent.futures import ProcessPoolExecutor

    paths = [str(tmp_path / f"rep{r}" / "splits.json") for r in range(25) for _ in range(4)]
    with ProcessPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(_create_splits, paths))
    assert not [r for r in results if r.startswith("ERROR")]
    assert len(set(results)) == 1  # every process, winner or not, got the one set of splits
    assert not list(tmp_path.rglob("*.tmp"))


def test_saved_splits_are_read_without_taking_the_lock(tmp_path):
    """A collaborator's read-only splits folder works: no lock file is needed to reuse existing splits."""
    path = tmp_path / "shared" / "splits.json"
    made = load_or_create_splits(path, _cohort(20, 20), n_folds=3)
    lock = path.parent / "splits.json.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()  # a lock file can no longer be created there (as in a folder we may not write)
    assert load_or_create_splits(path, _cohort(20, 20), n_folds=3) == made


def _record(fold: int, train: list[str], val: list[str], test: list[str], cohort: str = "all") -> dict:
    return {"key": {"cohort": cohort, "n_folds": 3}, "fold": fold, "subjects": {"train": train, "val": val, "test": test}}


def test_weights_are_accepted_only_from_the_same_fold_of_the_same_splits():
    target = _record(1, ["a", "b"], ["c"], ["d"])
    check_same_split(_record(1, ["a", "b"], ["c"], ["d"]), target, "init.ckpt")  # the same fold: accepted
    with pytest.raises(ValueError, match=r"^init.ckpt: trained on fold 0 of other splits or another cohort \('all'\); "
                                         r"it saw 1 of this run's validation/test subjects in training. Start from a "
                                         r"network trained on the same fold, cohort and splits$"):
        check_same_split(_record(0, ["a", "c"], ["b"], ["d"]), target, "init.ckpt")
    # another fold index alone, another cohort alone, or leaked subjects alone are each refused
    with pytest.raises(ValueError, match=r"trained on fold 2 .* it saw 0 of"):
        check_same_split(_record(2, ["a", "b"], ["c"], ["d"]), target, "x")
    with pytest.raises(ValueError, match=r"another cohort \('male'\)"):
        check_same_split(_record(1, ["a", "b"], ["c"], ["d"], cohort="male"), target, "x")
    with pytest.raises(ValueError, match="it saw 1 of this run's validation/test subjects"):
        check_same_split(_record(1, ["a", "b", "d"], ["c"], []), target, "x")
    with pytest.raises(ValueError, match=r"^old.ckpt: the checkpoint records no training subjects, so it cannot be "
                                         r"shown not to have seen this fold's validation and test scans; train it "
                                         r"with this version of stvnet train$"):
        check_same_split({"key": None}, target, "old.ckpt")


def test_a_fold_outside_the_splits_is_named_with_the_valid_range():
    from data_modules.errors import InvalidInput
    from data_modules.folds import fold_subjects, split_record

    splits = {"key": {"seed": 0}, "test": ["t"], "folds": [{"train": ["a"], "val": ["b"]}, {"train": ["b"], "val": ["a"]}]}
    assert fold_subjects(splits, 1) == {"train": ["b"], "val": ["a"], "test": ["t"]}
    assert split_record(splits, 0) == {"key": {"seed": 0}, "fold": 0,
                                       "subjects": {"train": ["a"], "val": ["b"], "test": ["t"]}}
    for fold in (2, -1):
        with pytest.raises(InvalidInput, match=rf"^data\.fold {fold}: must be in 0\.\.1 \(data\.n_folds is 2\)$"):
            fold_subjects(splits, fold)


def test_splits_written_without_a_key_are_refused_with_what_to_do(tmp_path):
    path = tmp_path / "splits.json"
    table = _cohort(30, 25)
    splits = load_or_create_splits(path, table, n_folds=5)
    path.write_text(json.dumps({k: v for k, v in splits.items() if k != "key"}))  # as an older version wrote them
    with pytest.raises(ValueError, match=rf"^{path}: these splits record no key \(written by an older version\); "
                                         r"delete the file or set data\.splits_dir elsewhere to make new ones$"):
        load_or_create_splits(path, table, n_folds=5)


@pytest.mark.mutation_target("load_or_create_splits")
def test_created_splits_are_the_protocols_own_written_readably_in_a_new_folder(tmp_path):
    """Whatever the protocol (the defaults are the paper's: 10 folds, 10% test, seed 0, stratified by sex), the splits
    written are exactly make_splits' for it, into folders made on the way, as indented JSON a person can read."""
    table = _cohort(30, 25)
    protocols = [{}, {"n_folds": 5, "test_fraction": 0.2, "seed": 3, "strata": [], "cohort": "female"}]
    for i, protocol in enumerate(protocols):
        path = tmp_path / f"study{i}" / "splits" / "splits.json"
        made = load_or_create_splits(path, table, **protocol)
        assert made == make_splits(table, **protocol)
        assert path.read_text() == json.dumps(made, indent=2)
    default_key = json.loads((tmp_path / "study0" / "splits" / "splits.json").read_text())["key"]
    assert (default_key["n_folds"], default_key["test_fraction"], default_key["seed"], default_key["cohort"]) == (
        10, 0.1, 0, "all")
