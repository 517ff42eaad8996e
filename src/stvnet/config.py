"""An experiment's configuration: the shared defaults every experiment is a delta over, the run options, and the
command-line parser that composes them, usable without training.

``defaults.yaml`` ships inside the package (package data), so an installed ``stvnet`` (not only a checkout) trains
with it; each option has its one default there or, for options it leaves out, in the class that takes it.
:func:`resolved_config` gives what ``stvnet train --config X --print_config`` prints, from the parser alone: no
model, datamodule or trainer is built and no run folder is made.
"""

from __future__ import annotations

import warnings
from argparse import ArgumentError
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI

from data_modules.datamodule import FemurDataModule
from data_modules.errors import UserError
from stvnet.lightning_module import FemurSegmenter

#: the shared defaults every experiment builds on (data protocol, trainer, checkpointing, optimiser)
DEFAULTS = resources.files("stvnet") / "defaults.yaml"


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
        overwrite: let ``dir`` replace a run already in it (otherwise such a folder is only resumed, through a
            ``--ckpt_path`` inside it).
    """

    out: str = "runs"
    name: str = "experiment"
    dir: str | None = None
    wandb: str = "offline"
    project: str = "stvnet"
    study: str | None = None
    overwrite: bool = False


def default_config_files() -> list[str]:
    """The packaged ``defaults.yaml``, applied before any ``--config``."""
    return [str(DEFAULTS)]


def configs_first(args: Sequence[str]) -> list[str]:
    """Move ``--config`` files ahead of the other arguments (keeping their order).

    jsonargparse applies arguments left to right, so ``--data.fold 2 --config x.yaml`` would silently train the
    config's fold; with the configs first, a key given on the command line always wins, wherever it is written.
    """
    configs: list[str] = []
    rest: list[str] = []
    i, args = 0, list(args)
    while i < len(args):
        if args[i] in ("--config", "-c") and i + 1 < len(args):
            configs += args[i:i + 2]
            i += 2
            continue
        (configs if args[i].startswith("--config=") else rest).append(args[i])
        i += 1
    return configs + rest


def parse_error(error: ArgumentError) -> UserError:
    """jsonargparse's complaint about an option or a config file, as one line instead of the whole usage text."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return UserError(f"{text}; see stvnet train --help")


class ExperimentCLI(LightningCLI):
    """The ``stvnet train`` parser: Lightning's, plus the run options (``--run.*``) and the shared splits folder
    that follows ``--run.out``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunOptions, "run")
        parser.link_arguments("run.out", "data.splits_dir", compute_fn=lambda out: str(Path(out) / "splits"))


class _Resolved(Exception):
    """Raised with the parsed config, to stop :class:`_ConfigOnly` before anything is built."""

    def __init__(self, config: dict):
        super().__init__("resolved")
        self.config = config


class _ConfigOnly(ExperimentCLI):
    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        raise _Resolved(yaml.safe_load(parser.dump(self.config, skip_unset=False))["fit"])


def cli_parser_kwargs() -> dict:
    """The parser settings of ``stvnet train``: the packaged defaults first; errors raised, not printed."""
    return {"exit_on_error": False, "fit": {"default_config_files": default_config_files(), "exit_on_error": False}}


def resolved_config(config: str | Path, extra_args: Sequence[str] = ()) -> dict:
    """An experiment's complete config as ``stvnet train --config <config> <extra_args> --print_config`` prints it
    (the packaged defaults, the experiment's delta and its nets/ files, every default filled in), from the parser
    alone; an unknown option or a broken config file raises a :class:`UserError`."""
    try:
        with warnings.catch_warnings():  # the command line is the caller's, not this parse's: Lightning's hint is noise
            warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within")
            _ConfigOnly(FemurSegmenter, FemurDataModule,
                        args=["fit", *configs_first(["--config", str(config), *extra_args])],
                        seed_everything_default=0, parser_kwargs=cli_parser_kwargs())
    except _Resolved as resolved:
        return resolved.config
    except ArgumentError as error:
        raise parse_error(error) from error
    raise AssertionError("the parser returned without a config")  # _ConfigOnly always raises
