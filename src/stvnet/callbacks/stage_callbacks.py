"""Multi-stage training as a callback: each stage says which parts train, for how long, at which rate,
and with which loss terms.

The paper trains ST-V-Net in several stages; the default schedule (``experiments/stvnet.yaml``) is
(1) V-Net alone, (2) the STN (and fusion) with the V-Net frozen so the prior learns to align, (3) everything
at a lower learning rate. The schedule hands the LightningModule an :class:`~stvnet.stages.ActiveStage` (a typed
record, no string keys); the module freezes the parts the stage does not train (the network declares its parts,
``parts()``) with Lightning's ``BaseFinetuning.freeze``/``make_trainable`` when it builds its optimiser, and on a
stage change the optimiser and scheduler are rebuilt for the new trainable parameters. Freezing is done there rather
than by subclassing ``BaseFinetuning`` because that callback adds parameter groups to a live optimiser, while a stage
here also changes the rate, the warm-up and the loss terms, and a resumed run must rebuild its optimiser for the
restored stage before Lightning restores the optimiser state. The stage index and the stage lengths in force are checkpointed, so a run resumed
mid-stage continues that stage even when it is resumed with another ``max_epochs``.

Under DDP, the parameters of frozen parts get no gradient: the strategy must detect unused parameters
(``stvnet train`` picks ``ddp_find_unused_parameters_true`` for staged runs; see the README for its cost).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from stvnet.models.protocol import BACKBONE
from stvnet.stages import ActiveStage, Stage


class StageSchedule(Callback):
    """Switch training stages at epoch boundaries (the last stage continues if training runs longer).

    With ``scale_to_max_epochs`` the stage lengths are proportions: when ``trainer.max_epochs`` differs from
    their sum they are rescaled (each at least one epoch), so ``--trainer.max_epochs 6`` still runs every stage.
    """

    def __init__(self, stages: list[Stage], scale_to_max_epochs: bool = False):
        super().__init__()
        self.scale_to_max_epochs = scale_to_max_epochs
        # copies: rescaling and resuming set their lengths, which must not leak into the caller's Stage objects
        stages = [copy.deepcopy(s) if isinstance(s, Stage) else Stage(**s) for s in stages]
        if not stages:
            raise ValueError("StageSchedule needs at least one stage")
        for s in stages:
            if s.epochs < 1:
                raise ValueError(f"stage '{s.name}': epochs must be >= 1, got {s.epochs}")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        self.stages = stages
        self.base_epochs = [s.epochs for s in stages]  # the configured proportions
        self._set_starts()

    @property
    def freezes_parts(self) -> bool:
        """Whether some stage trains only some parts (then DDP must tolerate parameters without gradients)."""
        return any(s.train is not None for s in self.stages)

    @property
    def final_index(self) -> int:
        """Index of the last stage (the one whose checkpoints are the model being compared)."""
        return len(self.stages) - 1

    def _set_starts(self) -> None:
        self.starts = [sum(s.epochs for s in self.stages[:i]) for i in range(len(self.stages))]

    def rescale(self, max_epochs: int) -> None:
        """Scale stage lengths to sum to ``max_epochs`` (largest remainders; every stage keeps >= 1 epoch)."""
        if max_epochs < len(self.stages):
            raise ValueError(f"max_epochs={max_epochs} cannot hold {len(self.stages)} stages")
        total = sum(self.base_epochs)
        raw = [n * max_epochs / total for n in self.base_epochs]
        lengths = [max(1, int(r)) for r in raw]
        order = sorted(range(len(raw)), key=lambda i: raw[i] - int(raw[i]), reverse=True)
        i = 0
        while sum(lengths) < max_epochs:
            lengths[order[i % len(order)]] += 1
            i += 1
        while sum(lengths) > max_epochs:
            j = max(range(len(lengths)), key=lambda k: lengths[k])
            lengths[j] -= 1
        for stage, n in zip(self.stages, lengths):
            stage.epochs = n
        self._set_starts()

    @property
    def total_epochs(self) -> int:
        """Epochs needed to run every stage once."""
        return sum(s.epochs for s in self.stages)

    def index_for_epoch(self, epoch: int) -> int:
        """Stage index active at ``epoch`` (0-based)."""
        index = 0
        for i, start in enumerate(self.starts):
            if epoch >= start:
                index = i
        return index

    def active(self, index: int, base_lr: float) -> ActiveStage:
        """Stage ``index`` as the LightningModule trains it (its rate resolved against ``base_lr``)."""
        return ActiveStage.of(self.stages[index], index, base_lr)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        parts = set(pl_module.parts())
        for s in self.stages:
            unknown = set(s.train or []) - parts
            if unknown:
                raise ValueError(f"stage '{s.name}' trains unknown parts {sorted(unknown)}; this network has {sorted(parts)}")
            unknown = set(s.part_lr_scale) - parts
            if unknown:
                raise ValueError(f"stage '{s.name}': part_lr_scale names unknown parts {sorted(unknown)}; "
                                 f"this network has {sorted(parts)}")
        if (self.scale_to_max_epochs and not trainer.fast_dev_run and trainer.max_epochs and trainer.max_epochs > 0
                and trainer.max_epochs != self.total_epochs):
            self.rescale(trainer.max_epochs)
            rank_zero_info("Stage lengths scaled to max_epochs: " + ", ".join(f"{s.name} x{s.epochs}" for s in self.stages))
        if not trainer.fast_dev_run and trainer.max_epochs is not None and 0 < trainer.max_epochs < self.total_epochs:
            rank_zero_warn(
                f"trainer.max_epochs={trainer.max_epochs} ends training before the last stage "
                f"(the stages need {self.total_epochs} epochs)"
            )
        # stage 0 unless a checkpoint being resumed restores another one (restored after setup)
        pl_module.set_stage(self.active(0, pl_module.lr))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wrapped = trainer.strategy.model
        if isinstance(wrapped, DistributedDataParallel) and self.freezes_parts and not wrapped.find_unused_parameters:
            raise ValueError(
                "the stage schedule freezes parts of the network, whose parameters then get no gradient, but this DDP "
                "strategy does not look for unused parameters: use --trainer.strategy ddp (stvnet train picks "
                "ddp_find_unused_parameters_true for staged runs) or DDPStrategy(find_unused_parameters=True)"
            )
        s = pl_module.stage
        fresh = trainer.current_epoch == 0 and not trainer.ckpt_path
        if fresh and not s.trains(BACKBONE) and not pl_module.hparams.get("init_weights"):
            raise ValueError(
                f"stage '{s.name}' freezes the backbone from the first epoch, but it was never trained: pass "
                f"--model.init_weights <a trained backbone's checkpoint>, or start with a stage that trains {BACKBONE}"
            )
        rank_zero_info(
            f"==> epoch {trainer.current_epoch}: stage {s.index} '{s.name}' (train {list(s.train or []) or 'all'}, "
            f"lr {s.lr:.2e}, losses {s.loss_weights}); schedule: "
            + ", ".join(f"{st.name} x{st.epochs}" for st in self.stages)
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        index = self.index_for_epoch(trainer.current_epoch)
        if index == pl_module.stage.index:
            return
        pl_module.set_stage(self.active(index, pl_module.lr))
        trainer.strategy.setup_optimizers(trainer)  # new trainable set, fresh optimiser state and schedule
        s = pl_module.stage
        rank_zero_info(
            f"==> epoch {trainer.current_epoch}: stage switch to {index} '{s.name}' (train "
            f"{list(s.train or []) or 'all'}, lr {s.lr:.2e}, losses {s.loss_weights})"
        )

    def state_dict(self) -> dict[str, Any]:
        # the active stage lives in the LightningModule's checkpoint; this records the schedule in force
        return {"stages": [asdict(s) for s in self.stages]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume, keep the stage lengths the run was trained with (a new ``max_epochs`` must not move the stage
        boundaries under a run; epochs beyond the schedule continue its last stage)."""
        saved = state_dict.get("stages") or []
        if [s.get("name") for s in saved] != [s.name for s in self.stages]:
            raise ValueError(f"the checkpoint was trained with stages {[s.get('name') for s in saved]}, this schedule "
                             f"has {[s.name for s in self.stages]}: resume with the run's own config.yaml")
        for stage, old in zip(self.stages, saved):
            stage.epochs = int(old["epochs"])
        self._set_starts()
        rank_zero_info("Stage lengths restored from the checkpoint: " + ", ".join(f"{s.name} x{s.epochs}" for s in self.stages))
