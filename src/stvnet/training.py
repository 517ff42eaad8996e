"""``stvnet train``: a LightningCLI over :class:`FemurSegmenter` and :class:`FemurDataModule`.

Every config key can be overridden on the command line (``--data.fold 3 --trainer.max_epochs 5``). Each run
writes to a new folder ``<run.out>/<run.name>/<cohort>/fold<k>/<timestamp>`` holding the resolved config,
the splits, checkpoints and ``metrics.csv``; resuming with ``--ckpt_path <run>/checkpoints/last.ckpt``
continues in that run's folder, appending to its ``metrics.csv``.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from argparse import ArgumentError
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import WandbLogger
from torch.distributed import TCPStore

from data_modules.datamodule import FemurDataModule
from data_modules.errors import InvalidInput, MissingInput, UserError, output_folder
from stvnet.callbacks import EpochSeed, RunFiles, StageSchedule
from stvnet.config import ExperimentCLI, RunOptions, cli_parser_kwargs, configs_first, parse_error
from stvnet.inference import load_checkpoint
from stvnet.lightning_module import FemurSegmenter
from stvnet.lightning_adapters import ResumableCSVLogger

RUN_DIR_ENV = "STVNET_RUN_DIR"


#: what makes a folder a run's: a run folder holding any of these is never trained into except to resume it
RUN_MARKERS = ("config.yaml", "metrics.csv", "splits.json", "checkpoints")
#: the run folder this process created (removed again if the run fails on a user error before any checkpoint)
_created: list[Path] = []


def holds_a_run(path: Path) -> bool:
    """Whether a folder holds (part of) a run: its config, metrics, splits or checkpoints."""
    return path.is_dir() and any((path / marker).exists() for marker in RUN_MARKERS)


def explicit_run_dir(path: Path, ckpt_path: str | None, overwrite: bool) -> Path:
    """``--run.dir``: a new or empty folder, the folder of the run being resumed, or (``overwrite``) a run to
    replace; a folder that holds another run is refused, so no run's files are ever mixed with another's."""
    resuming = ckpt_path is not None and path.resolve() in Path(ckpt_path).resolve().parents
    if holds_a_run(path) and not resuming:
        if not overwrite:
            raise UserError(f"--run.dir {path}: holds a run already (config.yaml, checkpoints, metrics); resume it "
                            f"with --ckpt_path {path}/checkpoints/last.ckpt, choose a new --run.dir, or pass "
                            "--run.overwrite true to replace it")
        shutil.rmtree(path)
    return path


def discard_failed_run() -> None:
    """Remove the run folder this process created if it holds no checkpoint (a run refused before training)."""
    for path in _created:
        if path.is_dir() and not any(path.glob("checkpoints/*.ckpt")):
            shutil.rmtree(path, ignore_errors=True)
            for parent in path.parents[:3]:  # <fold>, <cohort>, <name>: made for this run, removed when left empty
                if parent.is_dir() and not any(parent.iterdir()):
                    parent.rmdir()
    _created.clear()


def new_run_dir(out: str, name: str, cohort: str, fold: int) -> Path:
    """A fresh, never-used run folder (timestamped; suffixed if two runs start in the same second)."""
    base = Path(out) / name / cohort / f"fold{fold}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    output_folder(out, "--run.out")
    output_folder(base, "--run.out")
    candidate, i = base / stamp, 1
    while True:
        try:
            candidate.mkdir()  # atomic: of two runs starting in the same second, exactly one gets each name
            return candidate
        except FileExistsError:
            candidate, i = base / f"{stamp}-{i}", i + 1


def slurm_step_id() -> str | None:
    """``slurm-<job>-<step>`` for a step launched by ``srun`` with several tasks: every task of the step shares it,
    and job ids are unique on a cluster (array tasks included), so no other launch does."""
    step = os.environ.get("SLURM_STEP_ID")
    if os.environ.get("SLURM_JOB_ID") and step and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{step}"
    return None


def torchrun_store() -> TCPStore | None:
    """The key-value store of the ``torchrun`` agent that started this process, if any.

    Two torchrun jobs may share a rendezvous id (job arrays, a fixed ``--rdzv-id``) or start in the same second, so
    neither names a run folder safely; the agent's store is private to one launch: rank 0 publishes its fresh
    folder there and the other ranks read it.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or "MASTER_ADDR" not in os.environ:
        return None
    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(minutes=10))


