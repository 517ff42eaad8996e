"""``stvnet sweep``: Optuna studies whose trials are full (optionally multi-GPU) Lightning trainings.

A search space file (``sweeps/*.yaml``) names a base experiment, fixed overrides, the parameters to tune (dotted
paths into the experiment's resolved config, ``stvnet train --config <base> --print_config``; a stage's settings by
the stage's name, ``stages.<name>.<field>``, never a callback's position), the objective, the sampler and the pruner.
Sampled stage lengths are trained as sampled (``trainer.max_epochs`` becomes their sum). Each worker:

1. asks the study for a trial and samples its parameters (before any launch, so DDP ranks share them);
2. writes the trial's complete experiment YAML to ``<out>/<study>/trial_NNNN/config.yaml`` (re-runnable as is);
3. runs ``stvnet train`` on it in a subprocess (``--devices N`` adds DDP), with :class:`OptunaPruning` reporting
   validation Dice each epoch from rank 0;
4. records the trial as COMPLETE (objective: best validation Dice, mean over the objective's folds), PRUNED, or
   FAIL with the reason (exception, NaN loss, OOM kill) in the trial's ``fail_reason`` attribute, and goes on.

Storage: by default an Optuna journal file (``<out>/<study>.journal``) that several local workers share safely;
``--storage sqlite:///...`` or ``postgresql://...`` uses Optuna's RDB storage so workers on many hosts join one
study. Re-running with the same study name resumes it. Each worker finally writes ``best.yaml`` (the best
trial's config, ready for ``stvnet train --config``) and the study's plots.
"""

from __future__ import annotations

import copy
import difflib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.trial import TrialState

