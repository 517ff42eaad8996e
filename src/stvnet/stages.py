"""The stage protocol between the stage schedule (a callback: training policy) and the LightningModule: plain typed
records, no string keys. A :class:`Stage` is what a config asks for; an :class:`ActiveStage` is the stage in force,
with its position in the schedule and its learning rate resolved; it is what the module trains with and what a
checkpoint records (``stvnet_stage``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from stvnet.models.protocol import BACKBONE

#: loss terms: ``seg`` on the final output, ``backbone`` on the segmentation backbone's own output (an ST-V-Net's V-Net
#: before the prior is fused in), ``prior`` on the warped prior
LOSS_TERMS = ("seg", BACKBONE, "prior")
#: where a checkpoint records its :class:`ActiveStage`
STAGE_KEY = "stvnet_stage"
#: the stage schedule callback's name: in a config's ``class_path`` and as its state's key in a checkpoint
SCHEDULE = "StageSchedule"


def schedule_position(config: dict) -> int | None:
    """Position of the stage schedule among a resolved config's callbacks (``None`` without one)."""
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    found = [i for i, c in enumerate(callbacks) if str(c.get("class_path", "")).endswith(SCHEDULE)]
    return found[0] if found else None


def config_stages(config: dict) -> list[dict]:
    """The stages of a resolved config's schedule, in order (``[]`` without one)."""
    position = schedule_position(config)
    return [] if position is None else list(config["trainer"]["callbacks"][position]["init_args"]["stages"])


def checkpoint_stage(ckpt: dict) -> tuple[dict, int | None]:
    """The stage a checkpoint was saved in (its record, ``{}`` for an unstaged run) and its schedule's number of
    stages (``None`` without a schedule)."""
    schedule = (ckpt.get("callbacks") or {}).get(SCHEDULE)
    return dict(ckpt.get(STAGE_KEY) or {}), None if schedule is None else len(schedule["stages"])


@dataclass
class Stage:
    """One training stage.

    Attributes:
        name: shown in logs and checkpoints.
        epochs: length of the stage in epochs.
        train: parts that train (``backbone``; ``stn``, ``fusion`` of an ST-V-Net: the network's ``parts()``); ``None``
            trains everything.
        lr: learning rate of the stage; ``None`` uses the module's ``lr`` times ``lr_scale``.
        lr_scale: multiplier of the module's base learning rate when ``lr`` is not given.
        loss_weights: weights of the loss terms ``seg`` (final output), ``backbone`` (the backbone's own output) and
            ``prior`` (warped shape prior vs ground truth).
        warmup_epochs: linear learning-rate warm-up at the start of the stage; the optimiser is rebuilt with
            fresh moments at each switch, and a warm-up keeps its first steps from undoing trained weights.
        part_lr_scale: multipliers of the stage's rate for single parts, e.g. ``{fusion: 10}``: the fusion's three
            scalars move about ``lr`` per Adam step, too slowly to weigh the prior in within a short stage.
    """

    name: str
    epochs: int
    train: list[str] | None = None
    lr: float | None = None
    lr_scale: float = 1.0
    loss_weights: dict[str, float] = field(default_factory=lambda: {"seg": 1.0})
    warmup_epochs: float = 0.0
    part_lr_scale: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ActiveStage:
    """The stage in force: its position, the parts that train (``None``: all), its rate, loss weights, length
    (``None``: the whole run), warm-up and per-part rate multipliers."""

    index: int
    name: str
    lr: float
    train: tuple[str, ...] | None = None
    loss_weights: dict[str, float] = field(default_factory=lambda: {"seg": 1.0})
    epochs: int | None = None
    warmup_epochs: float = 0.0
    part_lr_scale: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.loss_weights) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"stage '{self.name}': unknown loss terms {sorted(unknown)}; use {LOSS_TERMS}")

    @classmethod
    def of(cls, stage: Stage, index: int, base_lr: float) -> ActiveStage:
        """Stage ``index`` of a schedule, its rate resolved against the module's base rate."""
        return cls(index=index, name=stage.name, lr=stage.lr if stage.lr is not None else base_lr * stage.lr_scale,
                   train=tuple(stage.train) if stage.train is not None else None,
                   loss_weights=dict(stage.loss_weights or {"seg": 1.0}), epochs=stage.epochs,
                   warmup_epochs=stage.warmup_epochs, part_lr_scale=dict(stage.part_lr_scale))

    def trains(self, part: str) -> bool:
        return self.train is None or part in self.train

    def to_checkpoint(self) -> dict[str, Any]:
        record = asdict(self)
        record["train"] = list(self.train) if self.train is not None else None
        return record

    @classmethod
    def from_checkpoint(cls, record: dict[str, Any]) -> ActiveStage:
        known = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        if known.get("train") is not None:
            known["train"] = tuple(known["train"])
        return cls(**known)
