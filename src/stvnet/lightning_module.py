"""LightningModule wiring a segmentation network (V-Net or ST-V-Net), its losses, optimiser and metrics.

The module holds the *current training setup* (which sub-networks train, the learning rate and the loss
weights). Stage callbacks change it; it is saved in checkpoints so a resumed run rebuilds the same
optimiser before Lightning restores the optimiser state.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any

import lightning as L
import pandas as pd
import torch
import torchio as tio
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from data_modules.folds import check_same_split
from stvnet.init_weights import load_backbone_weights
from stvnet.lightning_adapters import built_by_lightning_cli
from stvnet.losses import segmentation_loss, soft_dice_loss
from stvnet.prior_handover import hand_over_prior
from stvnet.schedules import warmup_cosine
from stvnet.models.protocol import BACKBONE
from stvnet.stages import STAGE_KEY, ActiveStage
from stvnet.validation_rows import case_rows, epoch_means, gather_unique

#: set while load_from_checkpoint rebuilds a module (its init_weights file is then not needed)
_RESTORING: ContextVar[bool] = ContextVar("stvnet_restoring", default=False)


class FemurSegmenter(L.LightningModule):
    """Train and validate a binary femur segmentation network on TorchIO batches.

    Args:
        net: a :class:`~stvnet.models.VNet` (returns logits) or :class:`~stvnet.models.STVNet` (returns a dict).
        lr: base learning rate (AdamW); stages may scale it.
        weight_decay: AdamW weight decay.
        loss: ``dice`` (paper) or ``dice_bce`` for the segmentation terms.
        loss_weights: weights of the loss terms ``seg``, ``backbone``, ``prior`` (default: ``seg`` only).
        scheduler: ``cosine`` (per step, annealed over the run or over each stage, after the stage's
            ``warmup_epochs`` of linear warm-up) or ``none``.
        threshold: probability above which a voxel is femur.
        prior_alignment: how the ST-V-Net shape prior is built from training labels (``roi`` or ``com``).
        surface_metrics: also compute HD95 and ASSD during validation (cheap on ROIs).
        init_weights: optional checkpoint whose ``net.*`` weights initialise this network (e.g. a trained
            V-Net's weights into ST-V-Net's ``backbone``); keys are matched after the ``net.`` prefix, and for an
            ST-V-Net also with ``backbone.`` prepended.
    """

    def __init__(
        self,
        net: nn.Module,
        lr: float = 3e-3,
        weight_decay: float = 1e-5,
        loss: str = "dice_bce",
        loss_weights: dict[str, float] | None = None,
        scheduler: str = "cosine",
        threshold: float = 0.5,
        prior_alignment: str = "roi",
        surface_metrics: bool = True,
        init_weights: str | None = None,
    ):
        super().__init__()
        # Under LightningCLI ``net`` is recorded as its class_path/init_args, so load_from_checkpoint rebuilds it
        # from the checkpoint alone. A module built in Python is not pickled into the hparams (checkpoints stay
        # loadable with weights_only); pass ``net=...`` to load_from_checkpoint for those.
        self.save_hyperparameters(ignore=[] if built_by_lightning_cli() else ["net"])
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay
        self.loss_kind = loss
        self.scheduler_kind = scheduler
        self.threshold = threshold
        self.prior_alignment = prior_alignment
        self.surface_metrics = surface_metrics
        # one stage for the whole run unless a StageSchedule sets others
        self.stage = ActiveStage(index=0, name="single", lr=lr, loss_weights=dict(loss_weights or {"seg": 1.0}))
        self._val_rows: list[dict[str, Any]] = []
        self.init_split: dict[str, Any] | None = None
        if init_weights and not _RESTORING.get():
            self.load_net_weights(init_weights)

    @classmethod
    def load_from_checkpoint(cls, *args: Any, **kwargs: Any) -> FemurSegmenter:
        """Lightning's ``load_from_checkpoint``, except that ``init_weights`` is not read: the checkpoint holds the
        weights, and it must load without the file its run once started from."""
        token = _RESTORING.set(True)
        try:
            return super().load_from_checkpoint(*args, **kwargs)
        finally:
            _RESTORING.reset(token)

    # ------------------------------------------------------------------ parts and weights
    def parts(self) -> dict[str, nn.Module]:
        """Trainable parts by name, as the network declares them (``backbone``, ``stn``, ``fusion`` for an ST-V-Net); a
        network that declares none (a V-Net, a MONAI network, a user's own) is one part, the ``backbone``."""
        return dict(self.net.parts()) if hasattr(self.net, "parts") else {BACKBONE: self.net}

    def load_net_weights(self, path: str) -> None:
        """Start from another run's backbone weights (:func:`~stvnet.init_weights.load_backbone_weights`); the data they were
        trained on is checked against this run's fold when training starts."""
        n, record = load_backbone_weights(self.net, path)
        self.init_split = {"path": path, "record": record}
        rank_zero_info(f"Initialised {n}/{len(self.net.state_dict())} tensors of the network from {path}")

    # ------------------------------------------------------------------ stages
    def set_stage(self, stage: ActiveStage) -> None:
        """Adopt the stage in force (called by the stage schedule); takes effect at the next optimiser build."""
        self.stage = stage

    def apply_trainable(self) -> None:
        """Freeze every part the stage does not train, with Lightning's ``BaseFinetuning`` helpers; frozen parts are
        also put in eval mode, so they keep their normalisation statistics."""
        for name, module in self.parts().items():
            if self.stage.trains(name):
                BaseFinetuning.make_trainable(module)
                module.train(self.training)
            else:
                BaseFinetuning.freeze(module, train_bn=False)
                module.eval()

    def on_train_epoch_start(self) -> None:
        self.apply_trainable()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[STAGE_KEY] = self.stage.to_checkpoint()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if STAGE_KEY in checkpoint:
            self.stage = ActiveStage.from_checkpoint(checkpoint[STAGE_KEY])

    def _param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters grouped by learning rate (the stage's, times any ``part_lr_scale``)."""
        scales = self.stage.part_lr_scale
        groups: dict[float, list[nn.Parameter]] = {}
        for name, module in self.parts().items():
            trainable = [p for p in module.parameters() if p.requires_grad]
            if trainable:
                groups.setdefault(float(scales.get(name, 1.0)), []).extend(trainable)
        if not groups:
            raise ValueError(f"stage '{self.stage.name}' trains no parameters")
        return [{"params": params, "lr": self.stage.lr * scale} for scale, params in groups.items()]

    def configure_optimizers(self) -> Any:
        self.apply_trainable()
        optimizer = torch.optim.AdamW(self._param_groups(), lr=self.stage.lr, weight_decay=self.weight_decay)
        if self.scheduler_kind == "none":
            return optimizer
        if self.scheduler_kind != "cosine":
            raise ValueError(f"scheduler must be 'cosine' or 'none', got '{self.scheduler_kind}'")
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 100
        epochs = self.stage.epochs or max_epochs
        total_steps = self.trainer.estimated_stepping_batches
        per_epoch = max(1, int(total_steps // max_epochs)) if math.isfinite(total_steps) else 100
        total = epochs * per_epoch
        warmup = int(round(float(self.stage.warmup_epochs) * per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ shape prior
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and self.init_split is not None and datamodule is not None:
            target = datamodule.state_dict()
            if "subjects" in target:
                check_same_split(self.init_split["record"], target, f"model.init_weights {self.init_split['path']}")
        if stage == "fit" and hand_over_prior(self.net, datamodule, self.prior_alignment):
            rank_zero_info(f"Shape prior built from {len(datamodule.subject_ids('train'))} training subjects")

    # ------------------------------------------------------------------ steps
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.net(x)
        return out if isinstance(out, dict) else {"logits": out}

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Femur probability map for an image batch ``[B, 1, ...]``."""
        return torch.sigmoid(self(x)["logits"])

    def _losses(self, out: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor]:
        weights = self.stage.loss_weights
        terms: dict[str, torch.Tensor] = {}
        if weights.get("seg", 0):
            terms["seg"] = segmentation_loss(out["logits"], target, self.loss_kind)
        if weights.get(BACKBONE, 0):
            terms[BACKBONE] = segmentation_loss(out.get("backbone_logits", out["logits"]), target, self.loss_kind)
        if weights.get("prior", 0):
            if "prior" not in out:
                raise ValueError("loss term 'prior' needs a network with a shape prior (ST-V-Net)")
            terms["prior"] = soft_dice_loss(out["prior"], target)
        if not terms:
            raise ValueError(f"stage '{self.stage.name}' has no loss term with non-zero weight")
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image = batch["image"][tio.DATA].float()
        target = batch["label"][tio.DATA].float()
        out = self(image)
        terms = self._losses(out, target)
        weights = self.stage.loss_weights
        loss = sum(weights[k] * v for k, v in terms.items())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at epoch {self.current_epoch}, step {self.global_step}")
        bs = image.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=bs)
        for k, v in terms.items():
            self.log(f"train/loss_{k}", v, on_step=False, on_epoch=True, batch_size=bs)
        self.log("stage", float(self.stage.index), on_step=True, on_epoch=False, batch_size=bs)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self(batch["image"][tio.DATA].float())
        self._val_rows += case_rows(out, batch, self.threshold, self.loss_kind, self.surface_metrics)

    def on_validation_epoch_start(self) -> None:
        self._val_rows = []

    def on_validation_epoch_end(self) -> None:
        rows = gather_unique(self._val_rows)  # each subject once, from every rank
        if not rows:
            return
        table = pd.DataFrame(rows)
        for name, value in epoch_means(table).items():
            self.log(f"val/{name}", value, prog_bar=name == "dice", sync_dist=False, rank_zero_only=False)
        self.log("val/stage", float(self.stage.index), sync_dist=False)  # which stage each validation row is from
        if not self.trainer.sanity_checking:
            extra = f", HD95 {table['hd95'].mean():.2f} mm" if "hd95" in table else ""
            rank_zero_info(
                f"epoch {self.current_epoch:3d} [stage {self.stage.name}]: val Dice {table['dice'].mean():.4f}{extra}"
                f" ({len(table)} subjects)"
            )
