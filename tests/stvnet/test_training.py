"""Training end to end: the real CLI on a tiny cohort, run folders, and the V-Net learning."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from stvnet.cli import main as cli_main
from stvnet.lightning_module import FemurSegmenter
from tests.conftest import ROOT, tiny_train_args


def only_run_dir(out: Path) -> Path:
    runs = sorted(p for p in (out / "vnet" / "all" / "fold0").iterdir() if p.is_dir())
    assert len(runs) == 1
    return runs[0]


@pytest.mark.not_in_mutation_run
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
    # last.ckpt is the final epoch (the resume point), not the best one
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 4
    assert list((run / "checkpoints").glob("best-epoch*.ckpt"))
    # the shared splits file lives under <out>/splits and is what the run used
    shared = list((out / "splits").glob("*.json"))
    assert len(shared) == 1 and json.loads(shared[0].read_text())["test"] == splits["test"]
    # a checkpoint alone rebuilds the model
    model = FemurSegmenter.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    assert type(model.net).__name__ == "VNet"
    # resuming continues in the same folder and metrics.csv keeps the epochs before the checkpoint
    last = run / "checkpoints" / "last.ckpt"
    assert cli_main(["train", *tiny_train_args(tiny_cohort, out, epochs=7), "--ckpt_path", str(last)]) == 0
    assert only_run_dir(out) == run
    resumed = pd.read_csv(run / "metrics.csv")
    val = resumed.dropna(subset=["val/dice"])
    assert val["epoch"].tolist() == list(range(7))
    assert val["val/dice"].iloc[:5].tolist() == pytest.approx(metrics["val/dice"].dropna().tolist())
    # a second run never overwrites the first
    assert cli_main(["train", *tiny_train_args(tiny_cohort, out, epochs=1)]) == 0
    assert len(list((out / "vnet" / "all" / "fold0").iterdir())) == 2


def test_cli_help_lists_subcommands(capsys):
    assert cli_main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "synth" in text
    assert cli_main(["nonsense"]) == 2


@pytest.mark.not_in_mutation_run
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


def test_ranks_of_an_external_launch_share_one_run_folder(tmp_path, monkeypatch):
    """torchrun and srun start every rank separately: the ranks of one launch agree on one run folder, and two
    launches never share one, even with the same rendezvous id in the same second."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from stvnet.config import RunOptions
    from stvnet.training import RUN_DIR_ENV, run_dir_for

    options = RunOptions(out=str(tmp_path), name="stvnet")

    def rank_sees(**env: str) -> Path:
        monkeypatch.setenv(RUN_DIR_ENV, "")  # each rank is a fresh process
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return run_dir_for(options, "all", 1, None)

    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID", "WORLD_SIZE",
                "TORCHELASTIC_USE_AGENT_STORE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    launches = []
    for _ in range(2):  # two torchrun agents, each with its own store, same run id
        store = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30))
        agent = dict(TORCHELASTIC_RUN_ID="array-7", TORCHELASTIC_USE_AGENT_STORE="True", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(store.port), WORLD_SIZE="2")
        launches.append([rank_sees(**agent, RANK=str(r)) for r in range(2)])
        del store
    assert launches[0][0] == launches[0][1] and launches[1][0] == launches[1][1]
    assert launches[0][0] != launches[1][0] and launches[0][0].parent == tmp_path / "stvnet" / "all" / "fold1"
    for var in ("TORCHELASTIC_USE_AGENT_STORE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var)
    slurm = [rank_sees(SLURM_JOB_ID="4711", SLURM_NTASKS="8", SLURM_STEP_ID="0") for _ in range(2)]
    assert slurm[0] == slurm[1] == tmp_path / "stvnet" / "all" / "fold1" / "slurm-4711-0"
    monkeypatch.delenv("SLURM_JOB_ID")
    with pytest.raises(ValueError, match="--run.dir"):
        rank_sees(WORLD_SIZE="2")
    options.dir = str(tmp_path / "mine")
    assert rank_sees(WORLD_SIZE="2") == tmp_path / "mine"


def test_resumed_online_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """Resuming a run folder reuses its W&B run id, online and offline (offline sessions sync into one run)."""
    from stvnet.config import RunOptions
    from stvnet.training import make_wandb_logger

    monkeypatch.delenv("WANDB_MODE", raising=False)

    run = tmp_path / "run"
    (run / "wandb" / "run-20261124_101010-abc123xy").mkdir(parents=True)
    online = make_wandb_logger(RunOptions(wandb="online"), run, "all", 0)
    assert online.version == "abc123xy"
    offline = make_wandb_logger(RunOptions(wandb="offline"), run, "all", 0)
    assert offline.version == "abc123xy"
    fresh = make_wandb_logger(RunOptions(wandb="online"), tmp_path / "new", "all", 0)
    assert fresh.version != "abc123xy"


def test_command_line_keys_win_over_the_config_wherever_they_are_written(capsys):
    """jsonargparse alone would let a later --config silently undo an earlier --data.fold."""
    config = str(ROOT / "experiments" / "vnet.yaml")
    with pytest.raises(SystemExit) as done:
        cli_main(["train", "--data.fold", "2", "--model.lr", "0.005", "--config", config, "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["fold"] == 2 and printed["model"]["lr"] == 0.005
    assert printed["trainer"]["max_epochs"] == 24  # the packaged defaults', under the experiment's delta


def test_staged_runs_get_a_ddp_strategy_that_tolerates_frozen_parts(monkeypatch):
    """What a user types (`ddp`, or `auto` on several devices) becomes DDP with unused-parameter detection."""
    from stvnet.training import strategy_for_stages

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    found = "ddp_find_unused_parameters_true"
    assert strategy_for_stages("ddp", 2, 1, "cpu") == found
    assert strategy_for_stages("ddp_spawn", 2, 1, "cpu") == "ddp_spawn_find_unused_parameters_true"
    for devices in (2, [0, 1], "0,1", "2"):
        assert strategy_for_stages("auto", devices, 1, "gpu") == found, devices
    assert strategy_for_stages("auto", 1, 2, "gpu") == found  # two nodes
    for devices in (1, [0], "1", "auto"):
        assert strategy_for_stages("auto", devices, 1, "cpu") == "auto", devices  # one process: no DDP at all
    assert strategy_for_stages("fsdp", 2, 1, "gpu") == "fsdp"
    monkeypatch.setenv("WORLD_SIZE", "4")  # started by torchrun or srun
    assert strategy_for_stages("auto", 1, 1, "gpu") == found
