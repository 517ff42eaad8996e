"""Runs own their evidence: the checkpoint that stands for a run comes from its final stage, its subjects come
from its own splits.json, and weights trained on other subjects cannot start a run that would then be judged on
scans those weights have seen."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch

from data_modules.datamodule import FemurDataModule
from stvnet.callbacks import FinalStageCheckpoint, Stage, StageSchedule
from stvnet.compare import best_epoch_row
from stvnet.evaluation import evaluate_runs
from stvnet.inference import find_checkpoint, read_checkpoint_info
from stvnet.lightning_module import FemurSegmenter
from stvnet.models import STVNet, VNet
from tests.conftest import tiny_data_args

STAGES = [Stage(name="vnet", epochs=1, train=["backbone"], loss_weights={"backbone": 1.0}),
          Stage(name="stn", epochs=1, train=["stn", "fusion"], loss_weights={"prior": 1.0, "seg": 1.0}),
          Stage(name="finetune", epochs=1, lr_scale=0.1)]


class DecliningDice(FemurSegmenter):
    """Validation Dice that falls every epoch: a plain ModelCheckpoint would keep the stage-1 (V-Net) epoch."""

    def on_validation_epoch_end(self) -> None:
        self.log("val/dice", 0.9 - 0.1 * self.current_epoch)


def _fit(tmp_path: Path, tiny_cohort: Path, checkpoint: L.Callback) -> Path:
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits"))
    net = STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4, 8))
    trainer = L.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_train_batches=1, limit_val_batches=1,
                        default_root_dir=str(tmp_path), callbacks=[StageSchedule(STAGES), checkpoint])
    trainer.fit(DecliningDice(net, lr=0.01), datamodule=dm)
    return Path(checkpoint.best_model_path)


@pytest.mark.slow
def test_best_checkpoint_of_a_staged_run_comes_from_its_final_stage(tiny_cohort, tmp_path):
    plain = _fit(tmp_path / "plain", tiny_cohort, L.pytorch.callbacks.ModelCheckpoint(monitor="val/dice", mode="max"))
    assert read_checkpoint_info(plain).stage == "vnet"  # what the old policy evaluated: the V-Net inside
    best = _fit(tmp_path / "final", tiny_cohort, FinalStageCheckpoint(monitor="val/dice", mode="max",
                                                                       dirpath=tmp_path / "run" / "checkpoints",
                                                                       filename="best-epoch{epoch:03d}"))
    info = read_checkpoint_info(best)
    assert (info.stage, info.epoch, info.final_stage) == ("finetune", 2, True)
    # a run folder holding an older stage-1 "best" still stands for its final stage
    shutil.copy(plain, tmp_path / "run" / "checkpoints" / "best-zzz-stage1.ckpt")
    assert find_checkpoint(tmp_path / "run") == best


def test_compare_picks_the_best_epoch_within_the_final_stage():
    val = pd.DataFrame({"epoch": [0, 1, 2, 3], "val/dice": [0.95, 0.90, 0.80, 0.85], "val/stage": [0, 1, 2, 2]})
    assert best_epoch_row(val, final_index=2)["epoch"] == 3
    assert best_epoch_row(val, final_index=None)["epoch"] == 0  # no schedule: every epoch counts
    assert best_epoch_row(val[val["epoch"] < 2], final_index=2)["epoch"] == 1  # never reached it: the last epoch


@pytest.mark.slow
def test_evaluate_takes_a_runs_subjects_from_its_own_splits_json(trained_runs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_runs["vnet"], run)
    record = json.loads((run / "splits.json").read_text())
    fold = record["folds"][0]
    moved = fold["val"][0]  # a record that recomputing the splits would not give back
    record["test"], fold["val"] = sorted(record["test"] + [moved]), fold["val"][1:]
    (run / "splits.json").write_text(json.dumps(record))
    monkeypatch.chdir(tmp_path)  # elsewhere: the run's splits_dir is a relative path that does not exist here
    table = evaluate_runs([run], tmp_path / "eval", splits=("test", "val"), save_masks=False, figures=False)
    assert sorted(table[table["split"] == "test"]["subject_id"]) == record["test"]
    assert sorted(table[table["split"] == "val"]["subject_id"]) == fold["val"]
    md = (tmp_path / "eval" / "summary.md").read_text()
    info = read_checkpoint_info(find_checkpoint(run))
    assert "## Checkpoints evaluated" in md and f"| vnet | 0 | single | {info.epoch} |" in md


def test_init_weights_trained_on_another_fold_is_refused(tiny_cohort, tmp_path):
    """A V-Net trained on fold 1 has seen fold 0's validation scans: it cannot start an ST-V-Net on fold 0."""
    def vnet_checkpoint(fold: int) -> Path:
        dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", fold=fold))
        source = FemurSegmenter(VNet(base_channels=4, depth=2, kernel_size=3))
        path = tmp_path / f"vnet_fold{fold}.ckpt"
        torch.save({"state_dict": source.state_dict(), "FemurDataModule": dm.state_dict()}, path)
        return path

    def start(init: Path) -> None:
        module = FemurSegmenter(STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4,)),
                                init_weights=str(init))
        trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            enable_checkpointing=False, num_sanity_val_steps=0, limit_train_batches=1,
                            limit_val_batches=1)
        trainer.fit(module, datamodule=FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", fold=0)))

    with pytest.raises(ValueError, match=r"trained on fold 1 .* saw [1-9]\d* of this run's validation/test subjects"):
        start(vnet_checkpoint(1))
    start(vnet_checkpoint(0))  # the same fold and splits: accepted
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": torch.load(vnet_checkpoint(0), weights_only=False)["state_dict"]}, bare)
    with pytest.raises(ValueError, match="records no training subjects"):
        start(bare)
