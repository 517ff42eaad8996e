"""What evaluate, compare and predict read from a run folder, on hand-made checkpoints (no training): the epoch, stage
and data record of a checkpoint, which checkpoint stands for a run, the run's name, fold, cohort and subjects."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
import torchio as tio
import yaml

from stvnet.evaluation import cohort_table, describe_run, run_subjects
from stvnet.inference import (
    Predictor,
    ensemble_probabilities,
    ensemble_segment,
    find_checkpoint,
    largest_component,
    pick_device,
    read_checkpoint_info,
)
from tests.conftest import FixedPredictor

SUBJECTS = {"train": ["s1", "s2"], "val": ["s3"], "test": ["s4"]}
SCHEDULE = {"StageSchedule": {"stages": [{"name": "vnet"}, {"name": "stn"}, {"name": "finetune"}]}}


def write_checkpoint(path: Path, epoch: int = 4, stage: tuple[int, str] | None = (2, "finetune"), **hparams) -> Path:
    """A checkpoint with what stvnet train records (no weights)."""
    ckpt = {"epoch": epoch, "state_dict": {}, "datamodule_hyper_parameters": {"fold": 1, "cohort": "all", **hparams},
            "FemurDataModule": {"key": "k", "fold": 1, "subjects": SUBJECTS}}
    if stage is not None:
        ckpt["stvnet_stage"] = {"index": stage[0], "name": stage[1]}
        ckpt["callbacks"] = SCHEDULE
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


def test_checkpoint_info_reads_epoch_stage_and_data_record(tmp_path):
    info = read_checkpoint_info(write_checkpoint(tmp_path / "a.ckpt", epoch=7, stage=(2, "finetune"), roi_size=[8, 8, 8]))
    assert (info.epoch, info.stage, info.final_stage) == (7, "finetune", True)
    assert info.data_hparams == {"fold": 1, "cohort": "all", "roi_size": [8, 8, 8]}
    assert info.split == {"key": "k", "fold": 1, "subjects": SUBJECTS}
    assert info.path == tmp_path / "a.ckpt"
    early = read_checkpoint_info(write_checkpoint(tmp_path / "b.ckpt", stage=(1, "stn")))
    assert (early.stage, early.final_stage) == ("stn", False)
    plain = read_checkpoint_info(write_checkpoint(tmp_path / "c.ckpt", stage=None))
    assert (plain.stage, plain.final_stage) == ("single", True)


def test_a_run_is_judged_by_its_latest_final_stage_best_else_last(tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    write_checkpoint(folder / "last.ckpt", stage=(2, "finetune"))
    write_checkpoint(folder / "best-epoch001.ckpt", epoch=1, stage=(0, "vnet"))
    assert find_checkpoint(tmp_path / "run") == folder / "last.ckpt"  # no best from the final stage yet
    write_checkpoint(folder / "best-epoch005.ckpt", epoch=5)
    write_checkpoint(folder / "best-epoch009.ckpt", epoch=9)
    assert find_checkpoint(tmp_path / "run") == folder / "best-epoch009.ckpt"
    assert find_checkpoint(folder / "best-epoch005.ckpt") == folder / "best-epoch005.ckpt"  # a file is itself
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"empty: no checkpoint found \(expected .*best-\*\.ckpt or last\.ckpt"):
        find_checkpoint(tmp_path / "empty")


def _run_folder(tmp_path: Path, name: str | None, cohort: str = "all", splits: dict | None = None) -> Path:
    run = tmp_path / "runs" / "exp" / cohort / "fold1" / "20260101-000000"
    write_checkpoint(run / "checkpoints" / "last.ckpt", cohort=cohort, manifest="from-hparams.csv")
    if name is not None:
        (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": name}}))
    if splits is not None:
        (run / "splits.json").write_text(json.dumps(splits))
    return run


def test_describe_run_names_the_model_and_reads_its_own_splits(tmp_path):
    folds = [{"train": ["a"], "val": ["b"]}, {"train": ["c", "d"], "val": ["e"]}]
    run = _run_folder(tmp_path, "stvnet", cohort="male",
                      splits={"folds": folds, "test": ["t"], "fold": 1, "manifest": "/data/m.csv"})
    info = describe_run(run)
    assert info.model == "stvnet-male"  # sex-specific models are models of their own
    assert (info.fold, info.cohort, info.epoch, info.stage) == (1, "male", 4, "finetune")
    assert info.checkpoint == run / "checkpoints" / "last.ckpt"
    assert info.subjects == {"train": ["c", "d"], "val": ["e"], "test": ["t"]}  # fold 1 of the run's splits.json
    assert info.manifest == "/data/m.csv"
    assert describe_run(_run_folder(tmp_path / "b", "vnet")).model == "vnet"


def test_run_without_config_is_named_by_its_folder_and_falls_back_to_the_checkpoint_record(tmp_path):
    run = _run_folder(tmp_path, None)
    info = describe_run(run)
    assert info.model == "exp"  # runs/<name>/<cohort>/fold<k>/<time>
    assert info.subjects == SUBJECTS and info.manifest == "from-hparams.csv"
    bare = tmp_path / "bare.ckpt"
    torch.save({"epoch": 0, "state_dict": {}, "datamodule_hyper_parameters": {"fold": 0}}, bare)
    with pytest.raises(FileNotFoundError, match="neither .*splits.json nor the checkpoint records the run's subjects"):
        run_subjects(tmp_path, read_checkpoint_info(bare))


def test_cohort_table_refuses_a_manifest_without_the_runs_subjects(tiny_cohort, tmp_path):
    table = pd.read_csv(tiny_cohort)
    men = table[table["sex"] == "M"]["subject_id"].tolist()
    run = _run_folder(tmp_path, "vnet", cohort="male",
                      splits={"folds": [{"train": men[2:], "val": men[1:2]}], "test": men[:1], "fold": 0,
                              "manifest": str(tiny_cohort)})
    rows = cohort_table(describe_run(run), None)
    assert sorted(rows.index) == sorted(men)  # the run's cohort only, indexed by subject
    missing = _run_folder(tmp_path / "x", "vnet", splits={"folds": [{"train": [], "val": ["ghost"]}], "test": [],
                                                          "fold": 0, "manifest": str(tiny_cohort)})
    with pytest.raises(ValueError, match=r"1 subject\(s\) of run .* are not in this manifest \(e\.g\. ghost\)"):
        cohort_table(describe_run(missing), None)


def test_ensemble_thresholds_the_mean_and_optionally_keeps_the_largest_island():
    a = np.zeros((6, 6, 6), np.float32)
    a[0:2, 0:2, 0:2] = 0.9  # big island
    a[5, 5, 5] = 0.9  # stray voxel
    b = a.copy()
    b[0, 0, 0] = 0.0  # mean 0.45 there: below 0.5
    mask, affine = ensemble_segment([FixedPredictor(a), FixedPredictor(b)], "scan.nii.gz")
    assert mask.dtype == np.uint8 and mask.sum() == 8 and mask[0, 0, 0] == 0 and np.array_equal(affine, np.eye(4))
    assert ensemble_segment([FixedPredictor(a), FixedPredictor(b)], "scan.nii.gz", threshold=0.4)[0].sum() == 9
    kept, _ = ensemble_segment([FixedPredictor(a), FixedPredictor(b)], "scan.nii.gz", keep_largest=True)
    assert kept.sum() == 7 and kept[5, 5, 5] == 0
    with pytest.raises(ValueError, match="^an ensemble needs at least one checkpoint$"):
        ensemble_segment([], "scan.nii.gz")


def test_device_choice():
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("meta") == torch.device("meta")


def test_largest_component_is_26_connected_and_keeps_a_single_island_whole():
    single = np.zeros((5, 5, 5), np.uint8)
    single[1:3, 1:3, 1:3] = 1
    single[3, 3, 3] = 1  # touches the cube only at a corner: the same 26-connected island
    kept = largest_component(single)
    assert kept.dtype == np.uint8 and np.array_equal(kept, single)
    two = single.copy()
    two[0, 4, 4] = 1
    kept = largest_component(two)
    assert kept.dtype == np.uint8 and np.array_equal(kept, single)
    assert largest_component(np.zeros((3, 3, 3), np.uint8)).sum() == 0
    specks = np.zeros((5, 5, 5), np.uint8)
    specks[0, 0, 0] = specks[4, 4, 4] = 1  # two islands of one voxel: one of them, never the background
    assert largest_component(specks).sum() == 1 and largest_component(specks)[0, 0, 0] == 1


def test_segment_thresholds_strictly_at_the_models_threshold_unless_told_otherwise():
    prob = np.array([0.2, 0.5, 0.7, 0.9], np.float32).reshape(1, 1, 4)
    predictor = Predictor(model=SimpleNamespace(threshold=0.7), data_hparams={})
    predictor.original_probabilities = lambda scan, locations=None: (prob, np.eye(4))
    mask, affine = predictor.segment("scan.nii.gz")
    assert mask.dtype == np.uint8 and mask.ravel().tolist() == [0, 0, 0, 1] and np.array_equal(affine, np.eye(4))
    assert predictor.segment("scan.nii.gz", threshold=0.5)[0].ravel().tolist() == [0, 0, 1, 1]
    half = ensemble_segment([FixedPredictor(prob)], "scan.nii.gz")[0]
    assert half.dtype == np.uint8 and half.ravel().tolist() == [0, 0, 1, 1]  # 0.5 is not above 0.5


def test_probabilities_come_back_on_the_scans_own_grid_as_float32(tmp_path):
    """The network's probabilities (here a known map on a coarser, shifted grid) are resampled linearly onto the
    scan's grid and returned as float32 (a clinical scan's float64 map would double the memory of every ensemble
    member), with the scan's affine."""

    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = (-5.0, 3.0, 10.0)
    nib.save(nib.Nifti1Image(np.zeros((8, 6, 4), np.int16), affine), tmp_path / "scan.nii.gz")
    coarse = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    coarse[:3, 3] += 0.5
    ramp = torch.linspace(0, 1, 4).reshape(4, 1, 1).expand(4, 3, 2).contiguous()[None]
    predictor = Predictor(model=SimpleNamespace(threshold=0.5), data_hparams={})
    predictor.probabilities = lambda image, locations=None: tio.ScalarImage(tensor=ramp, affine=coarse)
    prob, out_affine = predictor.original_probabilities(tmp_path / "scan.nii.gz")
    assert prob.dtype == np.float32 and prob.shape == (8, 6, 4) and np.allclose(out_affine, affine)
    # linear along the first axis: scan voxel i sits at coarse voxel (i - 0.5) / 2, where the ramp is that / 3
    inside = prob[1:7, 1:5, 1:3]
    expected = np.clip((np.arange(1, 7) - 0.5) / 2 / 3, 0, 1)
    assert np.allclose(inside, expected[:, None, None], atol=1e-5)


