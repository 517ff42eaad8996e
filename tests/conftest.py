"""Shared fixtures: tiny synthetic cohorts that keep the suite fast on two CPU cores."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

# Lightning's log handler keeps the sys.stderr of its import: imported here, that is the session's stream, not the
# capsys stream of whichever test imports it first (closed after that test: "--- Logging error ---" in later ones)
import lightning.pytorch  # noqa: F401
import pytest
import torch

from data_modules.synthetic import make_cohort

ROOT = Path(__file__).resolve().parents[1]
# every subprocess a test starts (training runs, DDP ranks, sweep trials, torchrun) imports this checkout's code,
# whatever stvnet happens to be installed in the environment
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")) if p)

# pytest-xdist workers (make test runs TEST_WORKERS of them) share the cores instead of each taking all of them
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

TINY_SPACING = (3.0, 3.0, 4.0)
EXPERIMENTS = ROOT / "experiments"
# the shipped experiments (experiments/nets/ and experiments/stages/ hold the networks and stage schedules they are composed of)
EXPERIMENT_FILES = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if not {"nets", "stages"} & set(p.parts))
# under `make mutate`, the covering tests a mutant runs (its module's test files first, fastest first) stop once their unmutated durations add up to
# this many seconds: a mutant that only a slower test would kill counts as survived (the score errs low, not high)
MUTATION_BUDGET_S = float(os.environ.get("STVNET_MUTATION_BUDGET_S", "8"))
#: exit status mutmut reads as "timeout"
MUTMUT_TIMEOUT_EXIT = 36
MUTANT_STARTED = pytest.StashKey[float]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under mutmut (a mutant named in ``MUTANT_UNDER_TEST``), keep the covering tests that fit ``MUTATION_BUDGET_S``
    (always the first one), chosen from the tests marked ``mutation_target(<the function's name>)`` first, then the
    files that import the mutated module, then the others, each group those named after the mutated function first,
    then fastest first; run the kept ones fastest first, so a mutant is killed by the cheapest test that can kill it
    (mutmut stops at the first failure). A surviving mutant runs every test it keeps, and with all of them a whole run
    does not fit the hour it may take on two cores. A mutant that runs far past its kept tests' time (an endless loop)
    ends as a timeout: mutmut's own limit is 15 times *all* covering tests, up to half an hour each. Tests marked
    ``not_in_mutation_run`` (longer than the budget, never kept) are left out of mutmut's coverage and clean-test passes
    as well (pyproject.toml)."""
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    stats = Path("mutmut-stats.json")
    if "__mutmut_" not in mutant or not stats.exists():
        return
    duration = json.loads(stats.read_text()).get("duration_by_test", {})
    module, function = mutant.rsplit(".", 1)  # data_modules.folds.x_make_splits__mutmut_3 -> data_modules.folds
    name = re.sub(r"^x[_\u01c1]", "", function.split("__mutmut_")[0]).split("\u01c1")[-1]  # make_splits, setup
    own = {path for path in {item.path for item in items} if module in path.read_text()}
    # tests named after the mutated function (``augmentation`` -> test_..._augmented_...) first within a group
    stems = {word[:5] for word in name.split("_") if len(word) >= 4}

    def targets(item: pytest.Item) -> bool:  # @pytest.mark.mutation_target("train_dataloader", ...)
        return any(name in marker.args for marker in item.iter_markers("mutation_target"))

    ordered = sorted(items, key=lambda item: (not targets(item), item.path not in own,
                                              not any(stem in item.name for stem in stems),
                                              duration.get(item.nodeid, 0.0)))
    kept, spent = [], 0.0
    for item in ordered:
        if kept and spent + duration.get(item.nodeid, 0.0) > MUTATION_BUDGET_S:
            continue
        spent += duration.get(item.nodeid, 0.0)
        kept.append(item)
    config.hook.pytest_deselected(items=[item for item in ordered if item not in kept])
    # the kept tests run fastest first: most mutants die in the first fast test (the slowest first cost the third run
    # 0.95 s a killed mutant against 0.59 s)
    items[:] = sorted(kept, key=lambda item: duration.get(item.nodeid, 0.0))
    signal.signal(signal.SIGALRM, lambda *_: os._exit(MUTMUT_TIMEOUT_EXIT))
    signal.alarm(int(3 * spent) + 20)
    config.stash[MUTANT_STARTED] = time.monotonic()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under ``make mutate``, append the mutant, its exit status and the seconds its kept tests ran to
    ``STVNET_MUTATION_LOG``: where the run's hour goes, per module (mutation/score.py)."""
    log, started = os.environ.get("STVNET_MUTATION_LOG"), session.config.stash.get(MUTANT_STARTED, None)
    if log and started is not None:
        with open(log, "a") as out:
            out.write(f"{os.environ['MUTANT_UNDER_TEST']}\t{int(exitstatus)}\t{time.monotonic() - started:.2f}\n")


