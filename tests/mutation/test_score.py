"""mutation/score.py: the score `make mutate` reports, overall, per module and where the time went."""

from __future__ import annotations

import importlib.util

import pandas as pd

from tests.conftest import ROOT

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


spec_s = importlib.util.spec_from_file_location("mutation_survivors", ROOT / "mutation" / "survivors.py")
survivors = importlib.util.module_from_spec(spec_s)
spec_s.loader.exec_module(survivors)


def test_survivors_keep_their_classification_by_the_line_they_mutate_not_by_number():
    """A new run renumbers mutants: the classification follows the mutated line; a mutation nobody has read is
    unclassified; a classified mutant that no longer survives drops out of the table."""
    results = ["    stvnet.metrics.x_dice__mutmut_9: survived", "    stvnet.metrics.x_dice__mutmut_2: killed",
               "    data_modules.datamodule.xǁFemurDataModuleǁ_eval_loader__mutmut_4: survived"]
    names = survivors.survivor_names(results)
    assert [survivors.split_name(n) for n in names] == [("stvnet.metrics", "dice", 9),
                                                        ("data_modules.datamodule", "FemurDataModuleǁ_eval_loader", 4)]
    diff = "--- a.py\n+++ a.py\n@@ -1,3 +1,3 @@\n def dice(a, b):\n-    return 2 * x / y\n+    return 2 * x * y\n"
    assert survivors.changed_lines(diff) == ("return 2 * x / y", "return 2 * x * y")
    previous = pd.DataFrame([
        ["stvnet.metrics", "dice", "7", "equivalent", "same value", "return 2 * x / y", "return 2 * x * y"],
        ["stvnet.metrics", "dice", "8", "wording", "a message", "gone", "gone too"],
        ["data_modules.datamodule", "FemurDataModuleǁ_eval_loader", "4", "unclassified", "-", "a", "b"],
    ], columns=survivors.COLUMNS)
    now = pd.DataFrame([["stvnet.metrics", "dice", 9, "return 2 * x / y", "return 2 * x * y"],
                        ["data_modules.datamodule", "FemurDataModuleǁ_eval_loader", 4, "a", "b"]],
                       columns=["module", "function", "mutant", "original", "mutated"])
    table = survivors.classify(now, previous)
    assert table[["function", "mutant", "kind", "why"]].values.tolist() == [
        ["FemurDataModuleǁ_eval_loader", 4, "unclassified", "new survivor; not yet looked at"],
        ["dice", 9, "equivalent", "same value"]]