from data_modules.errors import InvalidInput, MissingInput, UserError, exception_line, output_folder
from stvnet.stages import config_stages, schedule_position
from stvnet.studies import make_pruner, make_sampler, make_storage, storage_url
from stvnet.config import resolved_config

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def set_path(config: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in a nested dict/list config (list items by index)."""
    keys = dotted.split(".")
    node: Any = config
    for i, key in enumerate(keys[:-1]):
        nxt = keys[i + 1]
        if isinstance(node, list):
            node = node[int(key)]
        else:
            if key not in node or node[key] is None:
                node[key] = [] if nxt.isdigit() else {}
            node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def suggest(trial: optuna.trial.Trial, name: str, spec: dict) -> Any:
    kind = spec["type"]
    if kind == "float":
        return trial.suggest_float(name, float(spec["low"]), float(spec["high"]), log=spec.get("log", False))
    if kind == "int":
        return trial.suggest_int(name, int(spec["low"]), int(spec["high"]), log=spec.get("log", False))
    if kind == "categorical":
        return trial.suggest_categorical(name, spec["choices"])
    raise ValueError(f"parameter {name}: type must be float, int or categorical, got '{kind}'")


#: the sections a search space file may have
SPACE_SECTIONS = ("study", "base_config", "overrides", "space", "objective", "sampler", "pruner")
#: options whose value is a mapping of the user's own keys (a search space may add a key to them)
OPEN_MAPPINGS = ("loss_weights", "part_lr_scale")


#: search-space keys that name a stage of the experiment's StageSchedule: ``stages.<stage name>.<field>``
STAGE_PREFIX = "stages."


def config_path(config: dict, key: str) -> str:
    """The dotted path a search-space key sets in ``config``: ``stages.stn.epochs`` becomes the position of the
    stage named ``stn`` in the StageSchedule (found by name, so reordering callbacks or stages cannot make a space tune
    another stage); other keys are paths already. Raises :class:`KeyError` naming the stages for an unknown one."""
    if not key.startswith(STAGE_PREFIX):
        return key
    name, _, field = key[len(STAGE_PREFIX):].partition(".")
    index, stages = schedule_position(config), config_stages(config)
    positions = [j for j, stage in enumerate(stages) if stage.get("name") == name]
    if not positions or not field:
        raise KeyError(f"stages: {', '.join(s.get('name', '?') for s in stages) or 'none (no StageSchedule)'}")
    return f"trainer.callbacks.{index}.init_args.stages.{positions[0]}.{field}"


def _paths(node: Any, prefix: str = "") -> list[str]:
    """Every dotted path of a nested config (list items by index)."""
    items = enumerate(node) if isinstance(node, list) else node.items() if isinstance(node, dict) else []
    out = []
    for key, value in items:
        path = f"{prefix}{key}"
        out += [path, *_paths(value, path + ".")]
    return out


def _reaches(config: Any, dotted: str) -> bool:
    """Whether ``dotted`` names an option of ``config`` (or a new key of one of :data:`OPEN_MAPPINGS`)."""
    node = config
    keys = dotted.split(".")
    for i, key in enumerate(keys):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return i == len(keys) - 1 and isinstance(node, dict) and keys[i - 1] in OPEN_MAPPINGS
    return True


def validate_space(spec: Any, resolved: dict, where: str) -> None:
    """Refuse a search space that would tune nothing or the wrong thing: unknown sections, no parameters, parameters
    or overrides the experiment does not have (named with the closest valid ones), bad ranges or types."""
    if not isinstance(spec, dict):
        raise UserError(f"{where}: a search space is a YAML mapping with a 'space' section")
    problems = [f"{where}: unknown section '{key}'" + _closest(key, SPACE_SECTIONS, cutoff=0.5)
                for key in spec if key not in SPACE_SECTIONS]
    space = spec.get("space") or {}
    if not space:
        problems.append(f"{where}: 'space' names no parameters to tune; add at least one under 'space:'")
    valid = _paths(resolved)
    for section, keys in (("space", space), ("overrides", spec.get("overrides") or {})):
        for key in map(str, keys):
            if key.startswith("trainer.callbacks."):
                problems.append(f"{where}: {section} key '{key}' addresses a callback by its position; name a stage "
                                "instead, e.g. 'stages.stn.epochs' or 'stages.finetune.lr_scale'")
                continue
            try:
                path = config_path(resolved, key)
            except KeyError as exc:
                problems.append(f"{where}: {section} key '{key}' names no stage of {spec.get('base_config')} "
                                f"({exc.args[0]})")
                continue
            if not _reaches(resolved, path):
                problems.append(f"{where}: {section} key '{key}' is not an option of {spec.get('base_config')}"
                                + _closest(key, valid))
    for name, param in space.items():
        problems += _parameter_problems(where, name, param)
    if problems:
        raise UserError(*problems)


def _closest(key: str, valid: Sequence[str], cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=cutoff)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def _parameter_problems(where: str, name: str, param: Any) -> list[str]:
    if not isinstance(param, dict) or param.get("type") not in ("float", "int", "categorical"):
        return [f"{where}: parameter '{name}' needs type float, int or categorical"]
    if param["type"] == "categorical":
        return [] if param.get("choices") else [f"{where}: parameter '{name}' has no choices"]
    try:
        low, high = float(param["low"]), float(param["high"])
    except (KeyError, TypeError, ValueError):
        return [f"{where}: parameter '{name}' needs numeric low and high"]
    if low > high:
        return [f"{where}: parameter '{name}' has low {param['low']} > high {param['high']}"]
    if param.get("log") and low <= 0:
        return [f"{where}: parameter '{name}' is sampled on a log scale, so low must be > 0 (got {param['low']})"]
    return []


def trial_config(spec: dict, base: dict, params: dict, storage: str, study: str, number: int, run_dir: Path,
                 out: Path) -> dict:
    """The complete experiment config of one trial (base + fixed overrides + sampled values + pruning hook)."""
    config = copy.deepcopy(base)
    chosen = {**spec.get("overrides", {}), **params}
    for key, value in chosen.items():
        set_path(config, config_path(base, key), value)
    if any(k.startswith(STAGE_PREFIX) and k.endswith(".epochs") for k in chosen):
        keep_stage_lengths(config)
    config.setdefault("run", {})
    config["run"].update(name=study, study=study, dir=str(run_dir), out=str(out))  # splits shared under <out>/splits
    callbacks = config.setdefault("trainer", {}).setdefault("callbacks", []) or []
    callbacks.append({"class_path": "stvnet.callbacks.OptunaPruning", "init_args": {
        "storage": storage, "study_name": study, "trial_number": number, "run_dir": str(run_dir),
        "monitor": spec.get("objective", {}).get("metric", "val/dice"), "pruner": spec.get("pruner", {})}})
    config["trainer"]["callbacks"] = callbacks
    return config


def keep_stage_lengths(config: dict) -> None:
    """Train the stage lengths a trial sampled as they are: no rescaling to ``trainer.max_epochs``, whose budget
    becomes their sum."""
    schedule = config["trainer"]["callbacks"][schedule_position(config)]["init_args"]
    schedule["scale_to_max_epochs"] = False
    config["trainer"]["max_epochs"] = sum(int(stage["epochs"]) for stage in schedule["stages"])


def run_trial_training(config_path: Path, fold: int, devices: int | None, extra: list[str], log: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stvnet.cli", "train", "--config", str(config_path), "--data.fold", str(fold),
           "--trainer.enable_progress_bar", "false", *extra]
    if devices and devices > 1:
        cmd += ["--trainer.devices", str(devices), "--trainer.strategy", "ddp"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "STVNET_RUN_DIR")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    log.write_text(proc.stdout + proc.stderr)
    return proc


def objective_value(run_dir: Path, metric: str, direction: str) -> float:
    metrics = pd.read_csv(run_dir / "metrics.csv")
    values = metrics[metric].dropna()
    if values.empty:
        raise RuntimeError(f"{run_dir}: no finite '{metric}' was logged")
    return float(values.max() if direction == "maximize" else values.min())


def _create_or_load(name: str, storage, sampler, pruner, direction: str) -> optuna.Study:
    """Create the study or join it; workers starting together may race to create it, so retry."""
    from sqlalchemy.exc import IntegrityError

    for attempt in range(5):
        try:
            return optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                       direction=direction, load_if_exists=True)
        except (optuna.exceptions.DuplicatedStudyError, IntegrityError):
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def read_space(space: str | Path) -> Any:
    """A search space file's YAML, or one line saying why it cannot be read."""
    path = Path(space)
    if not path.is_file():
        raise MissingInput(f"{space}: no such search space file; give a YAML like sweeps/vnet.yaml")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        raise UserError(f"{space}: not valid YAML ({getattr(exc, 'problem', None) or exc}{at}); fix the file") from None


def open_study(name: str, url: str, out: Path, sampler, pruner, direction: str) -> optuna.Study:
    """Create or reopen the study in its storage, or one line naming a storage that cannot be opened."""
    from sqlalchemy.exc import SQLAlchemyError

    try:
        return _create_or_load(name, make_storage(url, out, name), sampler, pruner, direction)
    except (ImportError, ValueError, OSError, RuntimeError, SQLAlchemyError) as exc:  # no driver, bad URL, no server
        if isinstance(exc, UserError):
            raise
        raise UserError(f"--storage {url}: cannot be opened ({exception_line(exc)}); give "
                        "journal:<file>, sqlite:///<file>.db, or a reachable database URL whose driver is "
                        "installed") from exc


def run_sweep(space: str | Path, n_trials: int, study_name: str | None = None, storage: str | None = None,
              out: str | Path = "runs/sweeps", devices: int | None = None, worker: int = 0,
              extra_args: list[str] | None = None) -> optuna.Study:
    """Run trials until the study holds ``n_trials`` finished or running trials; returns the study."""
    if n_trials < 1:
        raise InvalidInput(f"--trials {n_trials}: a sweep needs at least 1 trial")
    spec = read_space(space)
    if not isinstance(spec, dict) or not Path(str(spec.get("base_config"))).is_file():
        raise UserError(f"{space}: 'base_config' must name an experiment YAML file (e.g. experiments/vnet.yaml)")
    base = resolved_config(spec["base_config"])  # the experiment composed and complete: what every trial starts from
    validate_space(spec, base, str(space))
    study_name = study_name or spec.get("study", Path(space).stem)
    out = Path(out)
    output_folder(out / study_name, "--out")  # before the first trial, not after the last
    metric = spec.get("objective", {}).get("metric", "val/dice")
    url = storage_url(storage, out, study_name)
    study = open_study(study_name, url, out, make_sampler(spec.get("sampler", {}), worker),
                       make_pruner(spec.get("pruner", {})), spec.get("objective", {}).get("direction", "maximize"))
    # a resumed study must not replay the seeded stream of the first session: offset by the trials already there
    study.sampler = make_sampler(spec.get("sampler", {}), worker + 1000 * len(study.get_trials(deepcopy=False)))
    while len(study.get_trials(deepcopy=False)) < n_trials:
        trial = study.ask()
        params = {name: suggest(trial, name, p) for name, p in spec.get("space", {}).items()}
        try:
            configs = [trial_config(spec, base, params, url, study_name, trial.number,
                                    out / study_name / f"trial_{trial.number:04d}" / f"fold{fold}", out)
                       for fold in spec.get("objective", {}).get("folds", [0])]
            value = score_trial(spec, configs, devices, extra_args or [])
            study.tell(trial, value)
            print(f"[sweep] trial {trial.number}: {metric} = {value:.4f} {params}", flush=True)
        except optuna.TrialPruned as exc:
            study.tell(trial, state=TrialState.PRUNED)
            print(f"[sweep] trial {trial.number}: pruned ({exc})", flush=True)
        except Exception as exc:  # a crashed trial is recorded and the sweep goes on
            trial.set_user_attr("fail_reason", str(exc)[-2000:])
            study.tell(trial, state=TrialState.FAIL)
            print(f"[sweep] trial {trial.number}: FAILED: {str(exc)[-300:]}", flush=True)
    write_results(study, out / study_name)
    return study


def score_trial(spec: dict, configs: list[dict], devices: int | None, extra: list[str]) -> float:
    """Train one trial's config on each objective fold (only the first reports to the pruner); the mean objective.
    Raises ``TrialPruned`` when the pruner stopped it, ``RuntimeError`` with the trainer's own error lines when a
    fold failed."""
    objective = spec.get("objective", {})
    folds = objective.get("folds", [0])
    scores = []
    for k, (fold, config) in enumerate(zip(folds, configs)):
        run_dir = Path(config["run"]["dir"])
        trial_dir = run_dir.parent
        trial_dir.mkdir(parents=True, exist_ok=True)
        if k > 0:
            config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"]
                                              if "OptunaPruning" not in c["class_path"]]
        config_path = trial_dir / ("config.yaml" if k == 0 else f"config_fold{fold}.yaml")
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = run_trial_training(config_path, fold, devices, extra, trial_dir / f"fold{fold}.log")
        if (run_dir / "pruned.json").is_file():
            raise optuna.TrialPruned(f"pruned in fold {fold}")
        if proc.returncode != 0:
            raise RuntimeError(f"fold {fold} exited with {proc.returncode}: {failure_reason(proc)}")
        scores.append(objective_value(run_dir, objective.get("metric", "val/dice"),
                                      objective.get("direction", "maximize")))
    return sum(scores) / len(scores)


