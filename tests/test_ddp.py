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
