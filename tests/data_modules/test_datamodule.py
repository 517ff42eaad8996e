"""The datamodule (data_modules/datamodule.py): the subjects each loader serves for every fold, batches, workers,
patches, the default cohort, the shape prior and what setup refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from data_modules.datamodule import FemurDataModule
from data_modules.synthetic import default_manifest
from tests.conftest import tiny_data_args


def _ids(loader) -> list[str]:
    return [sid for batch in loader for sid in batch["subject_id"]]


def test_each_loader_serves_exactly_its_splits_subjects_for_every_fold(tiny_cohort, tmp_path):
    for fold in range(3):
        dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", fold=fold, batch_size=1))
        dm.prepare_data()
        dm.setup("fit")
        record = json.loads(dm.save_splits(tmp_path / f"run{fold}").read_text())  # the run's own splits.json
        expected = {"train": record["folds"][fold]["train"], "val": record["folds"][fold]["val"], "test": record["test"]}
        served = {"train": _ids(dm.train_dataloader()), "val": _ids(dm.val_dataloader()), "test": _ids(dm.test_dataloader())}
        for split in expected:
            assert sorted(served[split]) == sorted(expected[split]), (fold, split)
        assert not (set(served["train"]) & set(served["val"])) and not (set(served["train"]) | set(served["val"])) & set(served["test"])
    assert len({tuple(json.loads((tmp_path / f"run{f}" / "splits.json").read_text())["folds"][f]["val"]) for f in range(3)}) == 3


def test_a_checkpoint_of_another_fold_is_refused_on_resume(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", fold=0))
    record = dm.state_dict()
    assert record["fold"] == 0 and record["subjects"] == {s: dm.subject_ids(s) for s in ("train", "val", "test")}
    dm.load_state_dict(record)  # its own record: accepted
    dm.load_state_dict({})  # a checkpoint from before the record existed: accepted
    other = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", fold=1))
    with pytest.raises(ValueError, match="trained on other subjects than this configuration selects"):
        other.load_state_dict(record)


@pytest.mark.not_in_mutation_run
@pytest.mark.slow  # writes scans at the default 1 mm
def test_the_default_cohort_is_generated_once(tmp_path):
    manifest = default_manifest(tmp_path / "synthetic", n_subjects=2, seed=3)
    assert manifest == tmp_path / "synthetic" / "manifest.csv"
    table = pd.read_csv(manifest)
    assert len(table) == 2 and all((manifest.parent / p).is_file() or Path(p).is_file() for p in table["image"])
    stamp = manifest.stat().st_mtime_ns
    assert default_manifest(tmp_path / "synthetic", n_subjects=5) == manifest  # found, not regenerated
    assert manifest.stat().st_mtime_ns == stamp and len(pd.read_csv(manifest)) == 2


@pytest.mark.mutation_target("train_dataloader", "loader_workers")
def test_loader_workers_are_capped_at_each_ranks_share_of_the_cpus(monkeypatch, tiny_cohort, tmp_path):
    """8 workers asked on a rank that may use 2 CPUs would time-slice them and delay the first batch: 2 are started
    (with a warning), the node's CPUs are shared among its ranks, and 0 (load in the main process) stays 0."""
    import data_modules.datamodule as datamodule

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert datamodule.loader_workers(16) == 16 and datamodule.loader_workers(8, ranks_per_node=4) == 4
    assert datamodule.loader_workers(0, ranks_per_node=4) == 0 and datamodule.loader_workers(8, 32) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", num_workers=8))
    dm.prepare_data()
    dm.setup("fit")
    with pytest.warns(UserWarning, match="--data.num_workers 8: this rank has 2 CPU"):
        loader = dm.train_dataloader()
    assert loader.num_workers == 2 and dm.num_workers == 8


@pytest.mark.mutation_target("train_dataloader", "_dataset", "_eval_loader", "augmentation")
def test_training_batches_are_augmented_and_full_and_validation_batches_are_not(tiny_cohort, tmp_path):
    """The training loader augments (the same subject's tensor differs from its preprocessed one) and drops a last
    partial batch; the validation loader serves the preprocessed tensors themselves, one subject per batch."""
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", augment=1.0))
    dm.prepare_data()
    dm.setup("fit")
    plain = {s["subject_id"]: s["image"].data for s in dm.subjects("train")}
    torch.manual_seed(0)
    batches = list(dm.train_dataloader())
    assert len(batches) == len(plain) // 2 and all(len(b["subject_id"]) == 2 for b in batches)
    changed = [not torch.equal(image, plain[sid]) for b in batches for sid, image in zip(b["subject_id"], b["image"]["data"])]
    assert sum(changed) >= len(changed) - 1  # each transform has p < 1: one subject may pass unchanged
    for batch in dm.val_dataloader():
        (sid,) = batch["subject_id"]
        assert torch.equal(batch["image"]["data"][0], {s["subject_id"]: s["image"].data for s in dm.subjects("val")}[sid])


