"""The synthetic QCT hip cohort generator: the default dataset, its clinical-size preset, the femur shape model it
draws from, re-framing of scans and the realism report.

The data pipeline reaches it only through :func:`default_manifest` (and :data:`DEFAULT_COHORT_DIR`); everything
else here is for writing and inspecting cohorts (``stvnet synth``) and for tests and benchmarks."""

from data_modules.synthetic.cohort import (
    DEFAULT_COHORT_DIR,
    GENERATOR_VERSION,
    PRESETS,
    cohort_fingerprint,
    default_manifest,
    make_cohort,
    read_parameters,
)

__all__ = ["DEFAULT_COHORT_DIR", "GENERATOR_VERSION", "PRESETS", "cohort_fingerprint", "default_manifest",
           "make_cohort", "read_parameters"]
