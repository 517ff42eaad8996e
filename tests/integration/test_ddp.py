"""Validation under DDP (2 CPU processes, gloo) gives the single-process metrics: per-subject rows are
gathered and de-duplicated, so the DistributedSampler's padding never biases them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from stvnet.config import resolved_config
from stvnet.inference import find_checkpoint
from tests.conftest import (EXPERIMENT_FILES, EXPERIMENTS, ROOT, cpu_precision_args, launch_env, tiny_data_args,
                            tiny_train_args, train_in_subprocess, vnet_checkpoint)

pytestmark = pytest.mark.multiprocess  # training subprocesses and DDP ranks: make test-multiprocess
SCRIPT = Path(__file__).with_name("ddp_validate.py")  # beside this file: a script in tests/ would import tests/data_modules


def _validate(ckpt: Path, out: Path, devices: int) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), str(ckpt), str(out), str(devices)],
                          capture_output=True, text=True, env=launch_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_ddp_validation_equals_single_process(trained_runs, tmp_path):
    ckpt = find_checkpoint(trained_runs["vnet"])
    single = _validate(ckpt, tmp_path / "single.json", 1)
    ddp = _validate(ckpt, tmp_path / "ddp.json", 2)
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    # the tiny cohort's fold-0 validation set has an odd number of subjects: DDP pads it with a duplicate
    splits = json.loads((trained_runs["vnet"] / "splits.json").read_text())
    assert len(splits["folds"][0]["val"]) % 2 == 1
    assert ddp["val/subjects"] == single["val/subjects"] == len(splits["folds"][0]["val"])
    for key in ("val/dice", "val/loss", "val/hd95", "val/assd", "val/sensitivity", "val/dice_male", "val/dice_female"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key


def test_torchrun_ranks_train_into_one_run_folder(tiny_cohort, tmp_path):
    """`torchrun` starts each rank as its own `stvnet train`: the ranks of one launch share one run folder, and two
    launches with the same rendezvous id started together (a job array) never share one."""
    out = tmp_path / "runs"
    args = tiny_train_args(tiny_cohort, out, epochs=1) + [
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    env = launch_env()
    jobs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "array-7",
                              "-m", "stvnet.cli", "train", *args], env=env, cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for port in (29631, 29632)]
    logs = [job.communicate(timeout=900) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [err[-2000:] for _, err in logs]
    runs = sorted((out / "vnet" / "all" / "fold0").iterdir())
    assert len(runs) == 2
    for run in runs:  # each launch wrote one complete run: its ranks agreed on the folder
        assert (run / "checkpoints" / "last.ckpt").is_file()
        assert pd.read_csv(run / "metrics.csv")["val/dice"].dropna().size == 1
    assert sorted(stdout.split("Run folder: ")[1].split()[0] for stdout, _ in logs) == [str(r) for r in runs]


def test_staged_stvnet_trains_under_ddp_as_a_user_types_it(tiny_cohort, tmp_path):
    """2 gloo ranks through all three stages: ranks agree, each stage trains exactly its parts (weights and
    normalisation statistics), validation counts each subject once, one run folder, logged lr = lr in use."""
    out, probe = tmp_path / "runs", tmp_path / "probe"
    args = tiny_train_args(tiny_cohort, out, epochs=3, config="stvnet.yaml") + [
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
        "--model.net.init_args.backbone.init_args.norm", "batch",  # running statistics that a frozen V-Net must keep
        "--trainer.callbacks+=tests.ddp_probe.StageSnapshots", f"--trainer.callbacks.out={probe}"]
    proc = train_in_subprocess(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(probe / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert ranks[0]["stage"] == {0: "backbone", 1: "stn", 2: "finetune"}
    for epoch in ("init", 0, 1, 2):  # identical parameters and buffers on both ranks after every stage
        for key, value in ranks[0]["states"][epoch].items():
            assert torch.equal(value, ranks[1]["states"][epoch][key]), (epoch, key)
    states = ranks[0]["states"]

    def changed(before, after) -> set[str]:
        return {k.split(".")[0] for k in states[after] if not torch.equal(states[before][k], states[after][k])}

    assert changed("init", 0) == {"backbone"}  # stage 1: V-Net weights and BatchNorm statistics; STN, fusion untouched
    assert any("running_mean" in k and not torch.equal(states["init"][k], states[0][k]) for k in states[0])
    assert changed(0, 1) == {"stn", "fusion"}  # stage 2: the frozen V-Net keeps weights and statistics
    assert not torch.equal(states[1]["fusion.weight"], states["init"]["fusion.weight"])
    assert changed(1, 2) == {"backbone", "stn", "fusion"}

    (run,) = list((out / "stvnet" / "all" / "fold0").iterdir())
    assert proc.stdout.count("Run folder:") == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-epoch002.ckpt", "last.ckpt"]
    metrics = pd.read_csv(run / "metrics.csv")
    splits = json.loads((run / "splits.json").read_text())
    n_val = len(splits["folds"][0]["val"])
    assert n_val % 2 == 1  # odd: the DistributedSampler pads it with a duplicate, which must not be counted
    assert metrics["val/subjects"].dropna().tolist() == [n_val] * 3
    # the learning rate logged at each step is the one the optimiser used, across both stage switches
    logged = metrics.dropna(subset=["lr-AdamW"]).set_index("step")["lr-AdamW"]
    used = pd.Series(ranks[0]["lr"])
    assert len(logged) == len(used) and logged.to_numpy() == pytest.approx(used.loc[logged.index].to_numpy(), rel=1e-6)


CONFIGS = EXPERIMENT_FILES


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c.relative_to(EXPERIMENTS)) for c in CONFIGS])
def test_every_experiment_trains_under_ddp_as_typed(config, tiny_cohort, tmp_path):
    """`--trainer.devices 2 --trainer.strategy ddp` works for every shipped experiment, through all its stages."""
    resolved = resolved_config(config)
    out = tmp_path / "runs"
    args = ["--config", str(config), "--data.manifest", str(tiny_cohort), "--data.n_folds", "3",
            "--data.num_workers", "0", "--data.roi_size", "[32, 32, 32]", "--data.target_spacing", "[4.0, 4.0, 4.0]",
            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--run.out", str(out), "--run.wandb", "disabled",
            *cpu_precision_args(resolved)]  # float32 on the CPU: see tests/conftest.py
    if "from_vnet" in config.name:
        data = tiny_data_args(tiny_cohort, out / "splits")
        args += ["--model.init_weights", str(vnet_checkpoint(resolved, data, tmp_path / "vnet.ckpt"))]
    proc = train_in_subprocess(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = list((out / resolved["run"]["name"] / "all" / "fold0").iterdir())
    metrics = pd.read_csv(run / "metrics.csv")
    assert metrics["val/dice"].dropna().size == 3 and "MEMBER: 2/2" in proc.stderr + proc.stdout