def test_a_checkpoint_outside_its_run_folder_is_named_by_its_file_and_read_from_its_own_record(tmp_path,
                                                                                             monkeypatch):
    """A .ckpt someone sent (in the working folder, beside another run's splits.json and config.yaml): named by its
    file, its fold, cohort and subjects from the checkpoint itself; one without data settings is one line."""
    monkeypatch.chdir(tmp_path)
    write_checkpoint(Path("femur-model.ckpt"), cohort="female", manifest="from-hparams.csv")
    (tmp_path / "splits.json").write_text(json.dumps({"folds": [{"train": ["x"], "val": ["y"]}], "test": ["z"],
                                                      "fold": 0, "manifest": "other.csv"}))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "other"}}))
    info = describe_run("femur-model.ckpt")
    assert (info.model, info.fold, info.cohort) == ("femur-model-female", 1, "female")
    assert info.subjects == SUBJECTS and info.manifest == "from-hparams.csv"
    torch.save({"epoch": 0, "state_dict": {}, "FemurDataModule": {"subjects": SUBJECTS}}, tmp_path / "bare.ckpt")
    with pytest.raises(FileNotFoundError, match=r"bare\.ckpt: records no data settings \(fold, cohort\); evaluate a "
                                                r"checkpoint written by stvnet train$"):
        describe_run("bare.ckpt")
    torch.save({"epoch": 0, "state_dict": {}, "datamodule_hyper_parameters": {"fold": 0}}, tmp_path / "empty.ckpt")
    with pytest.raises(FileNotFoundError, match=r"empty\.ckpt: neither a run folder nor the checkpoint records the "
                                                r"run's subjects; evaluate the run folder written by stvnet train$"):
        run_subjects(None, read_checkpoint_info(tmp_path / "empty.ckpt"))


