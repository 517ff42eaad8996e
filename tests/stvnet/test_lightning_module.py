"""The LightningModule (stvnet/lightning_module.py): the spacing validation metrics get, the stage a checkpoint
restores."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import stvnet.evaluation
import stvnet.validation_rows
from data_modules.datamodule import FemurDataModule
from stvnet.callbacks import Stage, StageSchedule
from stvnet.lightning_module import FemurSegmenter
from stvnet.metrics import evaluate_case
from stvnet.models import STVNet, VNet
from tests.conftest import SpacingRecorder, tiny_data_args


def test_validation_metrics_get_the_roi_spacing_in_array_order(tiny_cohort, tmp_path, monkeypatch):
    recorder = SpacingRecorder(evaluate_case)
    monkeypatch.setattr(stvnet.validation_rows, "evaluate_case", recorder)
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits", target_spacing=(3.0, 4.0, 5.0)))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2)
    trainer.validate(FemurSegmenter(VNet(base_channels=4, depth=2, kernel_size=3)), datamodule=dm)
    assert recorder.spacings == [pytest.approx((3.0, 4.0, 5.0))] * 2


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