def shared_dir(tmp_path_factory: pytest.TempPathFactory, name: str, env: str) -> Path | None:
    """Where a session fixture is built once for every process of the run: the folder in ``env`` (``make mutate``
    reuses it across its runs), or, under pytest-xdist (``make test`` runs two workers), a folder of this run beside
    the workers' own; ``None`` in a plain single-process run."""
    if os.environ.get(env):
        return Path(os.environ[env])
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.getbasetemp().parent / name
    return None


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 14-subject cohort at coarse resolution; returns its manifest. Written once for all the run's workers
    (``shared_dir``; ``STVNET_TEST_COHORT_CACHE``, as ``make mutate`` sets it, keeps it across runs)."""
    cache = shared_dir(tmp_path_factory, "tiny_cohort", "STVNET_TEST_COHORT_CACHE")
    if cache:
        from filelock import FileLock

        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache / ".lock")):
            manifest = cache / "manifest.csv"
            return manifest if manifest.is_file() else make_cohort(cache, n_subjects=14, seed=7, spacing=TINY_SPACING,
                                                                   workers=1)
    out = tmp_path_factory.mktemp("tiny_cohort")
    return make_cohort(out, n_subjects=14, seed=7, spacing=TINY_SPACING, workers=1)


def tiny_data_args(manifest: Path, splits_dir: Path, **overrides) -> dict:
    """Datamodule arguments for 32^3 ROIs at 4 mm on the tiny cohort (axis-aligned ROIs: the pose search costs
    ~0.3 s a scan; the tests of turned ROIs ask for it)."""
    args = dict(
        manifest=str(manifest), splits_dir=str(splits_dir), n_folds=3, target_spacing=(4.0, 4.0, 4.0),
        roi_size=(32, 32, 32), batch_size=2, num_workers=0, augment=0.0, roi_max_rotation=0.0,
        cache_dir=str(Path(splits_dir).parent / "cache"), preprocess_workers=1,
    )
    args.update(overrides)
    return args


def tiny_train_args(manifest: Path, out: Path, epochs: int = 3, config: str | Path = "vnet.yaml") -> list[str]:
    """``stvnet train`` arguments for a few quick epochs of a narrow network on the tiny cohort (``config``: a file of
    experiments/ or any path)."""
    path = Path(config) if Path(config).is_absolute() else EXPERIMENTS / config
    text = path.read_text()  # an ST-V-Net experiment names nets/stvnet*.yaml, a resolved one the class
    net = "--model.net.init_args.backbone.init_args" if "nets/stvnet" in text or "STVNet" in text else "--model.net.init_args"
    return [
        "--config", str(path),
        "--data.manifest", str(manifest), "--data.n_folds", "3", "--data.num_workers", "0",
        "--data.roi_size", "[32, 32, 32]", "--data.target_spacing", "[4.0, 4.0, 4.0]", "--data.augment", "0.0",
        f"{net}.base_channels", "4", f"{net}.depth", "2",
        "--model.lr", "0.01", "--trainer.max_epochs", str(epochs), "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--run.out", str(out), "--run.wandb", "disabled",
        "--data.cache_dir", str(Path(out).parent / f"{Path(out).name}-cache"), "--data.preprocess_workers", "1",
    ]


@pytest.fixture(scope="session")
def trained_runs(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two short runs on the tiny cohort (a V-Net and a second V-Net named 'vnet_b'): their run folders. With
    ``STVNET_TEST_RUNS_CACHE`` set (``make mutate``) they are trained there once, by the unmutated code, and reused by
    every mutant's evaluation and prediction tests (training itself is tested by tests that train); under pytest-xdist
    the run's workers share them (``shared_dir``)."""
    from stvnet.cli import main as cli_main

    out = shared_dir(tmp_path_factory, "runs", "STVNET_TEST_RUNS_CACHE") or tmp_path_factory.mktemp("runs")
    out.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    names = ("vnet", "vnet_b")
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
    for name in names[worker % 2:] + names[:worker % 2]:  # two workers asking at once each train one run
        with FileLock(str(out / f".{name}.lock")):
            if not (out / name).is_dir():
                args = tiny_train_args(tiny_cohort, out, epochs=8) + ["--run.name", name, "--model.lr", "0.003"]
                args += ["--model.net.init_args.base_channels", "8", "--model.net.init_args.depth", "3"]
                assert cli_main(["train", *args]) == 0
    runs = {}
    for name in names:
        (runs[name],) = (out / name / "all" / "fold0").iterdir()
    return runs


