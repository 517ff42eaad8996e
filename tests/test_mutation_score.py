"""mutation/score.py: the score `make mutate` reports, overall, per module and where the time went."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mutation_score", ROOT / "mutation" / "score.py")
score = importlib.util.module_from_spec(spec)
spec.loader.exec_module(score)

RESULTS = """\
    stvnet.metrics.x_dice__mutmut_1: killed
    stvnet.metrics.x_dice__mutmut_2: survived
    stvnet.metrics.x_dice__mutmut_3: timeout
    data_modules.manifest.xǁManifestErrorǁ__init____mutmut_1: killed
    data_modules.manifest.x_read_manifest__mutmut_4: not checked
"""


def test_the_score_counts_killed_and_timeouts_over_checked_mutants_per_module():
    results = score.read_results(RESULTS.splitlines())
    assert list(results["module"]) == ["stvnet.metrics"] * 3 + ["data_modules.manifest"] * 2
    overall = score.score_table(results).splitlines()[2]
    assert overall == "| all | 5 | 2 | 1 | 1 | 1 | 75.0% |"
    per_module = score.score_table(results, "module").splitlines()[2:]
    assert per_module == ["| data_modules.manifest | 2 | 1 | 0 | 0 | 1 | 100.0% |",
                          "| stvnet.metrics | 3 | 1 | 1 | 1 | 0 | 66.7% |"]


def test_the_time_table_sums_each_modules_test_seconds(tmp_path):
    log = tmp_path / "log.tsv"
    log.write_text("stvnet.metrics.x_dice__mutmut_1\t1\t0.50\nstvnet.metrics.x_dice__mutmut_2\t0\t2.50\n"
                   "data_modules.manifest.xǁManifestErrorǁ__init____mutmut_1\t1\t1.00\n")
    assert score.time_table(str(log)).splitlines()[2:] == ["| data_modules.manifest | 1 | 1 | 1.00 |",
                                                          "| stvnet.metrics | 2 | 3 | 1.50 |"]
