"""Shared fixtures: tiny synthetic cohorts that keep the suite fast on two CPU cores."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_modules.synthetic import make_cohort

TINY_SPACING = (3.0, 3.0, 4.0)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 14-subject cohort at coarse resolution; returns its manifest."""
    out = tmp_path_factory.mktemp("tiny_cohort")
    return make_cohort(out, n_subjects=14, seed=7, spacing=TINY_SPACING, workers=1)


def tiny_data_args(manifest: Path, splits_dir: Path, **overrides) -> dict:
    """Datamodule arguments for 32^3 ROIs at 4 mm on the tiny cohort."""
    args = dict(
        manifest=str(manifest), splits_dir=str(splits_dir), n_folds=3, target_spacing=(4.0, 4.0, 4.0),
        roi_size=(32, 32, 32), batch_size=2, num_workers=0, augment=0.0,
    )
    args.update(overrides)
    return args
