"""Bad options, files and folders given to each subcommand: one line per problem (``stvnet <cmd>: error: ...``),
exit status 2, no traceback, and nothing written or changed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml

from stvnet.cli import main as cli_main
from tests.conftest import ROOT, tiny_train_args


def _files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.exists() else {}


def _refused(argv: list[str], capsys, expected: str, watched: Path) -> None:
    """``argv`` exits 2 with one line (or several, all user errors) holding ``expected``, and ``watched`` (a folder
    the command could have written to) is left as it was."""
    before = _files(watched)
    assert cli_main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    prefix = f"stvnet {argv[0]}: error: "
    errors = [line for line in err if line.startswith(prefix)]
    assert errors and any(expected in line for line in errors), err
    assert not any("Traceback" in line for line in err), err
    assert _files(watched) == before, "a refused command wrote or changed files"


# ---------------------------------------------------------------------------------------------------- train options
def _male_only(manifest: Path, tmp: Path) -> Path:
    table = pd.read_csv(manifest)
    table["image"] = [str(manifest.parent / p) for p in table["image"]]
    table["label"] = [str(manifest.parent / p) for p in table["label"]]
    table.assign(sex="M").to_csv(tmp / "men.csv", index=False)
    return tmp / "men.csv"


TRAIN_OPTIONS = {
    "fold past the last": (["--data.fold", "5"], "data.fold 5: must be in 0..2 (data.n_folds is 3)"),
    "unknown cohort": (["--data.cohort", "women"], "data.cohort women: must be one of all, male, female"),
    "zero ROI": (["--data.roi_size", "[0, 32, 32]"], "data.roi_size [0, 32, 32]: must be three voxel counts > 0"),
    "reversed HU window": (["--data.hu_window", "[1000, -200]"], "data.hu_window [1000.0, -200.0]: must be [low, high]"),
    "negative spacing": (["--data.target_spacing", "[-4.0, 4.0, 4.0]"], "data.target_spacing [-4.0, 4.0, 4.0]: must"),
    "one fold": (["--data.n_folds", "1"], "data.n_folds 1: cross-validation needs at least 2 folds"),
    "test fraction above 1": (["--data.test_fraction", "1.5"], "data.test_fraction 1.5: must be in [0, 1)"),
    "empty batches": (["--data.batch_size", "0"], "data.batch_size 0: must be at least 1"),
    "unknown label interpolation": (["--data.label_interpolation", "cubic"],
                                    "data.label_interpolation cubic: must be one of nearest, linear"),
    "patch larger than the ROI": (["--data.patch_size", "[48, 48, 48]"],
                                  "data.patch_size [48, 48, 48]: larger than data.roi_size [32, 32, 32]"),
    "misspelt option": (["--model.lrr", "0.1"], "unrecognized arguments: --model.lrr 0.1; see stvnet train --help"),
    "option of the wrong type": (["--data.fold", "first"], 'Parser key "data.fold": Expected a <class \'int\'>'),
    "more folds than a stratum has": (["--data.n_folds", "13"], "too few for 13 stratified folds; use fewer folds"),
    "voxels coarser than a femoral head": (["--data.target_spacing", "[400.0, 400.0, 400.0]"],
                                           "data.target_spacing [400.0, 400.0, 400.0]: voxels over 10 mm cannot "
                                           "resolve a femoral head"),
    "stratum column the manifest lacks": (["--data.strata", "[site]"],
                                          "no column 'site' for --data.strata ['site'] (its columns: subject_id, "),
    "run folder below a file": (["--run.out", "{t}/file.txt/runs"],
                                "--run.out {t}/file.txt/runs: {t}/file.txt is a file, not a folder; choose another "
                                "--run.out"),
}


@pytest.mark.parametrize("kind", TRAIN_OPTIONS)
def test_train_refuses_an_option_that_cannot_work(kind, tiny_cohort, tmp_path, capsys):
    extra, expected = TRAIN_OPTIONS[kind]
    extra, expected = [e.replace("{t}", str(tmp_path)) for e in extra], expected.replace("{t}", str(tmp_path))
    (tmp_path / "file.txt").write_text("keep me")
    out = tmp_path / "runs"
    _refused(["train", *tiny_train_args(tiny_cohort, out, epochs=1), *extra], capsys, expected, tmp_path)
    assert not (out / "vnet").exists()  # no run folder


def test_train_refuses_a_cohort_with_no_subjects(tiny_cohort, tmp_path, capsys):
    men = _male_only(tiny_cohort, tmp_path)
    _refused(["train", *tiny_train_args(men, tmp_path / "runs", epochs=1), "--data.cohort", "female"], capsys,
             f"{men}: no subjects in cohort 'female' (column 'sex' holds M for male, F for female)", tmp_path)


def test_train_refuses_fewer_epochs_than_the_experiment_has_stages(tiny_cohort, tmp_path, capsys):
    argv = ["train", *tiny_train_args(tiny_cohort, tmp_path / "runs", epochs=2, config="stvnet.yaml")]
    _refused(argv, capsys, "--trainer.max_epochs 2: the experiment's 3 stages (backbone, stn, finetune) need at least one "
             "epoch each; pass --trainer.max_epochs 3 or more", tmp_path)


@pytest.mark.parametrize("kind", ["missing", "not YAML"])
def test_train_refuses_a_config_file_it_cannot_read(kind, tiny_cohort, tmp_path, capsys):
    config = tmp_path / "experiment.yaml"
    if kind == "not YAML":
        config.write_text("model: [unclosed\n")
    expected = "did not find expected ',' or ']'" if kind == "not YAML" else f"File does not exist: '{config}'"
    argv = ["train", *tiny_train_args(tiny_cohort, tmp_path / "runs", epochs=1), "--config", str(config)]
    _refused(argv, capsys, expected, tmp_path)


@pytest.mark.parametrize("kind", ["missing", "not a checkpoint"])
def test_train_refuses_a_checkpoint_to_resume_that_is_unusable(kind, tiny_cohort, tmp_path, capsys):
    ckpt = tmp_path / "last.ckpt"
    if kind == "not a checkpoint":
        ckpt.write_text("epoch: 3\n")
    expected = f"--ckpt_path {ckpt}: no such checkpoint" if kind == "missing" else f"{ckpt}: not a readable checkpoint"
    argv = ["train", *tiny_train_args(tiny_cohort, tmp_path / "runs", epochs=1), "--ckpt_path", str(ckpt)]
    _refused(argv, capsys, expected, tmp_path)


# ---------------------------------------------------------------------------------------------- other subcommands
def _space(tmp: Path, text: str) -> str:
    (tmp / "space.yaml").write_text(text)
    return str(tmp / "space.yaml")


VNET = str(ROOT / "experiments" / "vnet.yaml")
LR = "  model.lr: {type: float, low: 0.001, high: 0.01}\n"

# kind -> (argv from the test's folder, the expected part of the line)
COMMANDS: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "sweep: no such space file": (lambda t: ["sweep", "--space", str(t / "nowhere.yaml"), "--out", str(t / "o")],
                                  "nowhere.yaml: no such search space file"),
    "sweep: space is not YAML": (lambda t: ["sweep", "--space", _space(t, "space: [x\n"), "--out", str(t / "o")],
                                 "space.yaml: not valid YAML (expected ',' or ']', but got '<stream end>' at line 2"),
    "sweep: zero trials": (lambda t: ["sweep", "--space", _space(t, f"base_config: {VNET}\nspace:\n{LR}"), "--trials",
                                      "0", "--out", str(t / "o")], "--trials 0: a sweep needs at least 1 trial"),
    "sweep: storage without a driver": (
        lambda t: ["sweep", "--space", _space(t, f"base_config: {VNET}\nspace:\n{LR}"), "--trials", "1", "--storage",
                   "mysql://nowhere/study", "--out", str(t / "o")],
        "--storage mysql://nowhere/study: cannot be opened (ImportError"),
    "sweep: unknown parameter type": (
        lambda t: ["sweep", "--space", _space(t, f"base_config: {VNET}\nspace:\n  model.lr: {{type: floaty}}\n"),
                   "--out", str(t / "o")], "parameter 'model.lr' needs type float, int or categorical"),
    "sweep: no choices": (
        lambda t: ["sweep", "--space", _space(t, f"base_config: {VNET}\nspace:\n  model.net.init_args.base_channels: "
                                                 "{type: categorical, choices: []}\n"), "--out", str(t / "o")],
        "parameter 'model.net.init_args.base_channels' has no choices"),
    "sweep: range without high": (
        lambda t: ["sweep", "--space", _space(t, f"base_config: {VNET}\nspace:\n  model.lr: {{type: float, low: 0.1}}\n"),
                   "--out", str(t / "o")], "parameter 'model.lr' needs numeric low and high"),
    "sweep: base config missing": (
        lambda t: ["sweep", "--space", _space(t, f"base_config: {t / 'gone.yaml'}\nspace:\n{LR}"), "--out",
                   str(t / "o")], "'base_config' must name an experiment YAML file"),
    "synth: one subject": (lambda t: ["synth", "--subjects", "1", "--out", str(t / "o")],
                           "--subjects 1: a cohort needs at least 2 subjects"),
    "synth: zero spacing": (lambda t: ["synth", "--spacing", "0", "1", "1", "--out", str(t / "o")],
                            "--spacing 0.0 1.0 1.0: voxel spacings must be > 0 mm"),
    "synth: fraction above 1": (lambda t: ["synth", "--female-fraction", "2", "--out", str(t / "o")],
                                "--female-fraction 2.0: must be in [0, 1]"),
    "synth: no workers": (lambda t: ["synth", "--workers", "0", "--out", str(t / "o")], "--workers 0: must be at least 1"),
    "synth: out is a file": (lambda t: ["synth", "--out", str(t / "file.txt")], "file.txt: is a file; give a folder"),
    "synth: unknown preset": (lambda t: ["synth", "--preset", "mri", "--out", str(t / "o")],
                              "argument --preset: invalid choice: 'mri'"),
    "bench: one-scan data size": (lambda t: ["bench", "--sections", "data", "--data-sizes", "1", "--out",
                                             str(t / "o" / "b.md")], "--data-sizes 1: each size must be at least 2"),
    "bench: unknown section": (lambda t: ["bench", "--sections", "gpu", "--out", str(t / "o" / "b.md")],
                               "argument --sections: invalid choice: 'gpu'"),
    "localise: no such checkpoint": (lambda t: ["localise", "--checkpoint", str(t / "gone"), "--out", str(t / "o")],
                                     "gone: no such run folder or checkpoint"),
    "localise: no such config": (lambda t: ["localise", "--config", str(t / "gone.yaml"), "--out", str(t / "o")],
                                 "--config " + "{t}/gone.yaml: no such experiment file"),
    "ablate: no such config": (lambda t: ["ablate", "--configs", str(t / "gone.yaml"), "--folds", "0", "--out",
                                          str(t / "o")], "gone.yaml: no such experiment file"),
    "ablate: fold past the last": (lambda t: ["ablate", "--configs", VNET, "--folds", "12", "--out", str(t / "o")],
                                   "--folds 12: " + VNET + " has folds 0..9 (data.n_folds 10)"),
    "ablate: misspelt train option": (lambda t: ["ablate", "--configs", VNET, "--folds", "0", "--out", str(t / "o"),
                                                 "--", "--trainer.max_epokhs", "2"],
                                      "unrecognized arguments: --trainer.max_epokhs 2"),
    "compare: not a run folder": (lambda t: ["compare", str(t), "--out", str(t / "o")],
                                  "not a run folder (no config.yaml or metrics.csv)"),
    "evaluate: no such run": (lambda t: ["evaluate", str(t / "gone"), "--out", str(t / "o")],
                              "gone: no such run folder or checkpoint"),
    "evaluate: a folder without checkpoints": (lambda t: ["evaluate", str(t), "--out", str(t / "o")],
                                               "no checkpoint found (expected"),
    "predict: no such scan": (lambda t: ["predict", str(t / "gone.nii.gz"), "-c", str(t), "--out", str(t / "o")],
                              "gone.nii.gz: no such file or folder"),
    "predict: no such checkpoint": (lambda t: ["predict", str(t / "file.txt"), "-c", str(t / "gone"), "--out",
                                               str(t / "o")], "gone: no such run folder or checkpoint"),
    "predict: threshold outside (0, 1)": (lambda t: ["predict", str(t / "file.txt"), "-c", str(t), "--out",
                                                     str(t / "o"), "--threshold", "2"],
                                          "--threshold 2.0: must be a probability in (0, 1)"),
    "predict: out is a file": (lambda t: ["predict", str(t / "file.txt"), "-c", str(t), "--out", str(t / "file.txt")],
                               "file.txt: is a file; give a folder for the masks"),
    "predict: out below a file": (lambda t: ["predict", str(t / "file.txt"), "-c", str(t), "--out",
                                             str(t / "file.txt" / "masks")],
                                  "--out {t}/file.txt/masks: {t}/file.txt is a file, not a folder"),
    "ablate: out below a file": (lambda t: ["ablate", "--configs", VNET, "--folds", "0", "--out",
                                            str(t / "file.txt" / "o")],
                                 "--out {t}/file.txt/o: {t}/file.txt is a file, not a folder"),
    "sweep: out below a file": (lambda t: ["sweep", "--space", str(ROOT / "sweeps" / "vnet.yaml"), "--out",
                                           str(t / "file.txt" / "o")],
                                "--out {t}/file.txt/o/vnet: {t}/file.txt is a file, not a folder"),
    "predict: empty manifest": (lambda t: ["predict", str(t / "empty.csv"), "-c", str(t), "--out", str(t / "o")],
                                "empty.csv: the file is empty; a manifest CSV needs an 'image' column"),
}


@pytest.mark.parametrize("kind", COMMANDS)
def test_each_subcommand_refuses_bad_input_in_one_line(kind, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("keep me")
    (tmp_path / "empty.csv").write_text("")
    argv, expected = COMMANDS[kind]
    _refused(argv(tmp_path), capsys, expected.replace("{t}", str(tmp_path)), tmp_path)


def test_compare_refuses_a_run_that_never_validated(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "vnet"}, "data": {"cohort": "all", "fold": 0}}))
    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,1,0.9\n")
    _refused(["compare", str(run), "--out", str(tmp_path / "o")], capsys,
             "metrics.csv has no validation Dice (the run never validated)", tmp_path)


@pytest.mark.slow
def test_evaluate_refuses_a_manifest_without_the_runs_subjects(trained_runs, tiny_cohort, tmp_path, capsys):
    table = pd.read_csv(tiny_cohort).head(2)
    for column in ("image", "label"):
        table[column] = [str(tiny_cohort.parent / p) for p in table[column]]
    table.to_csv(tmp_path / "two.csv", index=False)
    _refused(["evaluate", str(trained_runs["vnet"]), "--manifest", str(tmp_path / "two.csv"), "--out",
              str(tmp_path / "o")], capsys, "subject(s) of run", tmp_path)
