"""The experiment YAMLs a user runs: they parse, build their models, and V-Net/ST-V-Net compare fairly."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.cli import LightningCLI

from data_modules.datamodule import FemurDataModule
from stvnet.callbacks import StageSchedule
from stvnet.lightning_module import FemurSegmenter
from stvnet.training import RunOptions

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
CONFIGS = sorted(EXPERIMENTS.rglob("*.yaml"))


class _BuildOnly(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunOptions, "run")


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(EXPERIMENTS)) for c in CONFIGS])
def test_experiment_builds(config, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["stvnet"])  # pytest's own arguments are not the CLI's
    cli = _BuildOnly(FemurSegmenter, FemurDataModule, run=False,
                     args=["--config", str(config), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)])
    expected = "STVNet" if "stvnet" in config.name else "VNet"
    assert type(cli.model.net).__name__ == expected
    schedules = [c for c in cli.trainer.callbacks if isinstance(c, StageSchedule)]
    if expected == "STVNet" or "staged" in config.name:
        assert len(schedules) == 1 and schedules[0].total_epochs == cli.trainer.max_epochs


@pytest.mark.parametrize("folder", [EXPERIMENTS, EXPERIMENTS / "gpu"])
def test_vnet_and_stvnet_share_data_seed_and_budget(folder):
    vnet = yaml.safe_load((folder / "vnet.yaml").read_text())
    st = yaml.safe_load((folder / "stvnet.yaml").read_text())
    assert vnet["data"] == st["data"] and vnet["seed_everything"] == st["seed_everything"]
    assert vnet["trainer"]["max_epochs"] == st["trainer"]["max_epochs"]
    assert vnet["model"]["net"]["init_args"] == st["model"]["net"]["init_args"]["vnet"]["init_args"]


def test_staged_vnet_control_differs_from_the_baseline_only_in_its_schedule():
    vnet = yaml.safe_load((EXPERIMENTS / "vnet.yaml").read_text())
    staged = yaml.safe_load((EXPERIMENTS / "vnet_staged.yaml").read_text())
    assert staged["run"]["name"] == "vnet_staged"
    for key in ("data", "model", "seed_everything"):
        assert staged[key] == vnet[key], key
    assert {k: v for k, v in staged["trainer"].items() if k != "callbacks"} == \
        {k: v for k, v in vnet["trainer"].items() if k != "callbacks"}
    extra = [c for c in staged["trainer"]["callbacks"] if c not in vnet["trainer"]["callbacks"]]
    assert [c["class_path"] for c in extra] == ["stvnet.callbacks.StageSchedule"]
