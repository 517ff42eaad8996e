"""Validation under DDP (2 CPU processes, gloo) gives the single-process metrics: per-subject rows are
gathered and de-duplicated, so the DistributedSampler's padding never biases them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stvnet.inference import find_checkpoint

SCRIPT = Path(__file__).with_name("ddp_validate.py")


def _validate(ckpt: Path, out: Path, devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parents[1]))
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(ckpt), str(out), str(devices)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_ddp_validation_equals_single_process(trained_runs, tmp_path):
    ckpt = find_checkpoint(trained_runs["vnet"])
    single = _validate(ckpt, tmp_path / "single.json", 1)
    ddp = _validate(ckpt, tmp_path / "ddp.json", 2)
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    # the tiny cohort's fold-0 validation set has an odd number of subjects: DDP pads it with a duplicate
    splits = json.loads((trained_runs["vnet"] / "splits.json").read_text())
    assert len(splits["folds"][0]["val"]) % 2 == 1
    for key in ("val/dice", "val/hd95", "val/assd", "val/sensitivity", "val/dice_male", "val/dice_female"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key


@pytest.mark.slow
def test_torchrun_ranks_train_into_one_run_folder(tiny_cohort, tmp_path):
    """`torchrun --standalone` starts each rank as its own `stvnet train`: one run folder, one metrics.csv."""
    from tests.conftest import tiny_train_args

    out = tmp_path / "runs"
    args = tiny_train_args(tiny_cohort, out, epochs=2) + [
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    env = dict(os.environ, PYTHONPATH=str(SCRIPT.parents[1]), OMP_NUM_THREADS="1")
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "STVNET_RUN_DIR"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "stvnet.cli", "train", *args], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "vnet" / "all" / "fold0").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-")
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert proc.stdout.count("Run folder:") == 1
