"""Write a run's bookkeeping files (the splits it trained on) into its run folder."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger


class RunFiles(Callback):
    """On fit start (rank 0), copy the datamodule's splits JSON into the run folder (and W&B, as an artifact)."""

    def __init__(self, run_dir: str):
        super().__init__()
        self.run_dir = Path(run_dir)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if not trainer.is_global_zero or datamodule is None or not hasattr(datamodule, "save_splits"):
            return
        path = datamodule.save_splits(self.run_dir)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                artifact = wandb.Artifact(f"splits-{logger.experiment.id}", type="splits")
                artifact.add_file(str(path))
                logger.experiment.log_artifact(artifact)
