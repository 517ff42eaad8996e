"""Per-epoch seeding, so a run resumed from a checkpoint trains exactly as the uninterrupted run would have.

Lightning seeds once per process: after a resume, the random streams that shuffle the training set and draw the
augmentations start from another state, and the resumed run drifts from the one it replaces. Here Python, NumPy
and torch are seeded from ``(seed, epoch, rank)`` just before each epoch's training loader is started: at the end
of the previous epoch, or, in a resumed process, when the checkpoint is restored (Lightning starts the first
loader of a process before any epoch hook runs). Each epoch's shuffling and augmentations are then a function of
its number alone. DataLoader workers take their seeds from these streams when they start, which is why the
datamodule starts fresh workers each epoch (no ``persistent_workers``).

Under DDP, Lightning's ``DistributedSampler`` orders each epoch by its own ``set_epoch``; the first epoch after a
resume is ordered as epoch 0 (a Lightning limitation), so multi-process resumes are close, not bitwise equal.
"""

from __future__ import annotations

import os
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """A 32-bit seed derived from the run's seed, the epoch and the process rank (independent streams)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


class EpochSeed(Callback):
    """Seed Python, NumPy and torch for each training epoch from the run's seed and the epoch number.

    Args:
        seed: the run's seed; ``None`` takes the one ``seed_everything`` set (``PL_GLOBAL_SEED``, else 0).
    """

    def __init__(self, seed: int | None = None):
        super().__init__()
        self.seed = seed

    def seed_epoch(self, epoch: int, rank: int) -> None:
        base = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        value = epoch_seed(base, epoch, rank)
        random.seed(value)
        np.random.seed(value)
        torch.manual_seed(value)  # also seeds every CUDA device

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seed_epoch(trainer.current_epoch + 1, trainer.global_rank)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.seed_epoch(int(checkpoint.get("epoch", -1)) + 1, trainer.global_rank)