@pytest.mark.mutation_target("train_dataloader", "_dataset")
@pytest.mark.parametrize("cache", [True, False])
def test_training_order_is_shuffled_and_a_short_last_batch_dropped(tiny_cohort, tmp_path, cache):
    """Each training epoch serves the fold's subjects in a new order, in full batches of preprocessed ROIs (from the
    cache, or preprocessed by the loader without it)."""
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", batch_size=3, cache=cache))
    dm.prepare_data()
    dm.setup("fit")
    ids = dm.subject_ids("train")
    assert len(ids) % 3  # this fold leaves a partial batch to drop
    torch.manual_seed(0)
    batches = list(dm.train_dataloader())
    served = [sid for b in batches for sid in b["subject_id"]]
    assert len(batches) == len(ids) // 3 and all(tuple(b["image"]["data"].shape) == (3, 1, 32, 32, 32) for b in batches)
    assert len(set(served)) == len(served) and set(served) <= set(ids)
    assert served != list(ids[:len(served)])  # shuffled, not the split's order


@pytest.mark.mutation_target("shape_prior")
def test_the_datamodules_shape_prior_defaults_to_the_roi_aligned_mean_of_the_training_labels(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits"))
    dm.prepare_data()
    dm.setup("fit")
    labels = [s["label"].data[0].float() for s in dm.subjects("train")]
    assert torch.allclose(dm.shape_prior(), torch.stack(labels).mean(0)[None])


@pytest.mark.mutation_target("train_dataloader")
def test_patch_training_draws_samples_per_volume_patches_of_the_patch_size(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", patch_size=(16, 16, 8),
                                          samples_per_volume=3, queue_length=12))
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert sum(len(b["subject_id"]) for b in batches) == 3 * len(dm.subject_ids("train"))
    assert all(tuple(b["image"]["data"].shape[2:]) == (16, 16, 8) for b in batches)
    sizes = [b["image"]["data"].shape[0] for b in batches]
    assert max(sizes) == 2 and sizes.count(2) >= len(sizes) - 1  # batches of batch_size, the last one maybe short


def test_validation_and_test_loaders_serve_one_subject_at_a_time_in_split_order(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", augment=1.0))
    dm.prepare_data()
    dm.setup("fit")
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        served = [batch["subject_id"] for batch in loader]
        assert served == [[sid] for sid in dm.subject_ids(split)]


@pytest.mark.not_in_mutation_run
@pytest.mark.slow  # writes scans at the default 1 mm
def test_the_default_cohort_is_generated_with_the_datamodules_synthetic_settings(tmp_path):
    from data_modules.synthetic import cohort_fingerprint, make_cohort

    dm = FemurDataModule(**dict(tiny_data_args(None, tmp_path / "splits"), manifest=None,
                                synthetic_dir=str(tmp_path / "default"), synthetic_subjects=2, synthetic_seed=5,
                                n_folds=2, strata=[]))
    dm.prepare_data()
    assert dm.manifest_path == tmp_path / "default" / "manifest.csv"
    expected = make_cohort(tmp_path / "expected", n_subjects=2, seed=5)
    assert cohort_fingerprint(dm.manifest_path) == cohort_fingerprint(expected)


@pytest.mark.mutation_target("setup")
@pytest.mark.parametrize("cache", [True, False])
def test_setup_refuses_cut_labels_with_or_without_the_cache(tiny_cohort, tmp_path, cache):
    """An ROI too small for the femur stops ``setup('fit')`` with one line per cut subject, whether ROIs come from the
    cache or are preprocessed on every access, and the last line names the locator in use."""
    from data_modules.roi import UserError

    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", roi_size=(12, 12, 12), cache=cache,
                                          roi_locator="fraction"))
    dm.prepare_data()
    with pytest.raises(UserError) as raised:
        dm.setup("fit")
    lines = str(raised.value).splitlines()
    assert len(lines) >= 2 and all("% of the femur label lies outside the ROI (" in line for line in lines[:-1])
    assert lines[-1].endswith("(--data.roi_locator fraction)")
    # 12 voxels of 4 mm cut every femur: the training split is refused first, each of its subjects named
    assert {line.split(":")[0] for line in lines[:-1]} == set(dm.folds.rows(0, "train")["subject_id"])
