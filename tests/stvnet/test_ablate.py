"""The study tools: `stvnet ablate` survives a crashed cell and resumes; `stvnet compare` reads local records."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stvnet.ablate import Cell
from stvnet.cli import main as cli_main
from stvnet.compare import compare_runs
from stvnet.config import resolved_config
from tests.conftest import ROOT, png_colours


def _tiny_extra(manifest: Path) -> list[str]:
    return ["--data.manifest", str(manifest), "--data.n_folds", "3", "--data.num_workers", "0",
            "--data.roi_size", "[32, 32, 32]", "--data.target_spacing", "[4.0, 4.0, 4.0]", "--data.augment", "0.0",
            "--trainer.max_epochs", "3", "--run.wandb", "disabled"]


@pytest.mark.multiprocess
def test_ablation_matrix_records_failures_resumes_and_reports(tiny_cohort, tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    config = resolved_config(ROOT / "experiments" / "vnet.yaml")
    config["model"]["lr"] = -1.0  # valid options that crash once training starts (torch refuses the rate)
    broken.write_text(yaml.safe_dump(config))
    out = tmp_path / "study"
    configs = [str(ROOT / "experiments" / "vnet.yaml"), str(ROOT / "experiments" / "stvnet.yaml"), str(broken)]
    argv = ["ablate", "--configs", *configs, "--cohorts", "all", "female", "--folds", "0", "--out", str(out),
            "--", *_tiny_extra(tiny_cohort)]
    assert cli_main(argv) == 1  # the broken cells failed ...
    status = json.loads((out / "status.json").read_text())
    assert len(status) == 6
    assert {k for k, v in status.items() if v["status"] == "done"} == {
        "vnet/all/fold0", "vnet/female/fold0", "stvnet/all/fold0", "stvnet/female/fold0"}
    assert "Invalid learning rate" in status["broken/all/fold0"]["error"]
    # ... and the others were evaluated and compared
    report = (out / "report.md").read_text()
    for model in ("vnet", "stvnet", "vnet-female", "stvnet-female"):
        assert f"| {model} |" in report
    per_subject = pd.read_csv(out / "evaluation" / "per_subject.csv")
    assert set(per_subject["model"]) == {"vnet", "stvnet", "vnet-female", "stvnet-female"}
    assert (per_subject.loc[per_subject["model"].str.endswith("female"), "sex"] == "F").all()
    assert (out / "comparison" / "learning_curves.png").stat().st_size > 10_000
    capsys.readouterr()
    # a cell interrupted mid-run (the ablation was killed) resumes from its last checkpoint in its own folder
    interrupted = dict(status)
    interrupted["vnet/all/fold0"] = {**status["vnet/all/fold0"], "status": "running"}
    (out / "status.json").write_text(json.dumps(interrupted))
    # a re-run skips finished cells and retries only the others
    assert cli_main(argv + ["--trainer.max_epochs", "4"]) == 1
    printed = capsys.readouterr().out
    assert printed.count("done, skipped") == 3 and printed.count("broken/") >= 2
    after = json.loads((out / "status.json").read_text())
    assert after["stvnet/all/fold0"] == status["stvnet/all/fold0"]
    assert after["vnet/all/fold0"]["status"] == "done" and after["vnet/all/fold0"]["run"] == status["vnet/all/fold0"]["run"]
    curve = pd.read_csv(Path(after["vnet/all/fold0"]["run"]) / "metrics.csv").dropna(subset=["val/dice"])
    assert curve["epoch"].tolist() == [0, 1, 2, 3]


@pytest.mark.slow
def test_compare_reports_convergence_and_learning_curves(trained_runs, tmp_path):
    table = compare_runs([trained_runs["vnet"], trained_runs["vnet_b"]], tmp_path / "cmp", threshold=0.05)
    assert set(table["model"]) == {"vnet", "vnet_b"}
    metrics = pd.read_csv(trained_runs["vnet"] / "metrics.csv").dropna(subset=["val/dice"])
    best = metrics["val/dice"].max()
    assert table.set_index("model").loc["vnet", "val_dice"] == pytest.approx(best)
    first = metrics.reset_index(drop=True)
    reached = first.index[first["val/dice"] >= 0.05]
    expected = int(first.loc[reached[0], "epoch"]) + 1 if len(reached) else None
    got = table.set_index("model").loc["vnet", "epochs_to_threshold"]
    assert (pd.isna(got) and expected is None) or got == expected
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| all | vnet | 1 (1 x 1) |" in md and "learning_curves.png" in md
    # one 5.5 x 4 in panel per cohort at 110 dpi with both models' curves (matplotlib's first two colours)
    size, counts = png_colours(tmp_path / "cmp" / "learning_curves.png", {"vnet": (0.12, 0.47, 0.71), "vnet_b": (1.0, 0.5, 0.05)})
    assert size == (round(5.5 * 110), round(4 * 110)) and counts["vnet"] > 50 and counts["vnet_b"] > 50, counts


def test_each_seed_is_a_cell_of_its_own_trained_with_that_seed(tmp_path, monkeypatch):
    """--seeds repeats every cell once per seed (its own status entry, run folder and --seed_everything); a re-run
    skips the finished ones."""
    import stvnet.ablate as ablate

    commands = []

    class FakeTrain:  # a training process that writes its run's metrics and exits at once
        def __init__(self, cmd, **_):
            commands.append(cmd)
            run = Path(cmd[cmd.index("--run.dir") + 1])
            run.mkdir(parents=True)
            (run / "metrics.csv").write_text("epoch,val/dice\n0,0.5\n")
            self.returncode = 0

        def poll(self):
            return self.returncode

    monkeypatch.setattr(ablate.subprocess, "Popen", FakeTrain)
    config = str(ROOT / "experiments" / "vnet.yaml")
    status = ablate.run_ablation([config], ["all"], [0, 1], tmp_path / "study", evaluate=False, seeds=[3, 4])
    assert sorted(status) == ["vnet/all/fold0/seed3", "vnet/all/fold0/seed4", "vnet/all/fold1/seed3",
                              "vnet/all/fold1/seed4"]
    for cmd in commands:
        seed = cmd[cmd.index("--seed_everything") + 1]
        fold = cmd[cmd.index("--data.fold") + 1]
        key = f"vnet/all/fold{fold}/seed{seed}"
        assert status[key]["status"] == "done" and status[key]["seed"] == int(seed)
        assert Path(status[key]["run"]).parent.name == key.replace("/", "_")
    assert len({status[k]["run"] for k in status}) == 4
    commands.clear()
    ablate.run_ablation([config], ["all"], [0, 1], tmp_path / "study", evaluate=False, seeds=[3, 4])
    assert commands == []
    ablate.run_ablation([config], ["all"], [0], tmp_path / "plain", evaluate=False)  # no --seeds: the config's seed
    assert "--seed_everything" not in commands[0] and "vnet/all/fold0" in json.loads(
        (tmp_path / "plain" / "status.json").read_text())


def test_compare_counts_runs_over_folds_and_seeds_and_reports_the_warped_priors_dice(tmp_path):
    """Hand-written run records (no training): each run stands by its best final-stage epoch, where the warped
    prior's Dice is read too; the table counts runs as folds x seeds and averages over all of them."""
    schedule = {"trainer": {"callbacks": [{"class_path": "stvnet.callbacks.StageSchedule",
                                           "init_args": {"stages": [{"name": "vnet"}, {"name": "all"}]}}]}}
    runs = []
    for fold, seed, prior in ((0, 0, 0.6), (0, 1, 0.7), (1, 0, 0.8), (1, 1, 0.9)):
        run = tmp_path / f"f{fold}s{seed}"
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "stvnet"}, "seed_everything": seed,
                                                         "data": {"cohort": "all", "fold": fold}, **schedule}))
        # stage 0 reaches the best Dice, but the checkpoint policy takes the final stage's best epoch (2)
        pd.DataFrame({"epoch": [0, 1, 2, 3], "val/stage": [0, 1, 1, 1], "val/dice": [0.95, 0.80, 0.90, 0.85],
                      "val/prior_dice": [0.1, 0.2, prior, 0.3], "val/hd95": 1.0, "val/assd": 1.0}).to_csv(
            run / "metrics.csv", index=False)
        runs.append(run)
    table = compare_runs(runs, tmp_path / "cmp", threshold=0.9)
    assert table["seed"].tolist() == [0, 1, 0, 1] and (table["best_epoch"] == 2).all()
    assert table["val_prior_dice"].tolist() == pytest.approx([0.6, 0.7, 0.8, 0.9])
    assert table["epochs_to_threshold"].tolist() == [1, 1, 1, 1]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    sd = pd.Series([0.6, 0.7, 0.8, 0.9]).std()
    assert "| all | stvnet | 4 (2 x 2) | 0.9000 ± 0.0000 |" in md and f"| 0.7500 ± {sd:.4f} |" in md


