"""Unit tests at the seams where a silent bug corrupts a study: exact preprocessing values, ROI bounds, the subjects
each loader serves, the spacing that reaches every metric call, ensembles, known-answer surface distances, the
stage a checkpoint restores, and subprocesses that run this checkout's code."""

from __future__ import annotations

import itertools
import json
import re
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio

import stvnet.evaluation
import stvnet.validation_rows
from data_modules.datamodule import FemurDataModule
from data_modules.synthetic import default_manifest
from data_modules.transforms import RoiCrop, preprocessing, sampler
from stvnet.callbacks import Stage, StageSchedule
from stvnet.inference import ensemble_probabilities, ensemble_segment
from stvnet.lightning_module import FemurSegmenter
from stvnet.metrics import evaluate_case
from stvnet.models import STVNet, VNet
from tests.conftest import FixedPredictor, tiny_data_args

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- preprocessing
def test_hu_window_clamps_and_scales_to_exact_values():
    hu = np.array([-1000.0, -200.0, 300.0, 800.0, 1800.0, 3000.0], dtype=np.float32)
    image = tio.ScalarImage(tensor=torch.from_numpy(hu).reshape(1, 6, 1, 1), affine=np.eye(4))
    out = preprocessing(None, None, None, hu_window=(-200.0, 1800.0))(tio.Subject(image=image))
    assert out["image"].data.flatten().tolist() == [0.0, 0.0, 0.25, 0.5, 1.0, 1.0]
    other = preprocessing(None, None, None, hu_window=(0.0, 1000.0))(tio.Subject(image=image))
    assert other["image"].data.flatten().tolist() == pytest.approx([0.0, 0.0, 0.3, 0.8, 1.0, 1.0], abs=1e-7)


def test_hu_window_leaves_the_label_untouched():
    label = tio.LabelMap(tensor=torch.tensor([0, 1, 1, 0], dtype=torch.uint8).reshape(1, 4, 1, 1), affine=np.eye(4))
    image = tio.ScalarImage(tensor=torch.full((1, 4, 1, 1), 500.0), affine=np.eye(4))
    out = preprocessing(None, None, None)(tio.Subject(image=image, label=label))
    assert out["label"].data.flatten().tolist() == [0, 1, 1, 0]


def test_roi_box_on_a_non_cubic_volume_with_an_asymmetric_centre():
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    box = RoiCrop((32, 16, 24), (0.2, 0.7, 0.9)).box(affine, (100, 60, 40))
    # start = round(fraction * n - size / 2): x 4, y 34, z 24 (its end, 48, is 8 past the last slice)
    assert np.allclose(box.affine[:3, 3], [4 * 0.7, 34 * 0.8, 24 * 2.5]) and box.size == (32, 16, 24)
    assert np.allclose(RoiCrop((10, 10, 10), None).box(np.eye(4), (30, 20, 10)).affine[:3, 3], [10, 5, 0])


def test_roi_crop_takes_exactly_those_voxels_and_pads_with_the_minimum():
    shape = (100, 60, 40)
    coded = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) + 1.0  # every voxel its own value, min 1
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(coded)[None], affine=affine))
    out = RoiCrop((32, 16, 24), (0.2, 0.7, 0.9))(subject)["image"]
    data = out.data[0].numpy()
    assert data.shape == (32, 16, 24)
    assert np.array_equal(data[:, :, :16], coded[4:36, 34:50, 24:40])
    assert (data[:, :, 16:] == 1.0).all()  # padded beyond the scan with its minimum
    assert np.allclose(out.affine[:3, 3], [4 * 0.7, 34 * 0.8, 24 * 2.5])  # the ROI knows where it lies


# ---------------------------------------------------------------------------------------------- loaders
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


# ---------------------------------------------------------------------------------------------- spacing
class _SpacingRecorder:
    def __init__(self, original):
        self.original, self.spacings = original, []

    def __call__(self, pred, target, spacing):
        self.spacings.append(tuple(float(s) for s in spacing))
        return self.original(pred, target, spacing)


