"""The two places where this project relies on Lightning's internals, kept in this one module, each with why and
each pinned by a test of Lightning's own behaviour (``tests/stvnet/test_lightning_adapters.py``), so an upgrade that changes them fails
there first:

* :class:`ResumableCSVLogger` overrides ``ExperimentWriter._check_log_dir_exists``: Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts in a non-empty folder, so a run
  resumed with ``--ckpt_path <run>/checkpoints/last.ckpt`` would lose its learning curve up to the checkpoint. Here
  the earlier rows are kept; rows of epochs that the resumed run trains again (work done after the checkpoint was
  written, before the crash) are dropped so every epoch appears once.
* :func:`built_by_lightning_cli` reads ``_given_hyperparameters``, the context variable LightningCLI sets while it
  instantiates a module from its config: only then is ``net`` recorded among the hyperparameters (as its class_path
  and init_args), so that ``load_from_checkpoint`` rebuilds the network from the checkpoint alone. Lightning has no
  public way to ask.
"""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def built_by_lightning_cli() -> bool:
    """Whether the LightningModule being constructed is instantiated by LightningCLI from a config."""
    return _given_hyperparameters.get() is not None


class _ResumableWriter(ExperimentWriter):
    """Appends to an existing ``metrics.csv`` after trimming epochs the new rows repeat."""

    def _check_log_dir_exists(self) -> None:
        self._earlier_rows: list[dict[str, str]] = []
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                self._earlier_rows = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def save(self) -> None:
        if self._earlier_rows and self.metrics:
            epochs = [m["epoch"] for m in self.metrics if "epoch" in m]
            first_new = min(epochs) if epochs else float("inf")
            kept = [r for r in self._earlier_rows if not r.get("epoch") or float(r["epoch"]) < first_new]
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(kept)
            self._earlier_rows = []
        super().save()


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``<save_dir>/metrics.csv`` that keeps a resumed run's earlier epochs."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment
