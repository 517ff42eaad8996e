"""The experiment YAMLs a user runs: they parse, build their models, and V-Net/ST-V-Net compare fairly."""

from __future__ import annotations

import contextlib
import functools
import io
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from data_modules.datamodule import FemurDataModule
from stvnet.callbacks import StageSchedule
from stvnet.lightning_module import FemurSegmenter
from stvnet.config import RunOptions, default_config_files
from tests.conftest import (EXPERIMENT_FILES, EXPERIMENTS, ROOT, cpu_precision_args, tiny_data_args, tiny_train_args,
                            vnet_checkpoint)

CONFIGS = EXPERIMENT_FILES


def is_gpu_peer(config: Path) -> bool:
    """experiments/peers/gpu/: built and resolved here, but not stepped: one bf16 step of their 48-56-wide networks
    takes over a minute at 24^3 on a 2-core CPU (their networks are the CPU peers', which are stepped)."""
    return "peers" in config.parts and "gpu" in config.parts
# each experiment's resolved config as it was before the experiments were composed from the shared defaults and
# experiments/nets/ (six full copies then); an intended change of an experiment updates its file here
RESOLVED = ROOT / "tests" / "resolved_configs"


@functools.lru_cache(maxsize=None)
def _resolved_text(config: Path) -> str:
    from stvnet.sweep import resolved_config

    return yaml.safe_dump(resolved_config(config))


def _resolved(config: Path) -> dict:
    """``stvnet train --config <config> --print_config``, as a fresh dict."""
    return yaml.safe_load(_resolved_text(config))


def _effective_callbacks(callbacks: list[dict]) -> list[str]:
    """Callbacks in the order Lightning runs them: checkpoint callbacks are moved after all others."""
    from importlib import import_module

    from lightning.pytorch.callbacks import Checkpoint

    def is_checkpoint(c: dict) -> bool:
        module, name = c["class_path"].rsplit(".", 1)
        return issubclass(getattr(import_module(module), name), Checkpoint)

    ordered = [c for c in callbacks if not is_checkpoint(c)] + [c for c in callbacks if is_checkpoint(c)]
    return [yaml.safe_dump(c, sort_keys=True) for c in ordered]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(EXPERIMENTS)) for c in CONFIGS])
def test_each_experiment_resolves_to_the_config_it_had_before_composition(config):
    recorded = yaml.safe_load((RESOLVED / str(config.relative_to(EXPERIMENTS)).replace("/", "_")).read_text())
    now = _resolved(config)
    assert _effective_callbacks(now["trainer"].pop("callbacks")) == \
        _effective_callbacks(recorded["trainer"].pop("callbacks"))
    assert now == recorded


