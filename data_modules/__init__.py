"""The data side: cohort manifests, the synthetic QCT cohort, stratified folds, TorchIO transforms, the datamodule."""

from data_modules.datamodule import FemurDataModule
from data_modules.folds import load_or_create_splits, make_splits
from data_modules.manifest import ManifestError, validate_manifest
from data_modules.synthetic import make_cohort

__all__ = ["FemurDataModule", "ManifestError", "load_or_create_splits", "make_cohort", "make_splits", "validate_manifest"]