def failure_reason(proc: subprocess.CompletedProcess) -> str:
    """Why a trial's training failed: its user-error lines, else the end of its traceback (or an OOM kill)."""
    if proc.returncode in (-9, 137):
        return "killed (out of memory?)"
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    errors = [line for line in lines if line.startswith("stvnet train: error: ")]
    return "\n".join(errors or lines[-5:])


def write_results(study: optuna.Study, folder: Path) -> None:
    """Best trial's config as ``best.yaml``, the trials table, and plots (history, parameter importances)."""
    folder.mkdir(parents=True, exist_ok=True)
    study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        return
    best = study.best_trial
    config = yaml.safe_load((folder / f"trial_{best.number:04d}" / "config.yaml").read_text())
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if "OptunaPruning" not in c["class_path"]]
    config["run"] = {k: v for k, v in config["run"].items() if k not in ("dir",)}
    config["run"].update(name=f"{study.study_name}-best", out="runs")
    header = f"# best trial {best.number} of study '{study.study_name}': value {best.value:.4f}, params {best.params}\n"
    (folder / "best.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    ovm.plot_optimization_history(study)
    plt.gcf().set_size_inches(7, 4.5)
    plt.tight_layout()
    plt.savefig(folder / "history.png", dpi=100)
    plt.close("all")
    if len(complete) >= 2 and best.params:
        try:
            ovm.plot_param_importances(study)
            plt.gcf().set_size_inches(7, 4.5)
            plt.tight_layout()
            plt.savefig(folder / "importances.png", dpi=100)
        except (RuntimeError, ValueError) as exc:  # e.g. all trials share one value
            print(f"[sweep] no importance plot: {exc}", flush=True)
        plt.close("all")
