"""Plant the single-point bugs that once slipped through the suite, one at a time, and check that a test catches each.

Each bug is a literal text replacement in one library file. For each, the checkout's ``src``, ``data_modules``,
``tests``, ``experiments`` and ``sweeps`` are copied to a temporary folder, the bug is planted there and the tests
named for it run against that copy (``tests/conftest.py`` points subprocesses at the copy too). A bug is *caught*
when those tests fail. Run with ``make planted-bugs``; prints a Markdown table and exits 1 if any bug is missed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("src", "data_modules", "tests", "experiments", "sweeps", "pyproject.toml")


@dataclass(frozen=True)
class Bug:
    """One planted bug: replace ``old`` (must occur exactly once) by ``new`` in ``path``; ``tests`` must then fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


BUGS = (
    Bug("fold index off by one", "data_modules/cohort.py",
        "fold_subjects(self.splits, fold)", "fold_subjects(self.splits, fold - 1)",
        ("tests/data_modules/test_datamodule.py::test_each_loader_serves_exactly_its_splits_subjects_for_every_fold",)),
    Bug("val_dataloader serves the training subjects", "data_modules/datamodule.py",
        'return self._eval_loader("val")', 'return self._eval_loader("train")',
        ("tests/data_modules/test_datamodule.py::test_each_loader_serves_exactly_its_splits_subjects_for_every_fold",)),
    Bug("HU window rescaled to [0, 2]", "data_modules/transforms.py",
        "out_min_max=(0.0, 1.0)", "out_min_max=(0.0, 2.0)",
        ("tests/data_modules/test_transforms.py::test_hu_window_clamps_and_scales_to_exact_values",)),
    Bug("HU window bounds negated", "data_modules/transforms.py",
        "lo, hi = float(hu_window[0]), float(hu_window[1])", "lo, hi = -float(hu_window[1]), -float(hu_window[0])",
        ("tests/data_modules/test_transforms.py::test_hu_window_clamps_and_scales_to_exact_values",)),
    Bug("validation metrics in voxels, not mm", "src/stvnet/validation_rows.py",
        "spacing = torch.linalg.norm(affine[:3, :3], dim=0).tolist()", "spacing = [1.0, 1.0, 1.0]",
        ("tests/stvnet/test_lightning_module.py::test_validation_metrics_get_the_roi_spacing_in_array_order",)),
    Bug("evaluate passes the spacing in reversed axis order", "src/stvnet/evaluation.py",
        'spacing = read_header(row["label"]).spacing', 'spacing = read_header(row["label"]).spacing[::-1]',
        ("tests/stvnet/test_evaluation.py::test_evaluation_scores_in_each_labels_own_spacing",
         "tests/stvnet/test_evaluation.py::test_a_run_is_scored_in_each_labels_own_grid_and_its_masks_saved")),
    Bug("ensemble keeps only the last model", "src/stvnet/inference.py",
        "total = prob if total is None else total + prob", "total = prob * len(predictors)",
        ("tests/stvnet/test_inference.py::test_ensemble_probability_is_the_mean_of_its_members",)),
    Bug("predicted mask flipped along one axis", "src/stvnet/inference.py",
        "return to_scan_grid(self.probabilities(original), original), original.affine",
        "return to_scan_grid(self.probabilities(original), original)[::-1], original.affine",
        ("tests/stvnet/test_predict.py::test_predict_on_reoriented_resampled_scan_matches_its_own_ground_truth",)),
    Bug("HD95 takes the 90th percentile", "src/stvnet/metrics.py",
        "np.percentile(d_pt, 95), np.percentile(d_tp, 95)", "np.percentile(d_pt, 90), np.percentile(d_tp, 90)",
        ("tests/stvnet/test_metrics.py::test_hd95_is_the_95th_percentile_of_a_known_distance_distribution",)),
    Bug("resume forgets the stage lengths", "src/stvnet/callbacks/stage_callbacks.py",
        'stage.epochs = int(old["epochs"])', "pass",
        ("tests/stvnet/test_lightning_module.py::test_a_checkpoint_restores_the_stage_it_was_written_in",)),
)


def plant(bug: Bug, workdir: Path) -> None:
    """Copy the checkout into ``workdir`` and plant ``bug`` there."""
    for name in COPIED:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, workdir / name)
    target = workdir / bug.path
    text = target.read_text()
    if text.count(bug.old) != 1:
        raise SystemExit(f"{bug.path}: expected the text to replace exactly once, found {text.count(bug.old)}: "
                         f"{bug.old!r} (update the bug in mutation/planted_bugs.py to the current code)")
    target.write_text(text.replace(bug.old, bug.new))


def caught(bug: Bug) -> tuple[bool, float]:
    """Run the bug's tests against a copy with the bug planted: (did they fail, seconds)."""
    with tempfile.TemporaryDirectory(prefix="planted-") as tmp:
        workdir = Path(tmp)
        plant(bug, workdir)
        env = {**os.environ, "PYTHONPATH": f"{workdir}{os.pathsep}{workdir / 'src'}"}
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *bug.tests],
                                cwd=workdir, env=env, capture_output=True, text=True)
        return result.returncode == 1, time.perf_counter() - start


def main() -> int:
    print("| planted bug | file | caught by | caught | s |\n|---|---|---|---|---|")
    missed = 0
    for bug in BUGS:
        ok, seconds = caught(bug)
        missed += not ok
        tests = ", ".join(f"`{t.split('::')[-1]}`" for t in bug.tests)
        print(f"| {bug.name} | `{bug.path}` | {tests} | {'yes' if ok else '**MISSED**'} | {seconds:.0f} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