def test_validation_metrics_get_the_roi_spacing_in_array_order(tiny_cohort, tmp_path, monkeypatch):
    recorder = _SpacingRecorder(evaluate_case)
    monkeypatch.setattr(stvnet.validation_rows, "evaluate_case", recorder)
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", target_spacing=(3.0, 4.0, 5.0)))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
    trainer.validate(FemurSegmenter(VNet(base_channels=4, depth=2, kernel_size=3)), datamodule=dm)
    assert recorder.spacings == [pytest.approx((3.0, 4.0, 5.0))] * 2


@pytest.mark.slow
def test_evaluation_scores_in_each_labels_own_spacing(trained_runs, tiny_cohort, tmp_path, monkeypatch):
    recorder = _SpacingRecorder(evaluate_case)
    monkeypatch.setattr(stvnet.evaluation, "evaluate_case", recorder)
    table = stvnet.evaluation.evaluate_runs([trained_runs["vnet"]], tmp_path / "eval", save_masks=False, figures=False)
    zooms = [tuple(float(z) for z in nib.load(label).header.get_zooms()[:3]) for label in table["label"]]
    assert recorder.spacings == zooms and len(set(zooms[0])) > 1  # anisotropic, passed in array-axis order


# ---------------------------------------------------------------------------------------------- ensembles
def test_ensemble_probability_is_the_mean_of_its_members():
    a = np.array([0.9, 0.3, 0.6, 0.0], dtype=np.float32)
    b = np.array([0.2, 0.3, 0.0, 0.0], dtype=np.float32)
    c = np.array([0.4, 0.3, 0.9, 0.0], dtype=np.float32)
    prob, _ = ensemble_probabilities([FixedPredictor(a), FixedPredictor(b), FixedPredictor(c)], "scan.nii.gz")
    assert prob == pytest.approx((a + b + c) / 3)
    mask, _ = ensemble_segment([FixedPredictor(a), FixedPredictor(b)], "scan.nii.gz", threshold=0.5)
    assert mask.tolist() == [1, 0, 0, 0]  # means 0.55, 0.3, 0.3, 0: neither the last member alone nor the sum


# ---------------------------------------------------------------------------------------------- surface distances
def _sheet(shape=(12, 12, 12)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[1:11, 1:11, 3] = True  # a 10 x 10 plate one voxel thick: every voxel is on its surface
    return mask


def test_hd95_and_assd_of_a_shifted_plate_equal_the_shift_in_mm():
    target = _sheet()
    pred = np.roll(target, 2, axis=2)
    m = evaluate_case(pred, target, (0.5, 0.7, 2.5))
    assert m["hd"] == pytest.approx(5.0) and m["hd95"] == pytest.approx(5.0) and m["assd"] == pytest.approx(5.0)


def test_one_outlier_moves_hd_but_not_hd95_and_a_known_share_of_assd():
    target = _sheet()
    pred = target.copy()
    pred[5, 5, 7] = True  # 4 slices (10 mm) from the plate; the other 100 prediction voxels lie on it
    m = evaluate_case(pred, target, (0.5, 0.7, 2.5))
    assert m["hd"] == pytest.approx(10.0)
    assert m["hd95"] == pytest.approx(0.0)
    assert m["assd"] == pytest.approx(10.0 / 201)  # one distance of 10 mm among 101 + 100 surface voxels


def test_hd95_is_the_95th_percentile_of_a_known_distance_distribution():
    target = _sheet()
    pred = target.copy()
    pred[1, 1:11, 3] = False
    pred[1, 1:11, 5] = True  # one row of 10 lifted by 2 slices (5 mm); the rest (90) stays on the plate
    m = evaluate_case(pred, target, (0.5, 0.7, 2.5))
    # pred -> plate: 90 x 0 and 10 x 5 mm, so its 95th percentile is 5 mm (a 90th would be 0.5 mm);
    # plate -> pred: 90 x 0 and 10 x 0.5 mm (the neighbouring row)
    assert m["hd"] == pytest.approx(5.0) and m["hd95"] == pytest.approx(5.0)
    assert m["assd"] == pytest.approx((10 * 5.0 + 10 * 0.5) / 200)


# ---------------------------------------------------------------------------------------------- stages
def test_a_checkpoint_restores_the_stage_it_was_written_in(tmp_path):
    module = FemurSegmenter(STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4,)))
    module.net.set_prior(torch.full((1, 1, 8, 8, 8), 0.5))
    schedule = StageSchedule([Stage(name="vnet", epochs=2, train=["backbone"]), Stage(name="stn", epochs=3, train=["stn"])])
    module.set_stage(schedule.active(1, module.lr))
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    net = STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4,))
    restored = FemurSegmenter.load_from_checkpoint(tmp_path / "mid.ckpt", net=net, map_location="cpu")
    assert restored.stage == module.stage and restored.stage.name == "stn" and restored.stage.train == ("stn",)
    other = StageSchedule([Stage(name="vnet", epochs=14), Stage(name="stn", epochs=4)], scale_to_max_epochs=True)
    other.load_state_dict(schedule.state_dict())
    assert [s.epochs for s in other.stages] == [2, 3] and other.starts == [0, 2]


