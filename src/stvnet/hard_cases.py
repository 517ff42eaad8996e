"""Hard cases: the subjects where a shape prior should matter most, scored apart.

A femur whose head nearly touches the acetabulum (osteoarthritic narrow joint space) or whose bone is barely denser
than the muscle around it (osteoporosis) is where intensity alone leaves the boundary ambiguous and the paper's shape
prior is meant to help; metal in the other hip streaks across the femur's slices. The subgroups are read from
optional manifest columns (the synthetic cohort writes them; a clinical cohort can add them): a manifest without them
gets no hard-case table.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd


@dataclass(frozen=True)
class Subgroup:
    """Subjects whose manifest ``column`` satisfies ``below`` (a number: strictly below it) or equals ``value`` (or
    one of them, for a tuple)."""

    name: str
    column: str
    below: float | None = None
    value: object = None

    def members(self, table: pd.DataFrame) -> pd.Series:
        values = table[self.column]
        if self.below is not None:
            return pd.to_numeric(values, errors="coerce") < self.below
        accepted = self.value if isinstance(self.value, tuple) else (self.value,)
        return values.astype(str).str.lower().isin([str(v).lower() for v in accepted])


#: the hard cases of issue-16's comparison: the synthetic generator's osteoarthritic joints are 0.5-1.5 mm wide
SUBGROUPS = (
    Subgroup("narrow joint space (< 1.5 mm)", "joint_space_mm", below=1.5),
    Subgroup("osteoporotic", "osteoporotic", value=True),
    Subgroup("metal in the other hip", "metal", value=("prosthesis", "screws")),
)
#: manifest columns evaluation copies into each per-subject row
SUBGROUP_COLUMNS = tuple(dict.fromkeys(g.column for g in SUBGROUPS))
METRICS = ("dice", "hd", "hd95", "assd")


def hard_case_table(per_subject: pd.DataFrame) -> pd.DataFrame:
    """Per subgroup, split and model: subjects in and out of the subgroup and their mean metrics (each subject's mean
    over the runs that scored it first, so a subject held out by ten folds counts once)."""
    rows = []
    for group in SUBGROUPS:
        if group.column not in per_subject:
            continue
        inside = group.members(per_subject)
        for (split, model), part in per_subject.groupby(["split", "model"], sort=False):
            for label, sub in (("in", part[inside.loc[part.index]]), ("out", part[~inside.loc[part.index]])):
                if sub.empty:
                    continue
                means = sub.groupby("subject_id")[list(METRICS)].mean()
                rows.append({"subgroup": group.name, "members": label, "split": split, "model": model,
                             "subjects": len(means), **{m: float(means[m].mean()) for m in METRICS}})
    return pd.DataFrame(rows, columns=["subgroup", "members", "split", "model", "subjects", *METRICS])


def subgroup_rows(per_subject: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Each subgroup's own per-subject rows (for paired tests within it), for the subgroups the table can tell."""
    return {g.name: per_subject[g.members(per_subject)] for g in SUBGROUPS if g.column in per_subject}


def in_any_subgroup(per_subject: pd.DataFrame) -> pd.Series | None:
    """Whether each row's subject is a hard case of any subgroup (``None``: the table cannot tell)."""
    groups = [g.members(per_subject) for g in SUBGROUPS if g.column in per_subject]
    return pd.concat(groups, axis=1).any(axis=1) if groups else None


def difference_cell(row) -> str:
    """A paired-test row's mean difference (b - a) with its 95% CI, as a table cell."""
    return f"{row.mean_diff:+.3g} [{row.ci_low:+.3g}, {row.ci_high:+.3g}]"


def hard_case_markdown(table: pd.DataFrame, tests: pd.DataFrame) -> list[str]:
    """The hard-case section: means in and out of each subgroup per model, and the paired differences within it."""
    if table.empty:
        return []
    lines = ["## Hard cases", "",
             "Subjects of each subgroup (manifest columns) against the rest, each subject's mean over the runs that "
             "scored it; distances in mm.", "",
             "| subgroup | split | model | members | subjects | DSC | HD | HD95 | ASSD |", "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.subgroup} | {r.split} | {r.model} | {r.members} | {r.subjects} | {r.dice:.4f} | "
                     f"{r.hd:.2f} | {r.hd95:.2f} | {r.assd:.2f} |")
    if not tests.empty:
        lines += ["", "Within each subgroup, second model minus first on the same subjects: mean [95% CI], "
                  "rank-biserial r, Wilcoxon p.", "",
                  "| subgroup | split | models | n | metric | mean difference [95% CI] | r | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in tests.itertuples():
            lines.append(f"| {r.subgroup} | {r.split} | {r.model_b} − {r.model_a} | {r.n_pairs} | {r.metric} | "
                         f"{difference_cell(r)} | {r.rank_biserial:+.2f} | {r.p_value:.3g} |")
    return lines + [""]
