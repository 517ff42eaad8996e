"""``stvnet ablate``: the paper's study matrix {models} x {all, male, female} x folds (x seeds), then evaluate +
compare.

Each cell is a separate ``stvnet train`` process, so a crash (or an out-of-memory kill) loses only that cell; ``jobs``
cells train at once (to fill a GPU node: with several GPUs each job gets one in turn, with one they share it).
``status.json`` records every cell (``running``, ``done`` with its run folder, ``failed`` with the error's last lines,
or ``interrupted``); re-running the same command skips finished cells and retries the others, resuming each from its
``last.ckpt`` when the interrupted attempt wrote one. At the end the finished runs are evaluated on their held-out
sets and compared, and the cells that did not finish are listed.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from data_modules.errors import InvalidInput, MissingInput, output_folder
from stvnet.compare import compare_runs
from stvnet.evaluation import evaluate_runs
from stvnet.parallel import core_share


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
    from stvnet.config import resolved_config

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


@dataclass
class Cell:
    """One ``stvnet train`` of the study: its key, command and run folder."""

    key: str
    cmd: list[str]
    run_dir: Path

    @property
    def log(self) -> Path:
        """What the cell's processes printed, beside its run folder (appended to on each attempt)."""
        return self.run_dir.parent / f"{self.run_dir.name}.log"


def _cells(configs: list[str], cohorts: list[str], folds: list[int], seeds: list[int] | None, out: Path,
           extra_args: list[str], status: dict) -> list[Cell]:
    """The cells still to train (finished ones are skipped); an interrupted cell continues from its ``last.ckpt``."""
    cells = []  # fold by fold, the models side by side: a study stopped part-way holds paired runs
    for fold, seed, cohort, config in itertools.product(folds, seeds or [None], cohorts, configs):
        key = cell_key(config, cohort, fold, seed)
        previous = status.get(key, {})
        if previous.get("status") == "done" and Path(previous["run"]).is_dir():
            print(f"[ablate] {key}: done, skipped", flush=True)
            continue
        last = Path(previous["run"]) / "checkpoints" / "last.ckpt" if previous.get("run") else None
        if last is not None and last.is_file():
            run_dir, resume = last.parent.parent, ["--ckpt_path", str(last)]
        else:
            run_dir, resume = out / "runs" / key.replace("/", "_") / time.strftime("%Y%m%d-%H%M%S"), []
        cmd = [sys.executable, "-m", "stvnet.cli", "train", "--config", config, "--data.cohort", cohort,
               "--data.fold", str(fold), "--run.out", str(out / "runs"), "--run.dir", str(run_dir),
               "--run.study", "ablation", "--trainer.enable_progress_bar", "false", *extra_args,
               *([] if seed is None else ["--seed_everything", str(seed)]), *resume]
        status[key] = {"status": "pending", "run": str(run_dir), "config": config, "cohort": cohort, "fold": fold,
                       "seed": seed}
        cells.append(Cell(key, cmd, run_dir))
    return cells


