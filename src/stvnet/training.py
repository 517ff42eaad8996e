"""``stvnet train``: a LightningCLI over :class:`FemurSegmenter` and :class:`FemurDataModule`.

Every config key can be overridden on the command line (``--data.fold 3 --trainer.max_epochs 5``). Each run
writes to a new folder ``<run.out>/<run.name>/<cohort>/fold<k>/<timestamp>`` holding the resolved config,
the splits, checkpoints and ``metrics.csv``; resuming with ``--ckpt_path <run>/checkpoints/last.ckpt``
continues in that run's folder.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from data_modules.datamodule import FemurDataModule
from stvnet.callbacks import RunFiles
from stvnet.lightning_module import FemurSegmenter

RUN_DIR_ENV = "STVNET_RUN_DIR"


@dataclass
class RunOptions:
    """Where a run's outputs go.

    Attributes:
        out: root folder of all runs (splits are shared under ``<out>/splits``).
        name: experiment name (first level under ``out``; the model's name in comparisons).
        dir: explicit run folder (default: a new timestamped folder).
        wandb: Weights & Biases mode: ``offline`` (default: files under the run folder, no account or network),
            ``online`` (after ``wandb login``) or ``disabled``. The ``WANDB_MODE`` environment variable wins.
        project: W&B project.
        study: W&B group (the study or experiment the run belongs to; default: ``name``).
    """

    out: str = "runs"
    name: str = "experiment"
    dir: str | None = None
    wandb: str = "offline"
    project: str = "stvnet"
    study: str | None = None


def new_run_dir(out: str, name: str, cohort: str, fold: int) -> Path:
    """A fresh, never-used run folder (timestamped; suffixed if two runs start in the same second)."""
    base = Path(out) / name / cohort / f"fold{fold}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, i = base / stamp, 1
    while candidate.exists():
        candidate, i = base / f"{stamp}-{i}", i + 1
    candidate.mkdir(parents=True)
    return candidate


def run_dir_for(options: RunOptions, cohort: str, fold: int, ckpt_path: str | None) -> Path:
    """The run folder: inherited by DDP workers, a resumed run's own, an explicit one, or a new one."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if options.dir:
        path = Path(options.dir)
    elif ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        path = Path(ckpt_path).parent.parent
    else:
        path = new_run_dir(options.out, options.name, cohort, fold)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(path)  # DDP launches re-run this command; they must share the folder
    return path


def make_wandb_logger(options: RunOptions, run_dir: Path, cohort: str, fold: int) -> WandbLogger | None:
    """A W&B logger named and grouped for comparisons: group = study, job_type = fold, tags = model/cohort/fold."""
    mode = os.environ.get("WANDB_MODE") or options.wandb
    if mode not in ("offline", "online", "disabled", "dryrun", "run"):
        raise ValueError(f"run.wandb must be offline, online or disabled, got '{mode}'")
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(
        save_dir=str(run_dir), project=options.project, name=f"{options.name}-{cohort}-fold{fold}-{run_dir.name}",
        group=options.study or options.name, job_type=f"fold{fold}", tags=[options.name, cohort, f"fold{fold}"],
        log_model=True, mode=mode,
    )


class TrainCLI(LightningCLI):
    """LightningCLI with run folders, shared splits and default loggers."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunOptions, "run")
        parser.link_arguments("run.out", "data.splits_dir", compute_fn=lambda out: str(Path(out) / "splits"))

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run = config["run"]
        options = run if isinstance(run, RunOptions) else RunOptions(**vars(run))
        data = config["data"]
        self.run_dir = run_dir_for(options, data.cohort, data.fold, config.get("ckpt_path"))
        trainer_cfg = config["trainer"]
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = [CSVLogger(save_dir=str(self.run_dir), name="", version="")]
            wandb_logger = make_wandb_logger(options, self.run_dir, data.cohort, data.fold)
            if wandb_logger is not None:
                kwargs["logger"].append(wandb_logger)
        kwargs["default_root_dir"] = str(self.run_dir)
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(RunFiles(str(self.run_dir)))
        print(f"Run folder: {self.run_dir}", flush=True)
        return trainer


    def after_fit(self) -> None:
        """Close W&B runs so offline files are complete when the command returns."""
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()


def main(args: list[str] | None = None) -> TrainCLI:
    """Run ``fit`` with the given command-line arguments (``stvnet train ...``)."""
    if "LOCAL_RANK" not in os.environ:  # the launching process never inherits an earlier run's folder
        os.environ.pop(RUN_DIR_ENV, None)
    return TrainCLI(
        FemurSegmenter,
        FemurDataModule,
        args=["fit", *(args or [])],
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"fit": {"default_config_files": []}},
    )