def shared_new_run_dir(store: TCPStore, out: str, name: str, cohort: str, fold: int) -> Path:
    """Rank 0 makes a new run folder and publishes it in ``store``; every other rank waits for it."""
    key = f"stvnet/run_dir/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    if int(os.environ.get("RANK", "0")) == 0:
        path = new_run_dir(out, name, cohort, fold)
        store.set(key, str(path))
        return path
    return Path(store.get(key).decode())


def run_dir_for(options: RunOptions, cohort: str, fold: int, ckpt_path: str | None) -> Path:
    """The run folder: inherited by DDP workers, an explicit one, a resumed run's own, one shared by the ranks of an
    external launch (srun step; torchrun through its agent's store), or a new timestamped one."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    if options.dir:
        path = explicit_run_dir(Path(options.dir), ckpt_path, options.overwrite)
    elif ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        path = Path(ckpt_path).parent.parent
    elif slurm_step_id():
        path = Path(options.out) / options.name / cohort / f"fold{fold}" / slurm_step_id()
    elif (store := torchrun_store()) is not None:
        path = shared_new_run_dir(store, options.out, options.name, cohort, fold)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("this process is one of several launched together (WORLD_SIZE > 1) but they share no run "
                         "folder: pass the same --run.dir to every process, or launch with torchrun or srun")
    else:
        path = new_run_dir(options.out, options.name, cohort, fold)
        _created.append(path)
    if not path.exists():
        _created.append(path)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[RUN_DIR_ENV] = str(path)  # DDP launches re-run this command; they must share the folder
    return path


def previous_wandb_id(run_dir: Path) -> str | None:
    """The id of the newest W&B run already in this run folder (there is one when a run is resumed)."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def make_wandb_logger(options: RunOptions, run_dir: Path, cohort: str, fold: int) -> WandbLogger | None:
    """A W&B logger named and grouped for comparisons: group = study, job_type = fold, tags = model/cohort/fold.

    A resumed run continues its W&B run (same id), online and offline: offline, each session writes its own
    ``offline-run-*-<id>`` folder and ``wandb sync <run>/wandb/offline-run-*`` uploads them in order into one run.
    """
    mode = os.environ.get("WANDB_MODE") or options.wandb
    if mode not in ("offline", "online", "disabled", "dryrun", "run"):
        raise InvalidInput(f"run.wandb {mode}: must be offline, online or disabled (WANDB_MODE, when set, wins)")
    if mode == "disabled":
        return None
    os.environ.setdefault("WANDB_SILENT", "true")
    resume = {}
    if run_id := previous_wandb_id(run_dir):
        resume = {"id": run_id, "resume": "allow"}
    return WandbLogger(
        save_dir=str(run_dir), project=options.project, name=f"{options.name}-{cohort}-fold{fold}-{run_dir.name}",
        group=options.study or options.name, job_type=f"fold{fold}", tags=[options.name, cohort, f"fold{fold}"],
        log_model=True, mode=mode, **resume,
    )


#: DDP strategies that find parameters without gradients, by the name a user types
FIND_UNUSED = {name: f"{name}_find_unused_parameters_true" for name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook")}


def launches_several_processes(devices: Any, num_nodes: int, accelerator: Any) -> bool:
    """Whether Lightning's ``strategy: auto`` would start DDP for these settings (or an external launcher did)."""
    if num_nodes > 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    if isinstance(devices, (list, tuple)):
        return len(devices) > 1
    if str(devices) in ("auto", "-1"):
        return accelerator not in ("cpu", "mps") and torch.cuda.device_count() > 1
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()]) > 1
    return int(devices) > 1


def strategy_for_stages(strategy: Any, devices: Any, num_nodes: int, accelerator: Any) -> Any:
    """The DDP strategy a staged run needs: frozen parts give parameters without gradients, which plain DDP refuses
    ("parameters that were not used in producing the loss"), so ``ddp`` becomes ``ddp_find_unused_parameters_true``
    (its per-step cost is measured in the README). Strategy objects are left as given (StageSchedule checks them)."""
    if not isinstance(strategy, str):
        return strategy
    if strategy == "auto" and launches_several_processes(devices, num_nodes, accelerator):
        return FIND_UNUSED["ddp"]
    return FIND_UNUSED.get(strategy, strategy)


