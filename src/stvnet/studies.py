"""Optuna studies as a sweep and its trials' training processes open them: the storage (a journal file shared by
local workers, or a database URL shared across hosts), the sampler, the pruner, and a running trial reattached from
the training process that reports to it."""

from __future__ import annotations

from pathlib import Path

import optuna


def make_storage(storage: str | None, out: Path, study: str) -> optuna.storages.BaseStorage | str:
    """Journal file storage by default (safe for several local processes); any RDB URL otherwise."""
    if storage is None or storage.startswith("journal:"):
        path = Path(storage[len("journal:"):]) if storage else out / f"{study}.journal"
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return storage


def storage_url(storage: str | None, out: Path, study: str) -> str:
    """The storage as a string that a training subprocess can reopen (``journal:<path>`` for journal files)."""
    return storage if storage else f"journal:{(out / f'{study}.journal').resolve()}"


def open_trial(storage: str, study_name: str, number: int, pruner: dict | None = None) -> optuna.trial.Trial:
    """Reattach to a running trial from another process (the training run of a sweep trial)."""
    backend = make_storage(storage, Path("."), study_name)
    study = optuna.load_study(study_name=study_name, storage=backend, pruner=make_pruner(pruner or {}))
    if isinstance(backend, str):  # a database URL: the storage object Optuna opened for it
        backend = optuna.storages.get_storage(backend)
    study_id = backend.get_study_id_from_name(study_name)
    return optuna.trial.Trial(study, backend.get_trial_id_from_study_id_trial_number(study_id, number))


def make_sampler(spec: dict, worker: int) -> optuna.samplers.BaseSampler:
    name = spec.get("name", "tpe")
    seed = spec.get("seed", 0)
    seed = None if seed is None else seed + worker  # distinct streams for workers sharing a study
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.get("n_startup_trials", 5))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"sampler must be tpe or random, got '{name}'")


def make_pruner(spec: dict) -> optuna.pruners.BasePruner:
    name = spec.get("name", "median")
    args = {k: v for k, v in spec.items() if k != "name"}
    pruners = {"median": optuna.pruners.MedianPruner, "hyperband": optuna.pruners.HyperbandPruner,
               "threshold": optuna.pruners.ThresholdPruner, "none": optuna.pruners.NopPruner}
    if name not in pruners:
        raise ValueError(f"pruner must be one of {sorted(pruners)}, got '{name}'")
    return pruners[name](**args)
