"""Checkpoint policy for staged runs: the *best* checkpoint is chosen among the epochs of the final stage.

With a plain ``ModelCheckpoint(monitor="val/dice")`` an ST-V-Net run's best epoch can fall in stage 1, where only
the V-Net inside trains: evaluating that checkpoint would compare a V-Net with a V-Net. This callback monitors like
``ModelCheckpoint`` but only during the last stage of the run's :class:`StageSchedule` (every epoch when there is
no schedule, e.g. the V-Net baseline), so every model is judged by the same rule: best validation score of the
model as finally configured. ``evaluate``, ``compare`` and ``predict`` pick checkpoints by the same rule.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from stvnet.callbacks.stage_callbacks import StageSchedule


def stage_schedule(trainer: L.Trainer) -> StageSchedule | None:
    """The trainer's stage schedule, if it has one."""
    return next((c for c in trainer.callbacks if isinstance(c, StageSchedule)), None)


class FinalStageCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that only considers epochs of the final training stage."""

    def _in_final_stage(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        schedule = stage_schedule(trainer)
        return schedule is None or pl_module.stage.index == schedule.final_index

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._in_final_stage(trainer, pl_module):
            super().on_train_epoch_end(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._in_final_stage(trainer, pl_module):
            super().on_validation_end(trainer, pl_module)
