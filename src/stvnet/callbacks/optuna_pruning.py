"""Report validation scores to an Optuna trial from inside a training process, and prune under DDP.

The sweep worker samples a trial's parameters *before* launching training (so every DDP rank reads the same
config file) and passes the storage URL, study name and trial number here. Only rank 0 talks to Optuna; its
pruning decision is broadcast so every rank stops together. A pruned run leaves ``pruned.json`` in its run
folder for the worker to record the trial as PRUNED.

Why not ``optuna_integration.PyTorchLightningPruningCallback``: under DDP it accepts only an RDB storage (it checks
for ``RDBStorage`` behind the study and refuses others), while these sweeps default to Optuna's journal file so that
several local workers share a study without a database server; it also expects the trial object of the launching
process, where here each training is a subprocess (or several DDP ranks) that reattaches to its trial by number, and
it is written against the ``pytorch_lightning`` package rather than ``lightning``.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class OptunaPruning(Callback):
    """Report ``monitor`` after each validation epoch to trial ``trial_number`` of ``study_name``."""

    def __init__(self, storage: str, study_name: str, trial_number: int, run_dir: str, monitor: str = "val/dice",
                 pruner: dict | None = None):
        super().__init__()
        self.pruner = pruner or {"name": "median"}  # storages do not keep the pruner: the sweep passes its spec
        self.storage = storage
        self.study_name = study_name
        self.trial_number = trial_number
        self.run_dir = Path(run_dir)
        self.monitor = monitor
        self._trial = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            from stvnet.studies import open_trial  # optuna is loaded by the runs that report to a study only

            self._trial = open_trial(self.storage, self.study_name, self.trial_number, self.pruner)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero and self._trial is not None:
            score = trainer.callback_metrics.get(self.monitor)
            if score is not None:
                self._trial.report(float(score), step=trainer.current_epoch)
                prune = self._trial.should_prune()
        prune = trainer.strategy.broadcast(prune)
        if prune:
            trainer.should_stop = True
            if trainer.is_global_zero:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "pruned.json").write_text(json.dumps({"epoch": trainer.current_epoch}))
