"""``stvnet ablate``: the paper's study matrix {models} x {all, male, female} x folds (x seeds), then evaluate +
compare.

Each cell is a separate ``stvnet train`` process, so a crash (or an out-of-memory kill) loses only that cell.
``status.json`` records every cell (``running``, ``done`` with its run folder, or ``failed`` with the error's
last lines); re-running the same command skips finished cells and retries the others, resuming each from its
``last.ckpt`` when the interrupted attempt wrote one. At the end the finished runs are
evaluated on their held-out test sets and compared, and failures are listed.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

from data_modules.errors import InvalidInput, MissingInput
from stvnet.compare import compare_runs
from stvnet.evaluation import evaluate_runs


def cell_key(config: str, cohort: str, fold: int, seed: int | None = None) -> str:
    """A cell's name in ``status.json`` (and its run folder's): ``<config>/<cohort>/fold<k>[/seed<s>]``."""
    return f"{Path(config).stem}/{cohort}/fold{fold}" + ("" if seed is None else f"/seed{seed}")


def _load_status(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_status(path: Path, status: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status, indent=2))
    tmp.replace(path)


def check_study(configs: list[str], folds: list[int], extra_args: list[str]) -> None:
    """Refuse, before any cell trains, configs that are not there, options ``stvnet train`` would refuse, and folds
    that the configs' ``data.n_folds`` does not have."""
    from stvnet.training import resolved_config

    missing = [f"--configs {c}: no such experiment file" for c in configs if not Path(c).is_file()]
    if missing:
        raise MissingInput(*missing)
    problems = []
    for config in configs:
        n_folds = int(resolved_config(config, extra_args)["data"]["n_folds"])
        problems += [f"--folds {f}: {config} has folds 0..{n_folds - 1} (data.n_folds {n_folds})"
                     for f in folds if not 0 <= f < n_folds]
    if problems:
        raise InvalidInput(*problems)


def user_errors(status: dict) -> list[str]:
    """The failed cells' ``stvnet train`` user errors (exit status 2), one line each, when every failure was one."""
    failed = {k: v for k, v in status.items() if v["status"] != "done"}
    if not failed or any(v.get("exit") != 2 for v in failed.values()):
        return []
    prefix = "stvnet train: error: "
    return [f"cell {k}: {line[len(prefix):]}" for k, v in failed.items()
            for line in v.get("error", "").splitlines() if line.startswith(prefix)]


def run_ablation(configs: list[str], cohorts: list[str], folds: list[int], out: str | Path,
                 extra_args: list[str] | None = None, evaluate: bool = True, seeds: list[int] | None = None,
                 splits: tuple[str, ...] = ("test",)) -> dict:
    """Train every missing cell (each seed of ``seeds`` a cell of its own, trained with ``--seed_everything``; none:
    the configs' seed), then evaluate the ``splits`` of what finished and compare; returns the status table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    status_path = out / "status.json"
    status = _load_status(status_path)
    for config, cohort, fold, seed in itertools.product(configs, cohorts, folds, seeds or [None]):
        key = cell_key(config, cohort, fold, seed)
        previous = status.get(key, {})
        if previous.get("status") == "done" and Path(previous["run"]).is_dir():
            print(f"[ablate] {key}: done, skipped", flush=True)
            continue
        last = Path(previous["run"]) / "checkpoints" / "last.ckpt" if previous.get("run") else None
        if last is not None and last.is_file():  # an interrupted cell continues from its last epoch
            run_dir, resume = last.parent.parent, ["--ckpt_path", str(last)]
        else:
            run_dir, resume = out / "runs" / key.replace("/", "_") / time.strftime("%Y%m%d-%H%M%S"), []
        cmd = [sys.executable, "-m", "stvnet.cli", "train", "--config", config, "--data.cohort", cohort,
               "--data.fold", str(fold), "--run.out", str(out / "runs"), "--run.dir", str(run_dir),
               "--run.study", "ablation", "--trainer.enable_progress_bar", "false", *(extra_args or []),
               *([] if seed is None else ["--seed_everything", str(seed)]), *resume]
        status[key] = {"status": "running", "run": str(run_dir), "config": config, "cohort": cohort,
                       "fold": fold, "seed": seed}
        _save_status(status_path, status)  # a killed ablation still knows where this cell's run is
        print(f"[ablate] {key}: training ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
            log.write(proc.stdout + proc.stderr)
        ok = proc.returncode == 0 and (run_dir / "metrics.csv").is_file()
        status[key].update(status="done" if ok else "failed", seconds=round(time.perf_counter() - t0, 1),
                           exit=proc.returncode)
        if not ok:
            status[key]["error"] = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        _save_status(status_path, status)
        print(f"[ablate] {key}: {status[key]['status']} in {status[key]['seconds']} s", flush=True)
    done = [v["run"] for v in status.values() if v["status"] == "done"]
    if evaluate and done:
        evaluate_runs(done, out / "evaluation", splits=splits, overwrite=True)
        compare_runs(done, out / "comparison", evaluation=out / "evaluation")
        report = (out / "comparison" / "comparison.md").read_text().replace(
            "](learning_curves.png)", "](comparison/learning_curves.png)").replace("](../evaluation/", "](evaluation/")
        (out / "report.md").write_text(report)
    failed = {k: v for k, v in status.items() if v["status"] != "done"}
    for key, info in failed.items():
        print(f"[ablate] FAILED {key}: {info.get('error', '')}", file=sys.stderr)
    return status