# ---------------------------------------------------------------------------------------------- subprocesses
@pytest.mark.not_in_mutation_run
def test_subprocesses_import_this_checkouts_code(tmp_path):
    """Even from another folder and with another stvnet first on the path, a test's subprocess runs this checkout."""
    decoy = tmp_path / "site" / "stvnet"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise ImportError('the installed copy, not the checkout under test')")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(decoy.parent)])
    code = "import stvnet, data_modules; print(stvnet.__file__); print(data_modules.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    for line in out.stdout.split():
        assert Path(line).resolve().is_relative_to(ROOT), line


def test_label_sampler_centres_half_the_patches_on_the_femur():
    label = torch.zeros(1, 40, 40, 40, dtype=torch.uint8)
    label[0, 18:22, 18:22, 18:22] = 1  # 64 of 64000 voxels: a uniform sampler almost never lands there
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.rand(1, 40, 40, 40)), label=tio.LabelMap(tensor=label))
    torch.manual_seed(0)
    patches = list(itertools.islice(sampler("label", (9, 9, 9))(subject), 400))
    assert all(p["image"].spatial_shape == (9, 9, 9) for p in patches)
    on_femur = np.mean([p["label"].data[0, 4, 4, 4].item() for p in patches])
    assert 0.4 < on_femur < 0.6, on_femur
    uniform = list(itertools.islice(sampler("uniform", (9, 9, 9))(subject), 400))
    assert np.mean([p["label"].data[0, 4, 4, 4].item() for p in uniform]) < 0.05
    with pytest.raises(ValueError, match="sampler must be 'uniform' or 'label', got 'grid'"):
        sampler("grid", (9, 9, 9))


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
def test_the_default_cohort_is_generated_once(tmp_path):
    manifest = default_manifest(tmp_path / "synthetic", n_subjects=2, seed=3)
    assert manifest == tmp_path / "synthetic" / "manifest.csv"
    table = pd.read_csv(manifest)
    assert len(table) == 2 and all((manifest.parent / p).is_file() or Path(p).is_file() for p in table["image"])
    stamp = manifest.stat().st_mtime_ns
    assert default_manifest(tmp_path / "synthetic", n_subjects=5) == manifest  # found, not regenerated
    assert manifest.stat().st_mtime_ns == stamp and len(pd.read_csv(manifest)) == 2


# ---------------------------------------------------------------------------------------------- loader workers
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


def test_roi_crop_accepts_the_edges_of_its_ranges_and_names_what_it_refuses():
    RoiCrop((1, 1, 1), (0.0, 1.0, 0.5))  # one voxel, centres on the volume's edges: valid
    for size in ((0, 8, 8), (8, 8), (8, 8, 8, 8)):
        with pytest.raises(ValueError, match=rf"^roi_size must be three positive ints, got {re.escape(str(size))}$"):
            RoiCrop(size)
    for centre in ((0.5, 0.5), (0.5, 1.2, 0.5), (-0.1, 0.5, 0.5)):
        with pytest.raises(ValueError, match=rf"^roi_center must be three fractions in \[0, 1\], got "
                                             rf"{re.escape(str(centre))}$"):
            RoiCrop((8, 8, 8), centre)


def test_validation_and_test_loaders_serve_one_subject_at_a_time_in_split_order(tiny_cohort, tmp_path):
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", augment=1.0))
    dm.prepare_data()
    dm.setup("fit")
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        served = [batch["subject_id"] for batch in loader]
        assert served == [[sid] for sid in dm.subject_ids(split)]


