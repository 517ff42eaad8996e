"""``stvnet train``: a LightningCLI over :class:`FemurSegmenter` and :class:`FemurDataModule`.

Every config key can be overridden on the command line (``--data.fold 3 --trainer.max_epochs 5``). Each run
writes to a new folder ``<run.out>/<run.name>/<cohort>/fold<k>/<timestamp>`` holding the resolved config,
the splits, checkpoints and ``metrics.csv``; resuming with ``--ckpt_path <run>/checkpoints/last.ckpt``
continues in that run's folder, appending to its ``metrics.csv``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger

from data_modules.datamodule import FemurDataModule
from stvnet.callbacks import RunFiles
from stvnet.lightning_module import FemurSegmenter
from stvnet.loggers import ResumableCSVLogger

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


def launch_id() -> str | None:
    """An id that every process of one external multi-process launch shares: SLURM's job and step
    (``srun`` with several tasks; each ``srun`` is a new step, so runs in one job never share a folder) or
    torchrun's rendezvous id (``--standalone`` or ``--rdzv-id``)."""
    step = os.environ.get("SLURM_STEP_ID")
    if os.environ.get("SLURM_JOB_ID") and step and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{step}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    return None if run_id == "none" else f"torchrun-{run_id}"


def run_dir_for(options: RunOptions, cohort: str, fold: int, ckpt_path: str | None) -> Path:
    """The run folder: inherited by DDP workers, an explicit one, a resumed run's own, one named after an
    external launch (all its ranks agree on it), or a new timestamped one."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if options.dir:
        path = Path(options.dir)
    elif ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        path = Path(ckpt_path).parent.parent
    elif launch_id():
        path = Path(options.out) / options.name / cohort / f"fold{fold}" / launch_id()
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("this process is one of several launched together (WORLD_SIZE > 1) but they share no run "
                         "id: pass the same --run.dir to every process, or launch with torchrun --rdzv-id/--standalone "
                         "or srun")
    else:
        path = new_run_dir(options.out, options.name, cohort, fold)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(path)  # DDP launches re-run this command; they must share the folder
    return path


def previous_wandb_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run already in this run folder (there is one when a run is resumed)."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def make_wandb_logger(options: RunOptions, run_dir: Path, cohort: str, fold: int) -> WandbLogger | None:
    """A W&B logger named and grouped for comparisons: group = study, job_type = fold, tags = model/cohort/fold.

    Online, a resumed run continues its W&B run (same id). Offline it starts a new offline run in the same folder:
    W&B cannot resume offline runs, and syncing two offline runs under one id would keep only the last.
    """
    mode = os.environ.get("WANDB_MODE") or options.wandb
    if mode not in ("offline", "online", "disabled", "dryrun", "run"):
        raise ValueError(f"run.wandb must be offline, online or disabled, got '{mode}'")
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    resume = {}
    if mode in ("online", "run") and (run_id := previous_wandb_id(run_dir)):
        resume = {"id": run_id, "resume": "allow"}
    return WandbLogger(
        save_dir=str(run_dir), project=options.project, name=f"{options.name}-{cohort}-fold{fold}-{run_dir.name}",
        group=options.study or options.name, job_type=f"fold{fold}", tags=[options.name, cohort, f"fold{fold}"],
        log_model=True, mode=mode, **resume,
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
            kwargs["logger"] = [ResumableCSVLogger(save_dir=str(self.run_dir), name="", version="")]
            wandb_logger = make_wandb_logger(options, self.run_dir, data.cohort, data.fold)
            if wandb_logger is not None:
                kwargs["logger"].append(wandb_logger)
        kwargs["default_root_dir"] = str(self.run_dir)
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks.append(RunFiles(str(self.run_dir)))
        if trainer.is_global_zero:
            print(f"Run folder: {self.run_dir}", flush=True)
        return trainer


    def after_fit(self) -> None:
        """Close W&B runs so offline files are complete when the command returns."""
        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger) and logger._experiment is not None:
                logger.experiment.finish()


def configs_first(args: list[str]) -> list[str]:
    """Move ``--config`` files ahead of the other arguments (keeping their order).

    jsonargparse applies arguments left to right, so ``--data.fold 2 --config x.yaml`` would silently train the
    config's fold; with the configs first, a key given on the command line always wins, wherever it is written.
    """
    configs: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in ("--config", "-c") and i + 1 < len(args):
            configs += args[i:i + 2]
            i += 2
            continue
        (configs if args[i].startswith("--config=") else rest).append(args[i])
        i += 1
    return configs + rest


def main(args: list[str] | None = None) -> TrainCLI:
    """Run ``fit`` with the given command-line arguments (``stvnet train ...``)."""
    if "LOCAL_RANK" not in os.environ:  # the launching process never inherits an earlier run's folder
        os.environ.pop(RUN_DIR_ENV, None)
    return TrainCLI(
        FemurSegmenter,
        FemurDataModule,
        args=["fit", *configs_first(list(args or []))],
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"fit": {"default_config_files": []}},
    )
