"""Resume is exact: a run killed mid-stage and resumed from last.ckpt ends where the uninterrupted run ends, in the
same stage schedule and the same W&B run, whatever max_epochs the resumed command asks for."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stvnet.config import resolved_config
from tests.conftest import ROOT, tiny_train_args, train_in_subprocess
from tests.wandb_records import history

pytestmark = pytest.mark.multiprocess  # training subprocesses and DDP ranks: make test-multiprocess


def _experiment(tmp_path: Path) -> Path:
    """experiments/stvnet.yaml with two epochs per stage (6 in all), so a kill after epoch 2 lands inside stage 2."""
    config = resolved_config(ROOT / "experiments" / "stvnet.yaml")
    schedule = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("StageSchedule"))
    for stage in schedule["init_args"]["stages"]:
        stage["epochs"] = 2
    path = tmp_path / "stvnet_2x3.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _val(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv").dropna(subset=["val/dice"]).set_index("epoch")


def test_kill_9_mid_stage_then_resume_ends_like_the_uninterrupted_run(tiny_cohort, tmp_path):
    config = _experiment(tmp_path)

    def args(out: Path, epochs: int = 6) -> list[str]:
        base = tiny_train_args(tiny_cohort, out, epochs=epochs, config=config)
        base = [a for a in base if a not in ("--run.wandb", "disabled")]
        # augmentation in a loader worker: the random streams a resumed run must reproduce
        return base + ["--run.wandb", "offline", "--data.augment", "1.0", "--data.num_workers", "1"]

    straight = train_in_subprocess(args(tmp_path / "a"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = train_in_subprocess(args(tmp_path / "b") + ["--trainer.callbacks+=tests.ddp_probe.KillAtEpoch",
                                            "--trainer.callbacks.epoch=3"])
    assert killed.returncode == -9
    (run,) = list((tmp_path / "b" / "stvnet" / "all" / "fold0").iterdir())
    last = run / "checkpoints" / "last.ckpt"
    saved = tmp_path / "epoch2.ckpt"
    shutil.copy(last, saved)
    resumed = train_in_subprocess(args(tmp_path / "b") + ["--ckpt_path", str(last)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    (reference,) = list((tmp_path / "a" / "stvnet" / "all" / "fold0").iterdir())
    a, b = _val(reference), _val(run)
    assert b.index.tolist() == list(range(6)) and b["val/stage"].tolist() == [0, 0, 1, 1, 2, 2]
    for key in ("val/dice", "val/loss", "val/hd95", "val/prior_dice"):
        assert b.loc[5, key] == pytest.approx(a.loc[5, key], abs=1e-4), key
    # the same W&B run continues (offline: two session folders under one id, synced in order by `wandb sync`)
    sessions = sorted((run / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and len({s.name.rsplit("-", 1)[1] for s in sessions}) == 1
    later = [r["val/dice"] for r in history(next(sessions[1].glob("run-*.wandb"))) if "val/dice" in r]
    assert later == pytest.approx(b.loc[3:5, "val/dice"].tolist(), abs=1e-6)

    # resumed with another max_epochs, the run stays in the stage it was in (a rescaled schedule would have put
    # epoch 3 in the last stage)
    again = tmp_path / "c"
    shutil.copytree(run, again / "run")
    shutil.copy(saved, again / "run" / "checkpoints" / "last.ckpt")
    shorter = train_in_subprocess(args(tmp_path / "c", epochs=4) + ["--ckpt_path", str(again / "run" / "checkpoints" / "last.ckpt")])
    assert shorter.returncode == 0, shorter.stderr[-3000:]
    assert _val(again / "run").loc[3, "val/stage"] == 1
