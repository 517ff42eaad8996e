"""Callbacks that record what happens inside a (possibly multi-process) training run, for the tests to inspect.

They are added to a real ``stvnet train`` from the command line (``--trainer.callbacks+=tests.ddp_probe.X``), so
every DDP rank, including those Lightning's launcher starts, writes its own files.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback


class StageSnapshots(Callback):
    """Per rank: the network's parameters and buffers at the start and after every training epoch, the stage of each
    epoch, and the learning rate in use at every step (``<out>/rank<r>.pt``)."""

    def __init__(self, out: str):
        super().__init__()
        self.out = Path(out)
        self.record: dict = {"states": {}, "stage": {}, "lr": {}}

    def _snapshot(self, pl_module: L.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["states"]["init"] = self._snapshot(pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.record["lr"][trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["states"][trainer.current_epoch] = self._snapshot(pl_module)
        self.record["stage"][trainer.current_epoch] = pl_module.stage.name

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.out / f"rank{trainer.global_rank}.pt")


class KillAtEpoch(Callback):
    """``kill -9`` this process when training epoch ``epoch`` starts (after the previous epoch's checkpoints)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            os.kill(os.getpid(), signal.SIGKILL)
