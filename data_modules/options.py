"""Checks of the datamodule's options, all at once and before any scan is read: a value that cannot work (a fold
past the last, a reversed HU window, a zero ROI) is named with its ``--data.<option>`` and what would work, instead
of surfacing minutes later as an error deep inside TorchIO, scikit-learn or a DataLoader."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from data_modules.errors import InvalidInput
from data_modules.manifest import COHORTS
from data_modules.transforms import LABEL_INTERPOLATIONS, PATCH_SAMPLERS

ROI_LOCATORS = ("template", "fraction")
# voxels coarser than this cannot resolve a femoral head (~45 mm across: fewer than 5 voxels)
MAX_TARGET_SPACING_MM = 10.0


def _positive(values: Sequence[Any] | None, integral: bool) -> bool:
    kind = int if integral else (int, float)
    return values is not None and len(values) == 3 and all(isinstance(v, kind) and v > 0 for v in values)


def option_problems(options: dict[str, Any]) -> list[str]:
    """One line per option of ``FemurDataModule`` that cannot work (``data.<name> <value>: <problem>``)."""
    o = options
    checks = [
        ("cohort", o["cohort"] in COHORTS, f"must be one of {', '.join(COHORTS)}"),
        ("n_folds", isinstance(o["n_folds"], int) and o["n_folds"] >= 2, "cross-validation needs at least 2 folds"),
        ("fold", 0 <= o["fold"] < max(o["n_folds"], 1), f"must be in 0..{o['n_folds'] - 1} (data.n_folds is "
                                                         f"{o['n_folds']})"),
        ("test_fraction", 0.0 <= o["test_fraction"] < 1.0, "must be in [0, 1) (the paper holds out 0.1)"),
        ("target_spacing", o["target_spacing"] is None or _positive(o["target_spacing"], False),
         "must be three spacings in mm > 0, or null to keep each scan's own"),
        ("target_spacing", o["target_spacing"] is None or not _positive(o["target_spacing"], False)
         or max(o["target_spacing"]) <= MAX_TARGET_SPACING_MM,
         f"voxels over {MAX_TARGET_SPACING_MM:g} mm cannot resolve a femoral head (~45 mm across); use 0.5-5 mm "
         "(the paper: 1 mm)"),
        ("roi_size", o["roi_size"] is None or _positive(o["roi_size"], True),
         "must be three voxel counts > 0, or null for the whole scan"),
        ("roi_locator", o["roi_locator"] in ROI_LOCATORS, f"must be one of {', '.join(ROI_LOCATORS)}"),
        ("roi_center", o["roi_center"] is None or (len(o["roi_center"]) == 3 and all(
            0.0 <= c <= 1.0 for c in o["roi_center"])), "must be three fractions of the field of view in [0, 1]"),
        ("roi_max_rotation", 0.0 <= o["roi_max_rotation"] <= 90.0, "must be in [0, 90] degrees"),
        ("hu_window", len(o["hu_window"]) == 2 and o["hu_window"][0] < o["hu_window"][1],
         "must be [low, high] HU with low < high, e.g. [-200, 1800]"),
        ("label_interpolation", o["label_interpolation"] in LABEL_INTERPOLATIONS,
         f"must be one of {', '.join(LABEL_INTERPOLATIONS)}"),
        ("batch_size", o["batch_size"] >= 1, "must be at least 1"),
        ("num_workers", o["num_workers"] >= 0, "must be 0 (load in the main process) or more"),
        ("augment", o["augment"] >= 0.0, "must be 0 (off) or a positive strength"),
        ("patch_size", o["patch_size"] is None or _positive(o["patch_size"], True),
         "must be three voxel counts > 0, or null to train on whole ROIs"),
        ("patch_sampler", o["patch_sampler"] in PATCH_SAMPLERS, f"must be one of {', '.join(PATCH_SAMPLERS)}"),
        ("samples_per_volume", o["samples_per_volume"] >= 1, "must be at least 1"),
        ("queue_length", o["queue_length"] >= 1, "must be at least 1"),
        ("preprocess_workers", o["preprocess_workers"] is None or o["preprocess_workers"] >= 1,
         "must be at least 1, or null for all cores"),
    ]
    problems = [f"data.{name} {o[name]}: {problem}" for name, ok, problem in checks if not ok]
    roi, patch = o["roi_size"], o["patch_size"]
    if not problems and roi is not None and patch is not None and any(p > r for p, r in zip(patch, roi)):
        problems.append(f"data.patch_size {patch}: larger than data.roi_size {roi}; patches are cut from the ROI")
    return problems


def check_options(options: dict[str, Any]) -> None:
    """Raise :class:`InvalidInput` listing every option that cannot work."""
    problems = option_problems(options)
    if problems:
        raise InvalidInput(*problems)
