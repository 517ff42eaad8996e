"""Write a run's bookkeeping files (the splits it trained on) into its run folder."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback


class RunFiles(Callback):
    """On fit start (rank 0), copy the datamodule's splits JSON into the run folder."""

    def __init__(self, run_dir: str):
        super().__init__()
        self.run_dir = Path(run_dir)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if trainer.is_global_zero and datamodule is not None and hasattr(datamodule, "save_splits"):
            datamodule.save_splits(self.run_dir)