def test_a_run_folder_given_as_a_short_relative_path_is_named_by_its_experiment_folder(tmp_path, monkeypatch):
    """<name>/<cohort>/fold<k>/<time>, relative to the working folder (four parts): named <name>."""
    monkeypatch.chdir(tmp_path)
    write_checkpoint(Path("exp/all/fold1/t/checkpoints/last.ckpt"))
    assert describe_run("exp/all/fold1/t").model == "exp"


def test_a_run_of_the_default_cohort_reads_the_manifest_under_its_synthetic_dir(tiny_cohort, tmp_path):
    """No manifest recorded anywhere (the run used the embedded cohort): the manifest under the run's synthetic_dir,
    restricted to the run's sub-cohort."""
    table = pd.read_csv(tiny_cohort)
    women = table[table["sex"] == "F"]["subject_id"].tolist()
    subjects = {"train": women[2:], "val": women[1:2], "test": women[:1]}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"epoch": 3, "state_dict": {}, "FemurDataModule": {"key": "k", "fold": 0, "subjects": subjects},
                "datamodule_hyper_parameters": {"fold": 0, "cohort": "female", "manifest": None,
                                                "synthetic_dir": str(tiny_cohort.parent)}}, ckpt)
    info = describe_run(ckpt)
    assert info.manifest == ""
    assert sorted(cohort_table(info, None).index) == sorted(women)