class TrainCLI(ExperimentCLI):
    """The experiment parser, with run folders, shared splits and default loggers."""

    def parse_arguments(self, parser, args) -> None:
        """Parse, then check ``--ckpt_path`` before Lightning reads hyperparameters from it."""
        super().parse_arguments(parser, args)
        ckpt_path = self.config.get("fit", self.config).get("ckpt_path")
        if ckpt_path:
            check_resume_checkpoint(ckpt_path)

    def instantiate_trainer(self, **kwargs):
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run = config["run"]
        options = run if isinstance(run, RunOptions) else RunOptions(**vars(run))
        data, trainer_cfg = config["data"], config["trainer"]
        check_stage_budget(trainer_cfg)
        self.run_dir = run_dir_for(options, data.cohort, data.fold, config.get("ckpt_path"))
        if trainer_cfg.get("logger") in (None, True):
            kwargs["logger"] = [ResumableCSVLogger(save_dir=str(self.run_dir), name="", version="")]
            wandb_logger = make_wandb_logger(options, self.run_dir, data.cohort, data.fold)
            if wandb_logger is not None:
                kwargs["logger"].append(wandb_logger)
        kwargs["default_root_dir"] = str(self.run_dir)
        if any(isinstance(c, StageSchedule) and c.freezes_parts for c in trainer_cfg.get("callbacks") or []):
            kwargs["strategy"] = strategy_for_stages(trainer_cfg.get("strategy", "auto"), trainer_cfg.get("devices", "auto"),
                                                     int(trainer_cfg.get("num_nodes") or 1), trainer_cfg.get("accelerator"))
        trainer = super().instantiate_trainer(**kwargs)
        trainer.callbacks += [RunFiles(str(self.run_dir)), EpochSeed()]
        if trainer.is_global_zero:
            print(f"Run folder: {self.run_dir}", flush=True)
        return trainer

    def after_fit(self) -> None:
        """Close W&B runs so offline files are complete when the command returns."""
        if any(isinstance(logger, WandbLogger) for logger in self.trainer.loggers):
            import wandb

            if wandb.run is not None:  # the run this process logged to (none on ranks > 0)
                wandb.finish()


def check_stage_budget(trainer_cfg: dict) -> None:
    """Refuse a ``trainer.max_epochs`` too short to give each stage of a scaled schedule one epoch, before a run
    folder is made (the schedule itself would only find out inside ``Trainer.fit``)."""
    max_epochs = trainer_cfg.get("max_epochs")
    for schedule in trainer_cfg.get("callbacks") or []:
        if (isinstance(schedule, StageSchedule) and schedule.scale_to_max_epochs and max_epochs is not None
                and 0 < max_epochs < len(schedule.stages)):
            raise InvalidInput(f"--trainer.max_epochs {max_epochs}: the experiment's {len(schedule.stages)} stages "
                               f"({', '.join(s.name for s in schedule.stages)}) need at least one epoch each; pass "
                               f"--trainer.max_epochs {len(schedule.stages)} or more")


def check_resume_checkpoint(path: str) -> None:
    """Refuse a ``--ckpt_path`` that is not there or is not a Lightning checkpoint, before a run folder is made."""
    if not Path(path).is_file():
        raise MissingInput(f"--ckpt_path {path}: no such checkpoint; resume from <run>/checkpoints/last.ckpt of the "
                           "run to continue")
    load_checkpoint(path)  # one line if it is not a readable checkpoint (memory-mapped: the weights are not read)


def main(args: list[str] | None = None) -> TrainCLI:
    """Run ``fit`` with the given command-line arguments (``stvnet train ...``)."""
    # sys.argv stays intact: Lightning's DDP launcher re-runs this very command line for the other ranks
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within Python.*")
    # Frozen stages are put in eval mode on purpose (StageSchedule); Lightning 2.6 warns about it at fit start.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
    # Lightning 2.6's pytree helper on torch >= 2.10; harmless and not ours to fix.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    if "LOCAL_RANK" not in os.environ:  # the launching process never inherits an earlier run's folder
        os.environ.pop(RUN_DIR_ENV, None)
    try:
        return TrainCLI(
            FemurSegmenter,
            FemurDataModule,
            args=["fit", *configs_first(list(args or []))],
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=cli_parser_kwargs(),
        )
    except ArgumentError as error:
        raise parse_error(error) from error
    except UserError:
        discard_failed_run()  # a refused run leaves no folder behind
        raise