def vnet_checkpoint(config: dict, data: dict, path: Path) -> Path:
    """An untrained V-Net of an experiment config's V-Net architecture, saved as if trained on fold 0 of ``data``'s
    splits (what ``--model.init_weights`` of experiments/stvnet_from_vnet.yaml needs)."""
    import torch

    from data_modules.datamodule import FemurDataModule
    from stvnet.lightning_module import FemurSegmenter
    from stvnet.models import VNet

    init = config["model"]["net"]["init_args"]
    module = FemurSegmenter(VNet(**(init["backbone"]["init_args"] if "backbone" in init else init)))
    torch.save({"state_dict": module.state_dict(), "FemurDataModule": FemurDataModule(**data).state_dict()}, path)
    return path


def png_colours(path: Path, colours: dict[str, tuple[float, float, float]], tol: float = 0.08) -> tuple[tuple[int, int], dict[str, int]]:
    """A PNG's (width, height) and how many of its pixels are each named RGB colour (0-1, within ``tol``)."""
    import matplotlib.image
    import numpy as np

    rgb = matplotlib.image.imread(str(path))[..., :3]
    counts = {name: int((np.abs(rgb - np.asarray(c)).max(-1) < tol).sum()) for name, c in colours.items()}
    return (rgb.shape[1], rgb.shape[0]), counts


def cpu_precision_args(config: dict) -> list[str]:
    """``--trainer.precision 32-true`` for a resolved config that trains in bf16 (the GPU ones), else nothing. A CPU
    without native bf16 (AVX512-BF16 or AMX; AVX2 cores such as these test machines') emulates bf16 convolutions ~17x
    slower than float32: minutes per step of a GPU-size network. bf16 itself is stepped on a small network by
    tests/integration/test_configs.py::test_bf16_mixed_precision_trains_the_stvnet_through_its_stages."""
    return ["--trainer.precision", "32-true"] if "bf16" in str(config["trainer"].get("precision")) else []


def launch_env() -> dict[str, str]:
    """The environment of a fresh top-level launch: no inherited rank, run folder or W&B mode; one thread per rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "STVNET_RUN_DIR", "WANDB_MODE"):
        env.pop(var, None)
    return env


def train_in_subprocess(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """``stvnet train`` in a fresh process running this checkout's code (Lightning's DDP launcher re-runs it)."""
    return subprocess.run([sys.executable, "-m", "stvnet.cli", "train", *args], capture_output=True, text=True,
                          env=launch_env(), timeout=timeout, cwd=ROOT)


class SpacingRecorder:
    """Wraps a metric function ``(pred, target, spacing)`` and records the spacing of every call."""

    def __init__(self, original):
        self.original, self.spacings = original, []

    def __call__(self, pred, target, spacing):
        self.spacings.append(tuple(float(s) for s in spacing))
        return self.original(pred, target, spacing)


class FixedPredictor:
    """A stand-in predictor with a fixed probability map (what ensembling sees of a model)."""

    def __init__(self, prob):
        self.prob = prob

    def original_probabilities(self, scan, locations=None):
        import numpy as np

        return self.prob, np.eye(4)
