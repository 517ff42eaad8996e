"""The persistent preprocessed cache: the same tensors as preprocessing each scan, built once and shared, invalidated
by exactly what changes it, never half-written, safe when processes race for it, and read lazily."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

import data_modules.cache
from data_modules.cache import CacheSettings, PreprocessedCache, entry_name
from data_modules.datamodule import FemurDataModule
from data_modules.manifest import ManifestError
from tests.conftest import tiny_data_args

SETTINGS = CacheSettings((4.0, 4.0, 4.0), (-200.0, 1800.0))


def _scans(manifest: Path) -> list[tuple[str, str, str]]:
    table = pd.read_csv(manifest)
    return [(sid, str(manifest.parent / i), str(manifest.parent / lbl))
            for sid, i, lbl in zip(table["subject_id"], table["image"], table["label"])]


@pytest.mark.mutation_target("subjects")
@pytest.mark.parametrize(("locator", "turn", "labels"), [("template", 0.0, "nearest"), ("fraction", 0.0, "nearest"),
                                                        pytest.param("template", 20.0, "linear", marks=pytest.mark.slow)])
def test_cached_subjects_hold_exactly_what_preprocessing_gives(tiny_cohort, tmp_path, locator, turn, labels):
    """...with binary labels, and with soft ones (``label_interpolation: linear``: each voxel's share of femur), in
    axis-aligned and in turned boxes."""
    args = tiny_data_args(tiny_cohort, tmp_path / "splits", roi_locator=locator, roi_max_rotation=turn,
                          label_interpolation=labels)
    cached, direct = FemurDataModule(**args), FemurDataModule(**{**args, "cache": False})
    if turn:
        assert any(not np.allclose(s["roi_rotation"], np.eye(3)) for s in cached.subjects("test"))  # turned boxes
    if locator == "template":
        assert np.array_equal(cached.locator.template, direct.locator.template)
        assert cached.locator.stats.keys() == direct.locator.stats.keys()
        assert all(np.allclose(cached.locator.stats[k], direct.locator.stats[k]) for k in direct.locator.stats)
    for split in ("train", "test"):
        for lazy, raw in zip(cached.subjects(split), direct.subjects(split)):
            reference = direct.preprocess(raw)
            assert (lazy["subject_id"], lazy["sex"]) == (raw["subject_id"], raw["sex"])
            for key in ("image", "label"):
                assert torch.equal(lazy[key].data, reference[key].data), (raw["subject_id"], key)
                assert np.allclose(lazy[key].affine, reference[key].affine, atol=1e-6)
            if locator == "template":
                assert np.allclose(lazy["roi_center_mm"], reference["roi_center_mm"], atol=1e-6)
            assert (lazy["label_in_roi"], lazy["label_cut"]) == (reference["label_in_roi"], reference["label_cut"])
            values = lazy["label"].data
            soft = ((values > 0.05) & (values < 0.95)).float().sum() / (values > 0.5).float().sum()
            assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
            # a femur at 4 mm: a third or more of its voxels are partly femur when the labels are soft, none when not
            assert (soft > 0.3) if labels == "linear" else (soft == 0)


def test_subjects_are_read_lazily_by_whoever_uses_them(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits"))
    subjects = dm.subjects("train")
    dm.shape_prior()
    assert all(s["image"].get("data") is None and s["label"].get("data") is None for s in subjects)  # nothing in RAM
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"]["data"].shape == (1, 1, 32, 32, 32)


def test_one_build_serves_every_fold_and_cohort(tiny_cohort, tmp_path):
    first = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", fold=0))
    first.prepare_data()
    entries = sorted(p.name for p in first.store.root.iterdir() if (p / "meta.json").is_file())
    assert len(entries) == len(pd.read_csv(tiny_cohort))
    for fold, cohort in ((1, "all"), (2, "all"), (0, "female")):
        other = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", fold=fold, cohort=cohort))
        assert other.store.build(_scans(tiny_cohort)) == 0  # nothing left to build
        other.subjects("val")
    assert sorted(p.name for p in first.store.root.iterdir() if (p / "meta.json").is_file()) == entries


def test_touching_a_scan_or_changing_a_setting_rebuilds_exactly_that(tiny_cohort, tmp_path):
    scans = _scans(tiny_cohort)[:3]
    cache = PreprocessedCache(tmp_path / "cache", SETTINGS)
    assert cache.build(scans, workers=1) == 3
    before = cache.folder(*scans[1][1:])
    stat = os.stat(scans[1][1])
    os.utime(scans[1][1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the scan was rewritten
    try:
        assert cache.folder(*scans[1][1:]) != before
        assert cache.build(scans, workers=1) == 1
    finally:
        os.utime(scans[1][1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    wider = PreprocessedCache(tmp_path / "cache", CacheSettings((4.0, 4.0, 4.0), (-300.0, 1800.0)))
    assert wider.root != cache.root and wider.build(scans, workers=1) == 3
    assert entry_name(*scans[0][1:], SETTINGS) != entry_name(*scans[0][1:], CacheSettings((3.0, 3.0, 3.0), (-200.0, 1800.0)))


def test_a_build_killed_midway_leaves_nothing_that_reads_as_valid(tiny_cohort, tmp_path, monkeypatch):
    scans = _scans(tiny_cohort)[:2]
    cache = PreprocessedCache(tmp_path / "cache", SETTINGS)
    real_save = np.save

    def dies_on_the_label(path, array):
        if Path(path).name == "label.npy":
            raise OSError("No space left on device")
        real_save(path, array)

    monkeypatch.setattr(data_modules.cache.np, "save", dies_on_the_label)
    with pytest.raises(RuntimeError, match=rf"^{scans[0][0]}: preprocessing {scans[0][1]} failed \(OSError: No space left on device\)$"):
        cache.build(scans, workers=1)
    assert list(cache.root.iterdir()) == [cache.root / ".build.lock"]  # no entry, no temporary folder left
    monkeypatch.undo()
    # what kill -9 leaves behind: a temporary folder with some files; it is ignored and the entry built
    leftover = cache.root / f".{cache.folder(*scans[0][1:]).name}.killed"
    leftover.mkdir()
    real_save(leftover / "image.npy", np.zeros(3))
    assert cache.build(scans, workers=1) == 2
    assert cache.meta(*scans[0][1:])["image"] == scans[0][1]


def _race(root: str, scans: list, queue) -> None:
    queue.put(PreprocessedCache(root, SETTINGS).build(scans, workers=1))


@pytest.mark.slow
@pytest.mark.not_in_mutation_run
def test_two_processes_racing_build_each_entry_once(tiny_cohort, tmp_path):
    scans = _scans(tiny_cohort)[:4]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_race, args=(str(tmp_path / "cache"), scans, queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert sorted(queue.get(timeout=5) for _ in workers) == [0, 4]
    cache = PreprocessedCache(tmp_path / "cache", SETTINGS)
    assert all((cache.folder(*s[1:]) / "meta.json").is_file() for s in scans)


def test_the_cache_folder_can_move_with_the_data(tiny_cohort, tmp_path):
    """Entries are keyed by the scans, not by where the cache lives: a copied cache is found as is."""
    cache = PreprocessedCache(tmp_path / "a", SETTINGS)
    cache.build(_scans(tiny_cohort)[:2], workers=1)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert PreprocessedCache(tmp_path / "b", SETTINGS).build(_scans(tiny_cohort)[:2], workers=1) == 0


@pytest.mark.mutation_target("_build_cache", "build")
def test_voxels_are_checked_once_when_the_entry_is_built(tiny_cohort, tmp_path):
    table = pd.read_csv(tiny_cohort)
    row = table.iloc[0]
    image = nib.load(tiny_cohort.parent / row["image"])
    data = np.asanyarray(image.dataobj).astype(np.float32)
    data[3, 3, 3] = np.nan
    bad = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, image.affine), str(bad))
    table["image"] = [str(tiny_cohort.parent / p) for p in table["image"]]
    table["label"] = [str(tiny_cohort.parent / p) for p in table["label"]]
    table.loc[0, "image"] = str(bad)
    manifest = tmp_path / "manifest.csv"
    table.to_csv(manifest, index=False)
    dm = FemurDataModule(**tiny_data_args(manifest, tmp_path / "splits"))
    with pytest.raises(ManifestError, match=rf"manifest.csv: 1 problem\(s\):\n  - {row['subject_id']}: image contains NaN") as info:
        dm.prepare_data()  # headers were fine; the build read the voxels
    assert str(info.value).startswith(f"{manifest}: ")  # the error names the manifest the user gave
    assert not (dm.store.folder(str(bad), table.loc[0, "label"]) / "meta.json").exists()
    assert dm.store.build(_scans(tiny_cohort)[1:], workers=1) == 0  # the good scans were built all the same


@pytest.mark.slow
def test_a_parallel_build_writes_the_same_entries_as_a_serial_one(tiny_cohort, tmp_path):
    scans = _scans(tiny_cohort)[:4]
    serial, parallel = (PreprocessedCache(tmp_path / name, SETTINGS) for name in ("serial", "parallel"))
    assert serial.build(scans, workers=1) == 4 and parallel.build(scans, workers=2) == 4
    for _, image, label in scans:
        for name in ("image.npy", "label.npy", "coarse.npy"):
            assert np.array_equal(np.load(serial.folder(image, label) / name), np.load(parallel.folder(image, label) / name))
        assert serial.meta(image, label) == parallel.meta(image, label)


def test_locations_are_found_once_per_fold_template_and_shared(tiny_cohort, tmp_path, monkeypatch):
    args = tiny_data_args(tiny_cohort, tmp_path / "splits")  # axis-aligned boxes: the search is the same, only shorter
    first = FemurDataModule(**args)
    found = {s["subject_id"]: s for s in first.subjects("train") + first.subjects("val")}
    (table,) = list((first.store.root / "locations").glob("*.json"))
    assert table.stem == first.locator.digest()

    def no_search(*_):
        raise AssertionError("located again")

    monkeypatch.setattr(data_modules.cache.FemurLocator, "locate_coarse", no_search)
    again = FemurDataModule(**args)  # another rank, sweep trial or run of the same fold
    for s in again.subjects("train") + again.subjects("val"):
        reference = found[s["subject_id"]]
        assert np.array_equal(s["roi_center_mm"], reference["roi_center_mm"])
        assert np.array_equal(s["roi_rotation"], reference["roi_rotation"])
        assert (s["label_in_roi"], s["label_cut"]) == (reference["label_in_roi"], reference["label_cut"])
        assert torch.equal(s["image"].data, reference["image"].data)
    monkeypatch.undo()
    other = FemurDataModule(**{**args, "fold": 1})  # another template: its own table
    other.subjects("train")
    assert len(list((first.store.root / "locations").glob("*.json"))) == 2
