"""The upstream behaviour that stvnet adapts to where no public API does the job. Each test fails loudly when a
Lightning upgrade changes it, so the adapter is revisited instead of silently misbehaving."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from data_modules.datamodule import FemurDataModule
from stvnet.lightning_module import FemurSegmenter


def test_lightnings_csv_logger_still_deletes_an_earlier_metrics_file(tmp_path):
    """Why ``stvnet.lightning_adapters.ResumableCSVLogger`` exists: a resumed run would lose its learning curve. It hooks
    ``ExperimentWriter._check_log_dir_exists``, the step that deletes the file; if Lightning renames it or starts to
    append, this fails and the adapter must follow."""
    assert callable(getattr(ExperimentWriter, "_check_log_dir_exists", None))
    (tmp_path / "metrics.csv").write_text("epoch,step,val/dice\n0,1,0.5\n")
    CSVLogger(save_dir=str(tmp_path), name="", version="").experiment  # noqa: B018 (creates the writer)
    assert not (tmp_path / "metrics.csv").exists()


def test_a_network_given_by_the_cli_is_recorded_as_its_class_path(monkeypatch):
    """``FemurSegmenter`` asks Lightning's ``_given_hyperparameters`` (``stvnet.lightning_adapters.built_by_lightning_cli``) whether LightningCLI built it: then ``net`` is
    saved as class_path/init_args (checkpoints rebuild it alone); from Python it is left out (no pickled module)."""
    monkeypatch.setattr(sys, "argv", ["stvnet"])
    cli = LightningCLI(FemurSegmenter, FemurDataModule, run=False, args=[
        "--model.net", "stvnet.models.VNet", "--model.net.init_args.base_channels", "4",
        "--model.net.init_args.depth", "2", "--data.num_workers", "0"])
    net = cli.model.hparams["net"]
    assert net["class_path"] == "stvnet.models.VNet" and net["init_args"]["base_channels"] == 4
    from stvnet.models import VNet

    assert "net" not in FemurSegmenter(VNet(base_channels=4, depth=2)).hparams
