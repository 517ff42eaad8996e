"""Training end to end: the real CLI on a tiny cohort, run folders, and the V-Net learning."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stvnet.cli import main as cli_main
from stvnet.lightning_module import FemurSegmenter
from tests.conftest import tiny_train_args


def only_run_dir(out: Path) -> Path:
    runs = sorted(p for p in (out / "vnet" / "all" / "fold0").iterdir() if p.is_dir())
    assert len(runs) == 1
    return runs[0]


@pytest.mark.slow
def test_cli_training_lowers_loss_and_writes_a_complete_run_folder(tiny_cohort, tmp_path):
    out = tmp_path / "runs"
    assert cli_main(["train", *tiny_train_args(tiny_cohort, out, epochs=5)]) == 0
    run = only_run_dir(out)
    metrics = pd.read_csv(run / "metrics.csv")
    losses = metrics["train/loss_epoch"].dropna().to_numpy()
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert metrics["val/dice"].dropna().size == 5
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["manifest"] == str(tiny_cohort) and config["trainer"]["max_epochs"] == 5
    splits = json.loads((run / "splits.json").read_text())
    assert splits["fold"] == 0 and len(splits["folds"]) == 3 and splits["test"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "checkpoints").glob("best-epoch*.ckpt"))
    # the shared splits file lives under <out>/splits and is what the run used
    shared = list((out / "splits").glob("*.json"))
    assert len(shared) == 1 and json.loads(shared[0].read_text())["test"] == splits["test"]
    # a checkpoint alone rebuilds the model
    model = FemurSegmenter.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert type(model.net).__name__ == "VNet"
    # a second run never overwrites the first
    assert cli_main(["train", *tiny_train_args(tiny_cohort, out, epochs=1)]) == 0
    assert len(list((out / "vnet" / "all" / "fold0").iterdir())) == 2


def test_cli_help_lists_subcommands(capsys):
    assert cli_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "synth" in text
    assert cli_main(["nonsense"]) == 2


def test_train_reports_bad_manifest_by_subject(tiny_cohort, tmp_path):
    table = pd.read_csv(tiny_cohort)
    table["image"] = [str(tiny_cohort.parent / p) for p in table["image"]]
    table["label"] = [str(tiny_cohort.parent / p) for p in table["label"]]
    table.loc[2, "image"] = str(tmp_path / "missing.nii.gz")
    bad = tmp_path / "bad.csv"
    table.to_csv(bad, index=False)
    with pytest.raises(ValueError, match=f"{table.loc[2, 'subject_id']}: image file not found"):
        cli_main(["train", *tiny_train_args(bad, tmp_path / "runs", epochs=1)])


@pytest.mark.slow
def test_wandb_offline_run_logs_the_same_metrics(tiny_cohort, tmp_path):
    from tests.wandb_records import history

    out = tmp_path / "runs"
    args = [a for a in tiny_train_args(tiny_cohort, out, epochs=2) if a not in ("--run.wandb", "disabled")]
    assert cli_main(["train", *args, "--run.wandb", "offline", "--run.study", "unit-test"]) == 0
    run = only_run_dir(out)
    (wandb_file,) = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    rows = history(wandb_file)
    logged = [r["val/dice"] for r in rows if "val/dice" in r]
    local = pd.read_csv(run / "metrics.csv")["val/dice"].dropna().tolist()
    assert len(logged) == 2 and logged == pytest.approx(local, abs=1e-6)
    assert any("lr-AdamW" in r for r in rows)
