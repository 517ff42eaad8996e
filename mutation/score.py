"""The mutation score of a ``make mutate`` run, overall and per module, from ``mutmut results --all true``.

A mutant is *detected* when a test fails for it (killed) or it runs past its time (timeout: an endless loop the tests
would hang on); the score is detected / checked. Reads the results listing on stdin, prints Markdown tables.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

STATUSES = ("killed", "timeout", "survived")


def read_results(lines: list[str]) -> pd.DataFrame:
    """One row per mutant: its module (``stvnet.metrics``), function and status."""
    rows = []
    for line in lines:
        if ": " not in line:
            continue
        name, status = line.strip().rsplit(": ", 1)
        module, function = re.split(r"\.x[_ǁ]", name.split("__mutmut_")[0], maxsplit=1)
        rows.append({"module": module, "function": function, "status": status})
    return pd.DataFrame(rows, columns=["module", "function", "status"])


def score_table(results: pd.DataFrame, by: str | None = None) -> str:
    """Markdown: mutants, each status, other (not checked, no tests, ...) and the score, overall or per ``by``."""
    groups = results.groupby(by) if by else [("all", results)]
    lines = [f"| {by or 'modules'} | mutants | killed | timeout | survived | other | score |",
             "|---|---|---|---|---|---|---|"]
    for name, part in groups:
        counts = part["status"].value_counts()
        n = {s: int(counts.get(s, 0)) for s in STATUSES}
        checked = sum(n.values())
        score = f"{100 * (n['killed'] + n['timeout']) / checked:.1f}%" if checked else "-"
        lines.append(f"| {name} | {len(part)} | {n['killed']} | {n['timeout']} | {n['survived']} | "
                     f"{len(part) - checked} | {score} |")
    return "\n".join(lines)


def time_table(log: str) -> str:
    """Markdown: per module, the mutants run and the seconds their kept tests took, from the conftest's log."""
    runs = pd.read_csv(log, sep="\t", names=["mutant", "exit", "seconds"])
    runs["module"] = runs["mutant"].str.split(r"\.x[_ǁ]", n=1, regex=True).str[0]
    table = runs.groupby("module")["seconds"].agg(["count", "sum", "mean"])
    lines = ["| module | mutants run | test seconds | mean |", "|---|---|---|---|"]
    lines += [f"| {name} | {int(row['count'])} | {row['sum']:.0f} | {row['mean']:.2f} |" for name, row in table.iterrows()]
    return "\n".join(lines)


def main() -> None:
    """Score tables from the results on stdin; with a log path argument, the time table too."""
    results = read_results(sys.stdin.read().splitlines())
    print(score_table(results) + "\n\n" + score_table(results, "module"))
    if len(sys.argv) > 1 and Path(sys.argv[1]).is_file():
        print("\n" + time_table(sys.argv[1]))


if __name__ == "__main__":
    main()