class _BuildOnly(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunOptions, "run")


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(EXPERIMENTS)) for c in CONFIGS])
def test_experiment_builds(config, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["stvnet"])  # pytest's own arguments are not the CLI's
    cli = _BuildOnly(FemurSegmenter, FemurDataModule, run=False, parser_kwargs={"default_config_files": default_config_files()},
                     args=["--config", str(config), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    expected = _resolved(config)["model"]["net"]["class_path"].rsplit(".", 1)[1]
    assert expected == ("STVNet" if "stvnet" in config.name else "VNet" if "vnet" in config.name else
                        "DynUNet" if "dynunet" in config.name else "SegResNet")
    assert type(cli.model.net).__name__ == expected
    schedules = [c for c in cli.trainer.callbacks if isinstance(c, StageSchedule)]
    if expected == "STVNet" or "staged" in config.name:
        assert len(schedules) == 1 and schedules[0].total_epochs == cli.trainer.max_epochs


@pytest.mark.parametrize("folder", [EXPERIMENTS, EXPERIMENTS / "gpu"])
def test_vnet_and_stvnet_share_data_seed_and_budget(folder):
    vnet, st = _resolved(folder / "vnet.yaml"), _resolved(folder / "stvnet.yaml")
    assert vnet["data"] == st["data"] and vnet["seed_everything"] == st["seed_everything"]
    assert vnet["trainer"]["max_epochs"] == st["trainer"]["max_epochs"]
    assert vnet["model"]["net"]["init_args"] == st["model"]["net"]["init_args"]["backbone"]["init_args"]


def test_staged_vnet_control_differs_from_the_baseline_only_in_its_schedule():
    vnet, staged = _resolved(EXPERIMENTS / "vnet.yaml"), _resolved(EXPERIMENTS / "vnet_staged.yaml")
    assert staged["run"]["name"] == "vnet_staged"
    for key in ("data", "model", "seed_everything", "ckpt_path"):
        assert staged[key] == vnet[key], key
    assert {k: v for k, v in staged["trainer"].items() if k != "callbacks"} == \
        {k: v for k, v in vnet["trainer"].items() if k != "callbacks"}
    extra = [c for c in staged["trainer"]["callbacks"] if c not in vnet["trainer"]["callbacks"]]
    assert [c["class_path"] for c in extra] == ["stvnet.callbacks.StageSchedule"]


@pytest.mark.slow
@pytest.mark.parametrize("config", [pytest.param(c, marks=[pytest.mark.heavy, pytest.mark.not_in_mutation_run]) if "gpu" in c.parts else c
                                    for c in CONFIGS if not is_gpu_peer(c)], ids=[str(c.relative_to(EXPERIMENTS))
                                                                               for c in CONFIGS if not is_gpu_peer(c)])
def test_every_experiment_trains_and_validates_through_all_its_stages(config, tiny_cohort, tmp_path):
    """No config ships broken: each one (GPU ones included, in float32 on the CPU: ``cpu_precision_args``; at a
    reduced ROI) trains and validates one step in each of its stages through the real command, and its printed config
    reproduces itself."""
    from stvnet.cli import main as cli_main

    resolved = _resolved(config)
    data = tiny_data_args(tiny_cohort, tmp_path / "runs" / "splits")
    args = ["--config", str(config), "--data.manifest", str(tiny_cohort), "--data.n_folds", "3",
            "--data.num_workers", "0", "--data.roi_size", "[32, 32, 32]", "--data.target_spacing", "[4.0, 4.0, 4.0]",
            "--data.batch_size", "8",  # the fold's training subjects in one batch: one step an epoch, however
            # --trainer.limit_train_batches 1 is read (it was at times the float 1.0, all batches, in a whole-suite run)
            "--trainer.accelerator", "cpu", "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "1",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
            "--data.cache_dir", data["cache_dir"], "--run.out", str(tmp_path / "runs"), "--run.wandb", "disabled",
            *cpu_precision_args(resolved)]
    if "from_vnet" in config.name:
        args += ["--model.init_weights", str(vnet_checkpoint(resolved, data, tmp_path / "vnet.ckpt"))]
    assert cli_main(["train", *args]) == 0
    (run,) = list((tmp_path / "runs" / resolved["run"]["name"] / "all" / "fold0").iterdir())
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["val/dice"].dropna().size == 3 and metrics["train/loss_step"].dropna().size == 3
    stages = [c for c in resolved["trainer"]["callbacks"] if c["class_path"].endswith("StageSchedule")]
    n_stages = len(stages[0]["init_args"]["stages"]) if stages else 1
    assert sorted(set(metrics["val/stage"].dropna())) == list(range(min(n_stages, 3)))
    # --print_config round-trips: the printed config, read back, prints the same
    printed = tmp_path / "printed.yaml"
    for source, target in ((config, printed), (printed, tmp_path / "again.yaml")):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), pytest.raises(SystemExit) as done:
            cli_main(["train", "--config", str(source), "--print_config"])
        assert done.value.code == 0
        target.write_text(buffer.getvalue())
    assert (tmp_path / "again.yaml").read_text() == printed.read_text()


@pytest.mark.slow
def test_bf16_mixed_precision_trains_the_stvnet_through_its_stages(tiny_cohort, tmp_path):
    """What the GPU configs' bf16-mixed exercises in the model code (autocast through the backbone, the STN's affine
    grid and the prior's grid_sample, the fusion) works: a narrow ST-V-Net trains in bf16 through its three stages
    with a finite loss and validates each epoch."""
    from stvnet.cli import main as cli_main

    args = tiny_train_args(tiny_cohort, tmp_path / "runs", epochs=3, config="stvnet.yaml")
    args += ["--trainer.precision", "bf16-mixed", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1"]
    assert cli_main(["train", *args]) == 0
    (run,) = list((tmp_path / "runs" / "stvnet" / "all" / "fold0").iterdir())
    metrics = pd.read_csv(run / "metrics.csv")
    losses = metrics["train/loss_step"].dropna()
    assert losses.size == 3 and losses.map(math.isfinite).all()
    assert sorted(set(metrics["val/stage"].dropna())) == [0, 1, 2]
    assert "bf16" in (run / "config.yaml").read_text()
