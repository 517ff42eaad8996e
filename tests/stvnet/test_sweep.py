"""Optuna sweeps: shared studies across workers, pruning, failures that do not stop the study, results files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from data_modules.errors import UserError
from stvnet.config import resolved_config
from stvnet.studies import make_storage
from stvnet.sweep import config_path, run_sweep, set_path, trial_config, validate_space
from tests.conftest import ROOT


def _space(tmp_path: Path, manifest: Path, name: str, **changes) -> Path:
    spec = {
        "base_config": str(ROOT / "experiments" / "vnet.yaml"),
        "objective": {"metric": "val/dice", "direction": "maximize", "folds": [0]},
        "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
        "pruner": {"name": "none"},
        "overrides": {
            "data.manifest": str(manifest), "data.n_folds": 3, "data.num_workers": 0, "data.augment": 0.0,
            "data.roi_size": [32, 32, 32], "data.target_spacing": [4.0, 4.0, 4.0], "run.wandb": "disabled",
            "trainer.max_epochs": 2, "model.net.init_args.base_channels": 4, "model.net.init_args.depth": 2,
        },
        "space": {"model.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    }
    spec.update(changes)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_set_path_reaches_into_lists():
    config = {"trainer": {"callbacks": [{"a": 1}, {"init_args": {"stages": [{"epochs": 3}]}}]}}
    set_path(config, "trainer.callbacks.1.init_args.stages.0.epochs", 7)
    set_path(config, "model.lr", 0.1)
    assert config["trainer"]["callbacks"][1]["init_args"]["stages"][0]["epochs"] == 7 and config["model"]["lr"] == 0.1


def test_a_space_tunes_stages_by_name_and_keeps_the_sampled_lengths(tmp_path):
    base = resolved_config(ROOT / "experiments" / "stvnet.yaml")
    spec = {"base_config": "experiments/stvnet.yaml", "space": {
        "stages.stn.epochs": {"type": "int", "low": 1, "high": 3},
        "stages.finetune.loss_weights.prior": {"type": "float", "low": 0.0, "high": 1.0}}}
    validate_space(spec, base, "space.yaml")
    # the StageSchedule moved to the front, its stages reversed: the names still find the same stages
    moved = resolved_config(ROOT / "experiments" / "stvnet.yaml")
    callbacks = moved["trainer"]["callbacks"]
    callbacks.insert(0, callbacks.pop(next(i for i, c in enumerate(callbacks) if "StageSchedule" in c["class_path"])))
    callbacks[0]["init_args"]["stages"].reverse()
    assert config_path(moved, "stages.stn.epochs") == "trainer.callbacks.0.init_args.stages.1.epochs"
    assert config_path(moved, "stages.backbone.lr_scale") == "trainer.callbacks.0.init_args.stages.2.lr_scale"
    for config in (base, moved):
        trial = trial_config(spec, config, {"stages.stn.epochs": 3, "stages.finetune.loss_weights.prior": 0.25},
                             "journal:x", "s", 0, tmp_path / "run", tmp_path)
        schedule = next(c for c in trial["trainer"]["callbacks"] if "StageSchedule" in c["class_path"])["init_args"]
        stages = {stage["name"]: stage for stage in schedule["stages"]}
        assert stages["stn"]["epochs"] == 3 and stages["finetune"]["loss_weights"]["prior"] == 0.25
        # the sampled length is trained as sampled: no rescaling, the budget is the stages' sum
        assert schedule["scale_to_max_epochs"] is False
        assert trial["trainer"]["max_epochs"] == sum(stage["epochs"] for stage in schedule["stages"]) == 20 + 3 + 3
    with pytest.raises(UserError) as refused:
        validate_space({"base_config": "b.yaml", "space": {
            "trainer.callbacks.2.init_args.stages.1.epochs": {"type": "int", "low": 1, "high": 3},
            "stages.warmup.epochs": {"type": "int", "low": 1, "high": 3}}}, base, "space.yaml")
    assert refused.value.lines == [
        "space.yaml: space key 'trainer.callbacks.2.init_args.stages.1.epochs' addresses a callback by its position; "
        "name a stage instead, e.g. 'stages.stn.epochs' or 'stages.finetune.lr_scale'",
        "space.yaml: space key 'stages.warmup.epochs' names no stage of b.yaml (stages: backbone, stn, finetune)"]


@pytest.mark.multiprocess
def test_two_workers_share_one_journal_study(tiny_cohort, tmp_path):
    space = _space(tmp_path, tiny_cohort, "shared")
    out = tmp_path / "sweeps"
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "stvnet.cli", "sweep", "--space", str(space), "--trials", "4", "--out", str(out)]
    workers = [subprocess.Popen(cmd + ["--worker", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for i in range(2)]
    logs = [w.communicate(timeout=900)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), logs
    study = optuna.load_study(study_name="shared", storage=make_storage(None, out, "shared"))
    trials = study.get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and 4 <= len(trials) <= 5
    assert all(t.state == TrialState.COMPLETE for t in trials), [(t.number, t.state, t.user_attrs) for t in trials]
    assert all("[sweep] trial" in log for log in logs)  # both workers ran trials
    # results: best config reproduces the best trial, plots exist
    best = yaml.safe_load((out / "shared" / "best.yaml").read_text())
    assert best["model"]["lr"] == pytest.approx(study.best_params["model.lr"])
    assert not any("OptunaPruning" in c["class_path"] for c in best["trainer"]["callbacks"])
    assert (out / "shared" / "history.png").is_file() and (out / "shared" / "importances.png").is_file()
    assert (out / "shared" / f"trial_{study.best_trial.number:04d}" / "fold0" / "metrics.csv").is_file()


@pytest.mark.multiprocess
def test_pruned_and_failed_trials_are_recorded_and_the_study_goes_on(tiny_cohort, tmp_path):
    out = tmp_path / "sweeps"
    pruned = run_sweep(_space(tmp_path, tiny_cohort, "prune", pruner={"name": "threshold", "lower": 0.999}),
                       n_trials=1, out=out)
    assert [t.state for t in pruned.trials] == [TrialState.PRUNED]
    assert (out / "prune" / "trial_0000" / "fold0" / "pruned.json").is_file()

    failing = _space(tmp_path, tiny_cohort, "fail", space={"model.lr": {"type": "float", "low": -2.0, "high": -1.0}})
    # every trial failed: the sweep says so and exits non-zero
    from stvnet.cli import main as cli_main

    assert cli_main(["sweep", "--space", str(failing), "--trials", "1", "--out", str(out)]) == 1
    study = run_sweep(failing, n_trials=2, out=out)  # resumed: one more trial
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert "Invalid learning rate" in study.trials[0].user_attrs["fail_reason"]
    # a resumed study samples new values rather than replaying the first session's seeded stream
    assert study.trials[0].params != study.trials[1].params
    # the same study resumes with a working space and completes a trial
    working = {"model.lr": {"type": "float", "low": 1e-3, "high": 1e-2}}  # same distribution kind as before
    resumed = run_sweep(_space(tmp_path, tiny_cohort, "fail", space=working), n_trials=3, out=out)
    assert [t.state for t in resumed.trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert (out / "fail" / "best.yaml").is_file()


@pytest.mark.multiprocess
def test_two_workers_share_a_postgresql_study(tiny_cohort, tmp_path):
    url = os.environ.get("STVNET_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: run `export STVNET_TEST_POSTGRES_URL=$(bash .ci/postgres.sh)` (CI does) to enable this test")
    study_name = f"pg-{os.getpid()}-{tmp_path.name}"
    space = _space(tmp_path, tiny_cohort, "pg")
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "stvnet.cli", "sweep", "--space", str(space), "--trials", "2", "--study", study_name,
           "--storage", url, "--out", str(tmp_path / "sweeps")]
    workers = [subprocess.Popen(cmd + ["--worker", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for i in range(2)]
    logs = [w.communicate(timeout=900)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), logs
    study = optuna.load_study(study_name=study_name, storage=url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and 2 <= len(numbers) <= 3
    assert all(t.state == TrialState.COMPLETE for t in study.trials), [(t.number, t.state, t.user_attrs) for t in study.trials]
    optuna.delete_study(study_name=study_name, storage=url)


@pytest.mark.multiprocess
def test_two_device_sweep_of_stvnet_trials_completes_and_prunes(tiny_cohort, tmp_path):
    """`stvnet sweep --devices 2` runs each staged ST-V-Net trial as 2-rank DDP (gloo on CPU): trials complete, and a
    pruned trial stops both ranks and is recorded as PRUNED."""
    stvnet = {
        "data.manifest": str(tiny_cohort), "data.n_folds": 3, "data.num_workers": 0, "data.augment": 0.0,
        "data.roi_size": [32, 32, 32], "data.target_spacing": [4.0, 4.0, 4.0], "run.wandb": "disabled",
        "trainer.max_epochs": 3, "trainer.accelerator": "cpu",
        "model.net.init_args.backbone.init_args.base_channels": 4, "model.net.init_args.backbone.init_args.depth": 2,
    }
    out = tmp_path / "sweeps"
    space = _space(tmp_path, tiny_cohort, "ddp", base_config=str(ROOT / "experiments" / "stvnet.yaml"), overrides=stvnet)
    study = run_sweep(space, n_trials=2, out=out, devices=2)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2, [t.user_attrs for t in study.trials]
    for trial in study.trials:
        folder = out / "ddp" / f"trial_{trial.number:04d}"
        log = (folder / "fold0.log").read_text()
        assert "MEMBER: 2/2" in log  # two DDP ranks trained this trial
        metrics = pd.read_csv(folder / "fold0" / "metrics.csv")
        assert sorted(set(metrics["val/stage"].dropna())) == [0, 1, 2]  # through every stage
        assert trial.value == pytest.approx(metrics["val/dice"].max())
    space = _space(tmp_path, tiny_cohort, "ddp_prune", base_config=str(ROOT / "experiments" / "stvnet.yaml"),
                   overrides=stvnet, pruner={"name": "threshold", "lower": 0.999})
    pruned = run_sweep(space, n_trials=1, out=out, devices=2)
    assert [t.state for t in pruned.trials] == [TrialState.PRUNED]
    assert (out / "ddp_prune" / "trial_0000" / "fold0" / "pruned.json").is_file()
