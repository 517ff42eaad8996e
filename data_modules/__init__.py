"""The data side: cohort manifests, stratified folds, the preprocessed cache, TorchIO transforms, the femur locator,
the datamodule, and the synthetic cohort generator (:mod:`data_modules.synthetic`).

Nothing is imported eagerly, so that ``stvnet --help`` and the light subcommands do not load torch and Lightning:
the names below are loaded on first use (PEP 562)."""

from importlib import import_module

_OWNERS = {"FemurDataModule": "data_modules.datamodule", "load_or_create_splits": "data_modules.folds",
           "make_splits": "data_modules.folds", "ManifestError": "data_modules.manifest",
           "validate_manifest": "data_modules.manifest", "make_cohort": "data_modules.synthetic"}

__all__ = sorted(_OWNERS)


def __getattr__(name: str):
    if name not in _OWNERS:
        raise AttributeError(f"module 'data_modules' has no attribute '{name}'")
    return getattr(import_module(_OWNERS[name]), name)
