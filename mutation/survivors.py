"""Carry each surviving mutant's classification over from the last run into ``mutation/survivors.tsv``.

A survivor is keyed by its module, function and the line it mutates (the original and the mutated text), not by
mutmut's number, which shifts whenever its function changes. Survivors of the new run that no earlier run classified
are listed as ``unclassified`` until someone reads them (``mutmut show <name>`` gives the diff); classifications of
mutants that no longer survive are dropped.

Usage, after ``make mutate`` (which runs it): ``python mutation/survivors.py mutation/results.txt mutation/survivors.tsv``
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

COLUMNS = ["module", "function", "mutant", "kind", "why", "original", "mutated"]
KEY = ["module", "function", "original", "mutated"]


def survivor_names(results: list[str]) -> list[str]:
    """The mutants listed as ``survived`` in ``mutmut results --all true``."""
    return [line.strip().rsplit(": ", 1)[0] for line in results if line.strip().endswith(": survived")]


def split_name(name: str) -> tuple[str, str, int]:
    """``stvnet.metrics.x_dice__mutmut_7`` -> (``stvnet.metrics``, ``dice``, 7); methods keep ``Classǁmethod``."""
    stem, number = name.rsplit("__mutmut_", 1)
    module, function = re.split(r"\.x[_ǁ]", stem, maxsplit=1)
    return module, function, int(number)


def changed_lines(diff: str) -> tuple[str, str]:
    """The first line a unified diff removes and the first it adds, stripped."""
    lines = diff.splitlines()
    removed = [line[1:].strip() for line in lines if line.startswith("-") and not line.startswith("---")]
    added = [line[1:].strip() for line in lines if line.startswith("+") and not line.startswith("+++")]
    return (removed[0] if removed else ""), (added[0] if added else "")


def classify(survivors: pd.DataFrame, previous: pd.DataFrame) -> pd.DataFrame:
    """``survivors`` (module, function, mutant, original, mutated) with the kind and reason an earlier run's table
    gave the same mutation, else ``unclassified``."""
    known = previous[previous["kind"] != "unclassified"].drop_duplicates(KEY)[[*KEY, "kind", "why"]]
    table = survivors.merge(known, on=KEY, how="left")
    new = table["kind"].isna()
    table.loc[new, "kind"] = "unclassified"
    table.loc[new, "why"] = "new survivor; not yet looked at"
    return table[COLUMNS].sort_values(["module", "function", "mutant"], ignore_index=True)


def mutmut_diff(name: str) -> str:
    return subprocess.run([sys.executable, "-m", "mutmut", "show", name], capture_output=True, text=True,
                          check=True).stdout


def main(results_path: str, table_path: str) -> None:
    names = survivor_names(Path(results_path).read_text().splitlines())
    rows = []
    for name in names:
        module, function, number = split_name(name)
        original, mutated = changed_lines(mutmut_diff(name))
        rows.append({"module": module, "function": function, "mutant": number, "original": original,
                     "mutated": mutated})
    previous = pd.read_csv(table_path, sep="\t", dtype=str, keep_default_na=False)
    table = classify(pd.DataFrame(rows, columns=["module", "function", "mutant", "original", "mutated"]), previous)
    table.to_csv(table_path, sep="\t", index=False)
    print(table["kind"].value_counts().to_string())


if __name__ == "__main__":
    main(*sys.argv[1:3])