@pytest.mark.not_in_mutation_run
def test_the_default_cohort_is_generated_with_the_datamodules_synthetic_settings(tmp_path):
    from data_modules.synthetic import cohort_fingerprint, make_cohort

    dm = FemurDataModule(**dict(tiny_data_args(None, tmp_path / "splits"), manifest=None,
                                synthetic_dir=str(tmp_path / "default"), synthetic_subjects=2, synthetic_seed=5,
                                n_folds=2, strata=[]))
    dm.prepare_data()
    assert dm.manifest_path == tmp_path / "default" / "manifest.csv"
    expected = make_cohort(tmp_path / "expected", n_subjects=2, seed=5)
    assert cohort_fingerprint(dm.manifest_path) == cohort_fingerprint(expected)


def test_preprocessing_resamples_to_the_target_spacing_and_cuts_the_roi_at_its_centre():
    """Without a locator the ROI sits at ``roi_center`` (the same box RoiCrop cuts alone); a locator is used only
    when there is an ROI to place."""
    x = np.arange(40, dtype=np.float32)[:, None, None] * np.ones((1, 20, 20), np.float32)
    subject = tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(x * 40.0 - 200.0)[None],
                                                affine=np.diag([2.0, 2.0, 2.0, 1.0])))
    out = preprocessing((4.0, 4.0, 4.0), (4, 4, 4), (0.25, 0.5, 0.5))(subject)
    assert out["image"].spacing == (4.0, 4.0, 4.0) and out["image"].spatial_shape == (4, 4, 4)
    alone = RoiCrop((4, 4, 4), (0.25, 0.5, 0.5))(tio.Resample(4.0)(tio.RescaleIntensity(
        (0.0, 1.0), in_min_max=(-200.0, 1800.0))(tio.Clamp(-200.0, 1800.0)(subject))))
    assert np.allclose(out["image"].affine, alone["image"].affine)
    assert torch.allclose(out["image"].data, alone["image"].data)
    assert not any(type(t).__name__ == "LocateFemur"
                   for t in preprocessing(None, None, None, locator=object()).transforms)


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


@pytest.mark.mutation_target("augmentation")
def test_augmentation_ranges_scale_with_strength_and_zero_turns_it_off():
    """``--data.augment`` scales every range of the documented recipe (affine ±8% scale, ±8°, ±6 mm, padded with the
    image minimum, p 0.8; gamma ±0.15 log, p 0.5; noise std up to 0.02, p 0.5): half the strength, half the ranges,
    same probabilities; 0 (or less) is no augmentation, and the default strength is 1."""
    from data_modules.transforms import augmentation

    def recipe(strength=None):
        affine, gamma, noise = (augmentation() if strength is None else augmentation(strength)).transforms
        assert (type(affine), type(gamma), type(noise)) == (tio.RandomAffine, tio.RandomGamma, tio.RandomNoise)
        return {"scales": affine.scales, "degrees": affine.degrees, "translation": affine.translation,
                "pad": affine.default_pad_value, "gamma": gamma.log_gamma_range, "noise": noise.std_range,
                "p": (affine.probability, gamma.probability, noise.probability)}

    full = recipe(1.0)
    assert full == {"scales": (0.92, 1.08) * 3, "degrees": (-8.0, 8.0) * 3, "translation": (-6.0, 6.0) * 3,
                    "pad": "minimum", "gamma": (-0.15, 0.15), "noise": (0.0, 0.02), "p": (0.8, 0.5, 0.5)}
    assert recipe() == full
    half = recipe(0.5)
    assert half["scales"] == pytest.approx((0.96, 1.04) * 3) and half["degrees"] == (-4.0, 4.0) * 3
    assert half["translation"] == (-3.0, 3.0) * 3 and half["gamma"] == pytest.approx((-0.075, 0.075))
    assert half["noise"] == pytest.approx((0.0, 0.01)) and half["p"] == full["p"] and half["pad"] == "minimum"
    assert augmentation(0.0) is None and augmentation(-1.0) is None and augmentation(1e-3) is not None