def _cell(tmp_path: Path, name: str, code: str) -> Cell:
    """A study cell whose 'training' is a few lines of Python run in the cell's run folder."""
    import sys

    run = tmp_path / "runs" / name / "t0"
    run.mkdir(parents=True)
    return Cell(name, [sys.executable, "-c", f"import os, sys, time\nos.chdir({str(run)!r})\n{code}"], run)


def test_cells_train_jobs_at_a_time_each_with_its_share_of_the_cores(tmp_path):
    """--jobs 2: two cells run at once, never three; each sees unbuffered output and half the cores; a cell that
    fails is recorded with its log's last lines while the others finish."""
    import os

    from stvnet.ablate import train_cells

    work = ("open('start', 'w').write(repr(time.time())); time.sleep(1.0)\n"
            "open('env', 'w').write(os.environ['OMP_NUM_THREADS'] + ' ' + os.environ['PYTHONUNBUFFERED'])\n"
            "open('end', 'w').write(repr(time.time())); open('metrics.csv', 'w').write('epoch\\n0\\n')")
    cells = [_cell(tmp_path, f"c{i}", work) for i in range(3)]
    cells.append(_cell(tmp_path, "broken", "print('loading ...'); sys.exit('stvnet train: error: no such manifest')"))
    status = {c.key: {"status": "pending", "run": str(c.run_dir)} for c in cells}
    train_cells(cells, status, tmp_path / "status.json", jobs=2)
    assert {k: v["status"] for k, v in status.items()} == {"c0": "done", "c1": "done", "c2": "done", "broken": "failed"}
    assert status["broken"]["exit"] == 1 and status["broken"]["error"].splitlines() == [
        "loading ...", "stvnet train: error: no such manifest"]
    spans = [(float((c.run_dir / "start").read_text()), float((c.run_dir / "end").read_text())) for c in cells[:3]]
    overlapping = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert overlapping == 2  # c0 and c1 together, c2 after one of them
    share = max(1, (os.cpu_count() or 1) // 2)
    assert {(c.run_dir / "env").read_text() for c in cells[:3]} == {f"{share} 1"}
    assert json.loads((tmp_path / "status.json").read_text()) == status


def test_each_job_gets_one_gpu_in_turn_unless_the_user_chose():
    from stvnet.ablate import cell_environment

    assert [cell_environment(slot, 4, gpus=2)["CUDA_VISIBLE_DEVICES"] for slot in range(4)] == ["0", "1", "0", "1"]
    assert "CUDA_VISIBLE_DEVICES" not in cell_environment(0, 1, gpus=2)  # one job: Lightning's devices decide


def test_an_interrupted_study_stops_its_cells_and_can_continue_them(tmp_path):
    """SIGTERM (a scheduler's time limit) or Ctrl-C: the running cells are stopped, not orphaned, and recorded as
    interrupted, so the same command continues them; the signal that `timeout` sends the whole process group next does
    not break the clean-up."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cell = _cell(tmp_path, "long", "open('pid', 'w').write(str(os.getpid())); time.sleep(120)")
    driver = (f"import sys; sys.path[:0] = {sys.path!r}\n"
              "from pathlib import Path\nfrom stvnet.ablate import Cell, train_cells\n"
              f"cell = Cell('long', {cell.cmd!r}, Path({str(cell.run_dir)!r}))\n"
              "try:\n"
              f"    train_cells([cell], {{'long': {{'status': 'pending'}}}}, Path({str(tmp_path / 'status.json')!r}))\n"
              "except KeyboardInterrupt:\n    sys.exit(130)")
    proc = subprocess.Popen([sys.executable, "-c", driver], stderr=subprocess.PIPE, text=True, start_new_session=True)
    pid_file = cell.run_dir / "pid"
    deadline = time.time() + 60
    while not pid_file.is_file() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.2)
    child = int(pid_file.read_text())
    proc.send_signal(signal.SIGTERM)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "the same command continues them" in err and "Traceback" not in err, err
    assert json.loads((tmp_path / "status.json").read_text())["long"]["status"] == "interrupted"
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)