def test_a_checkpoint_that_cannot_place_its_roi_or_is_not_a_stvnet_model_is_one_line(tmp_path):
    """Refused before any weights are read: a template-located model without its template; refused with the
    loader's exception named: a checkpoint whose hyper-parameters build no stvnet model."""
    from data_modules.errors import UserError

    no_template = write_checkpoint(tmp_path / "a.ckpt", roi_locator="template")
    with pytest.raises(UserError, match=r"a\.ckpt: trained with --data\.roi_locator template but holds no femur "
                                        r"template; retrain it"):
        Predictor.from_checkpoint(no_template, device="cpu")
    other = write_checkpoint(tmp_path / "b.ckpt", roi_locator="fraction")
    with pytest.raises(UserError, match=r"b\.ckpt: not a checkpoint of a stvnet model \(KeyError: "
                                        r".pytorch-lightning_version.\); give a \.ckpt written by stvnet train"):
        Predictor.from_checkpoint(other)  # the default device: this machine's


class _Pickled:
    """An arbitrary object a checkpoint could smuggle in (weights_only loading must refuse to build it)."""


def test_checkpoint_reads_refuse_pickled_objects_and_non_checkpoints_and_notice_a_rewritten_file(tmp_path):

    from data_modules.errors import UserError

    torch.save({"state_dict": {}, "obj": _Pickled()}, tmp_path / "pickled.ckpt")
    with pytest.raises(UserError, match=r"pickled\.ckpt: not a readable checkpoint \(UnpicklingError: Weights only "
                                        r"load failed\.[^\n\x1b]*\); give a \.ckpt written by stvnet train, or its "
                                        r"run folder$") as refused:
        read_checkpoint_info(tmp_path / "pickled.ckpt")
    assert "\n" not in str(refused.value)  # one line, without torch's terminal colours
    torch.save(torch.zeros(3), tmp_path / "tensor.ckpt")
    with pytest.raises(UserError, match=r"tensor\.ckpt: not a Lightning checkpoint \(no state_dict\)"):
        read_checkpoint_info(tmp_path / "tensor.ckpt")
    path = write_checkpoint(tmp_path / "run.ckpt", epoch=4)
    assert read_checkpoint_info(path).epoch == 4
    write_checkpoint(path, epoch=5)  # same size on disk, newer time: read again
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert read_checkpoint_info(path).epoch == 5
    write_checkpoint(path, epoch=6, roi_size=[8, 8, 8])  # another size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # even with the same time
    assert read_checkpoint_info(path).epoch == 6


def test_a_checkpoint_that_does_not_exist_is_named_in_one_line(tmp_path):
    from data_modules.errors import UserError

    with pytest.raises(UserError, match=r"missing\.ckpt: not a readable checkpoint \(FileNotFoundError"):
        read_checkpoint_info(tmp_path / "missing.ckpt")


@pytest.mark.mutation_target("from_checkpoint")
def test_a_template_located_checkpoint_predicts_with_its_own_template(trained_runs):
    """A checkpoint trained with --data.roi_locator template places new scans' ROIs with the template it stored (not
    the fixed-fraction box), on the device asked for."""
    ckpt = find_checkpoint(trained_runs["vnet"])
    info = read_checkpoint_info(ckpt)
    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    assert info.data_hparams["roi_locator"] == "template" and predictor.locator is not None
    assert np.array_equal(predictor.locator.template, info.locator.template)
    assert predictor.data_hparams == info.data_hparams and str(predictor.device) == "cpu"


def test_ensemble_probability_is_the_mean_of_its_members():
    a = np.array([0.9, 0.3, 0.6, 0.0], dtype=np.float32)
    b = np.array([0.2, 0.3, 0.0, 0.0], dtype=np.float32)
    c = np.array([0.4, 0.3, 0.9, 0.0], dtype=np.float32)
    prob, _ = ensemble_probabilities([FixedPredictor(a), FixedPredictor(b), FixedPredictor(c)], "scan.nii.gz")
    assert prob == pytest.approx((a + b + c) / 3)
    mask, _ = ensemble_segment([FixedPredictor(a), FixedPredictor(b)], "scan.nii.gz", threshold=0.5)
    assert mask.tolist() == [1, 0, 0, 0]  # means 0.55, 0.3, 0.3, 0: neither the last member alone nor the sum