def cell_environment(slot: int, jobs: int, gpus: int) -> dict[str, str]:
    """The environment of a cell trained in ``slot`` of ``jobs`` concurrent ones: unbuffered output (its log keeps
    the order of what it printed), the machine's cores shared between the jobs (unless ``OMP_NUM_THREADS`` is set) and,
    with several GPUs and no ``CUDA_VISIBLE_DEVICES``, one GPU per slot in turn."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if jobs > 1:
        env.setdefault("OMP_NUM_THREADS", str(core_share(jobs)))
        if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    return env


def train_cells(cells: list[Cell], status: dict, status_path: Path, jobs: int = 1) -> None:
    """Train ``cells``, ``jobs`` at a time, each in its own process with its log beside its run folder; a cell that
    exits non-zero or writes no ``metrics.csv`` is ``failed`` with its log's last lines.

    Interrupted (Ctrl-C, or SIGTERM from a scheduler's time limit), the running cells are stopped and left
    ``interrupted`` (the same command continues them from their ``last.ckpt``), then ``KeyboardInterrupt`` is raised.
    The signals only set a flag the loop reads, so more of them (``timeout`` signals the whole process group, a
    second Ctrl-C) cannot cut the clean-up short."""
    from torch.cuda import device_count

    gpus = device_count() if jobs > 1 else 0
    queue, running = list(cells), {}  # slot -> (cell, process, start time, log offset)
    stop: list[int] = []
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = {sig: signal.signal(sig, lambda signum, _: stop.append(signum)) for sig in handled}
    try:
        while (queue or running) and not stop:
            for slot in [s for s in range(jobs) if s not in running][:len(queue)]:
                cell = queue.pop(0)
                cell.run_dir.parent.mkdir(parents=True, exist_ok=True)
                offset = cell.log.stat().st_size if cell.log.is_file() else 0
                with open(cell.log, "a") as handle:
                    proc = subprocess.Popen(cell.cmd, stdout=handle, stderr=subprocess.STDOUT,
                                            env=cell_environment(slot, jobs, gpus))
                running[slot] = (cell, proc, time.perf_counter(), offset)
                status[cell.key]["status"] = "running"
                _save_status(status_path, status)  # a killed ablation still knows where this cell's run is
                print(f"[ablate] {cell.key}: training ...", flush=True)
            for slot, (cell, proc, t0, offset) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                _finish(cell, proc.returncode, time.perf_counter() - t0, offset, status)
                _save_status(status_path, status)
                print(f"[ablate] {cell.key}: {status[cell.key]['status']} in {status[cell.key]['seconds']} s",
                      flush=True)
            time.sleep(0.2)
        if stop:
            _stop(list(running.values()), status, status_path)
            raise KeyboardInterrupt
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(running: list[tuple], status: dict, status_path: Path) -> None:
    """Terminate the running cells (killed when one does not exit within 30 s) and record them ``interrupted``."""
    for _, proc, _, _ in running:
        proc.terminate()
    for cell, proc, _, _ in running:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        status[cell.key]["status"] = "interrupted"
    _save_status(status_path, status)
    print(f"[ablate] interrupted: {len(running)} running cell(s) stopped; the same command continues them",
          file=sys.stderr, flush=True)


def _finish(cell: Cell, returncode: int, seconds: float, offset: int, status: dict) -> None:
    """Record a finished cell: ``done`` when it exited 0 and wrote its metrics, else ``failed`` with its error."""
    ok = returncode == 0 and (cell.run_dir / "metrics.csv").is_file()
    status[cell.key].update(status="done" if ok else "failed", seconds=round(seconds, 1), exit=returncode)
    if not ok:
        with open(cell.log, errors="replace") as handle:
            handle.seek(offset)
            status[cell.key]["error"] = "\n".join(handle.read().strip().splitlines()[-5:])


def report_study(runs: list[str], out: Path, splits: tuple[str, ...], workers: int = 1) -> None:
    """Evaluate the finished runs on ``splits``, compare them, and write the study's ``report.md``."""
    evaluate_runs(runs, out / "evaluation", splits=splits, overwrite=True, workers=workers)
    compare_runs(runs, out / "comparison", evaluation=out / "evaluation")
    report = (out / "comparison" / "comparison.md").read_text().replace(
        "](learning_curves.png)", "](comparison/learning_curves.png)").replace("](../evaluation/", "](evaluation/")
    (out / "report.md").write_text(report)


def run_ablation(configs: list[str], cohorts: list[str], folds: list[int], out: str | Path,
                 extra_args: list[str] | None = None, evaluate: bool = True, seeds: list[int] | None = None,
                 splits: tuple[str, ...] = ("test",), jobs: int = 1, train: bool = True) -> dict:
    """Train every missing cell (each seed of ``seeds`` a cell of its own, trained with ``--seed_everything``; none:
    the configs' seed), ``jobs`` at a time, then evaluate the ``splits`` of what finished (``jobs`` runs at a time) and
    compare; ``train=False`` only reports what finished. Returns the status table."""
    out = output_folder(out, "--out")
    status_path = out / "status.json"
    status = _load_status(status_path)
    if train:
        cells = _cells(configs, cohorts, folds, seeds, out, extra_args or [], status)
        train_cells(cells, status, status_path, jobs)
    done = [v["run"] for v in status.values() if v["status"] == "done"]
    if evaluate and done:
        report_study(done, out, splits, workers=jobs)
    failed = {k: v for k, v in status.items() if v["status"] != "done"}
    for key, info in failed.items():
        print(f"[ablate] {info['status'].upper()} {key}: {info.get('error', '')}", file=sys.stderr)
    return status
