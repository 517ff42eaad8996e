"""``stvnet evaluate``: predict held-out subjects with trained runs and report the paper's metrics.

For each run (folder or checkpoint) the subjects of its held-out test set (and/or its fold's validation
set) are segmented in their original geometry, saved as NIfTI, and scored with :func:`evaluate_case`
against the original labels. Outputs, in one folder:

* ``per_subject.csv``: subject, sex, fold, seed, model, split, the checkpoint's epoch and stage, the mask written,
  every metric, and the manifest's hard-case columns when it has them;
* ``summary.csv`` / ``summary.md``: mean ± sd per model x cohort (all/male/female), like the paper's tables,
  with paired Wilcoxon signed-rank p-values between models trained on the same cohort (V-Net vs ST-V-Net) and
  their effect sizes, a table of sex-specific vs pooled training of each architecture when both were evaluated,
  and the hard cases (:mod:`stvnet.hard_cases`);
* ``paired_tests.csv``: every paired test (metric, cohort, n, median and mean difference with its 95% CI, Cohen's
  d_z, rank-biserial r, p); ``hard_cases.csv`` / ``hard_case_tests.csv``: the same within each hard-case subgroup;
* ``boxplots.png``, ``paired_differences.png`` (per-subject differences of each architecture pair, hard cases
  marked) and ``overlay_<model>_<best|median|worst>_<subject>.png``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import yaml
from scipy import stats
from tqdm.auto import tqdm

from data_modules.datamodule import manifest_in_use
from data_modules.synthetic import DEFAULT_COHORT_DIR
from data_modules.errors import InvalidInput, MissingInput, output_folder
from data_modules.folds import fold_subjects
from data_modules.manifest import filter_cohort, validate_manifest
from data_modules.scan_io import read_header, read_voxels
from stvnet.ceiling import CEILING_METRICS, ceiling_scores
from stvnet.hard_cases import (
    SUBGROUP_COLUMNS,
    difference_cell,
    hard_case_markdown,
    hard_case_table,
    in_any_subgroup,
    subgroup_rows,
)
from stvnet.inference import CheckpointInfo, Predictor, find_checkpoint, largest_component, read_checkpoint_info
from stvnet.metrics import METRIC_KEYS, evaluate_case
from stvnet.parallel import map_in_processes
from stvnet.report import box_plots, overlay_png, paired_differences

#: the paper's reported metrics, in table order
PAPER_METRICS = ("dice", "sensitivity", "specificity", "hd", "assd")
COHORT_CODES = {"all": None, "male": "M", "female": "F"}
#: per-subject columns of the ROI grid's ceiling (:mod:`stvnet.ceiling`)
CEILING_COLUMNS = tuple(f"ceiling_{m}" for m in CEILING_METRICS)


@dataclass
class RunInfo:
    """What evaluation needs to know about one trained run."""

    checkpoint: Path
    model: str
    fold: int
    cohort: str
    data_hparams: dict
    epoch: int
    stage: str
    subjects: dict[str, list[str]]  # train / val / test ids the run was trained and validated on
    manifest: str
    seed: int | None = None  # the run's seed_everything (config.yaml), to tell repeated runs of one fold apart


def run_subjects(run_dir: Path | None, info: CheckpointInfo) -> tuple[dict[str, list[str]], str]:
    """A run's own subjects and manifest: its ``splits.json`` (``run_dir`` given: the checkpoint is in its run folder),
    else the record in its checkpoint. Never recomputed from a splits folder (a path relative to wherever the command
    was started)."""
    record = run_dir / "splits.json" if run_dir is not None else None
    if record is not None and record.is_file():  # written by stvnet train with the run's fold and manifest
        splits = json.loads(record.read_text())
        return fold_subjects(splits, int(splits["fold"])), str(splits["manifest"])
    if info.split and "subjects" in info.split:
        return info.split["subjects"], str(info.data_hparams.get("manifest") or "")
    raise MissingInput(f"{info.path}: neither {record or 'a run folder'} nor the checkpoint records the run's "
                       "subjects; evaluate the run folder written by stvnet train")


def describe_run(run: str | Path) -> RunInfo:
    """Locate a run's checkpoint and read its model name (``run.name`` of its config, suffixed with the training
    cohort when that is ``male`` or ``female``), fold, cohort, subjects and the epoch and stage evaluated. A checkpoint
    outside its run folder is named by its file."""
    ckpt = find_checkpoint(run)
    info = read_checkpoint_info(ckpt)
    if "fold" not in info.data_hparams:
        raise MissingInput(f"{ckpt}: records no data settings (fold, cohort); evaluate a checkpoint written by "
                           "stvnet train")
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None  # runs/<name>/<cohort>/fold<k>/<t>
    config = run_dir / "config.yaml" if run_dir is not None else None
    settings = yaml.safe_load(config.read_text()) if config and config.is_file() else {}
    name = (settings.get("run") or {}).get("name")
    name = name or (run_dir.parts[-4] if run_dir is not None and len(run_dir.parts) >= 4 else ckpt.stem)
    cohort = str(info.data_hparams["cohort"])
    model = str(name) if cohort == "all" else f"{name}-{cohort}"  # sex-specific models are models of their own
    subjects, manifest = run_subjects(run_dir, info)
    seed = settings.get("seed_everything")
    return RunInfo(ckpt, model, int(info.data_hparams["fold"]), cohort, info.data_hparams, info.epoch, info.stage,
                   subjects, manifest, None if seed is None else int(seed))


def cohort_table(info: RunInfo, manifest: str | None) -> pd.DataFrame:
    """The validated manifest rows of a run's cohort, indexed by subject id."""
    path = manifest or info.manifest or manifest_in_use(None, info.data_hparams.get("synthetic_dir",
                                                                                    DEFAULT_COHORT_DIR))
    table = filter_cohort(validate_manifest(path), info.cohort)
    missing = sorted((set(info.subjects["test"]) | set(info.subjects["val"])) - set(table["subject_id"]))
    if missing:
        raise InvalidInput(f"{path}: {len(missing)} subject(s) of run {info.checkpoint} are not in this manifest "
                           f"(e.g. {missing[0]}); pass the manifest the run was trained on with --manifest")
    return table.set_index("subject_id")


def evaluate_runs(
    runs: list[str | Path],
    out: str | Path,
    manifest: str | None = None,
    splits: tuple[str, ...] = ("test",),
    overwrite: bool = False,
    device: str = "auto",
    save_masks: bool = True,
    figures: bool = True,
    keep_largest: bool = False,
    workers: int = 1,
) -> pd.DataFrame:
    """Evaluate runs (``workers`` runs at a time, each in a process of its own) and write the report; returns the
    per-subject table, in the order of ``runs`` whatever ``workers``.

    ``keep_largest`` scores the masks after keeping their largest connected component (as ``stvnet predict
    --largest-component`` writes them); the default scores the network's raw thresholded output."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    infos = [describe_run(r) for r in runs]
    tables = [cohort_table(info, manifest) for info in infos]  # every run and manifest checked before any output
    output_folder(out, "--out")
    # several seeds of one model and fold: their masks go to fold<k>_seed<s>
    seeded = len({(i.model, i.fold, i.seed) for i in infos}) > len({(i.model, i.fold) for i in infos})

    def masks(info: RunInfo) -> Path | None:
        run_folder = f"fold{info.fold}_seed{info.seed}" if seeded else f"fold{info.fold}"
        return out / "predictions" / info.model / run_folder if save_masks else None

    tasks = [(info, table, device, splits, masks(info), keep_largest) for info, table in zip(infos, tables)]
    results = map_in_processes(_score_task, tasks, workers)
    rows = [row for run_rows in results for row in run_rows]
    per_subject = pd.DataFrame(rows)
    write_report(per_subject, out, figures)
    return per_subject


def _score_task(task: tuple) -> list[dict]:
    """Every split of one run (a worker's unit of :func:`evaluate_runs`)."""
    info, table, device, splits, masks, keep_largest = task
    predictor = Predictor.from_checkpoint(info.checkpoint, device=device)
    return [row for split in splits for row in score_run(info, table, predictor, split, masks, keep_largest)]


def score_run(info: RunInfo, table: pd.DataFrame, predictor: Predictor, split: str, masks: Path | None,
              keep_largest: bool) -> list[dict]:
    """One row per subject of a run's ``split``: the checkpoint's mask scored against the label in the label's own
    grid and spacing, beside the ceiling of the run's ROI grid (``ceiling_*``: the label through the run's own
    preprocessing and back, :mod:`stvnet.ceiling`); each mask saved under ``masks`` when given."""
    rows = []
    threshold = predictor.threshold
    for sid in tqdm(info.subjects[split], desc=f"{info.model} fold {info.fold} {split}", unit="scan"):
        row = table.loc[sid]
        prob, perfect, affine = predictor.with_ceiling(row["image"], row["label"])
        mask = (prob > threshold).astype(np.uint8)
        if keep_largest:
            mask = largest_component(mask)
        label = read_voxels(row["label"]).reshape(mask.shape) > 0
        spacing = read_header(row["label"]).spacing
        metrics = {**evaluate_case(mask, label, spacing), **ceiling_scores(perfect, label, spacing, threshold)}
        if masks is not None:
            masks.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(mask, affine), masks / f"{sid}.nii.gz")
        rows.append({"subject_id": sid, "sex": row["sex"], "fold": info.fold, "seed": info.seed, "model": info.model,
                     "split": split, "cohort": info.cohort, "image": row["image"], "label": row["label"],
                     "ckpt_epoch": info.epoch, "ckpt_stage": info.stage,
                     "prediction": str(masks / f"{sid}.nii.gz") if masks is not None else "", **metrics,
                     **{c: row[c] for c in SUBGROUP_COLUMNS if c in row.index}})
    return rows


def write_report(per_subject: pd.DataFrame, out: Path, figures: bool) -> None:
    """per_subject.csv, summary.csv/.md, paired_tests.csv and, with ``figures``, box plots and overlays of each
    model's worst, median and best subject."""
    per_subject.to_csv(out / "per_subject.csv", index=False)
    summary = summarize(per_subject)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(summary_markdown(summary, per_subject))
    tests = pd.concat([paired_tests(per_subject).assign(comparison="architecture"),
                       paired_tests(per_subject, training_cohort_pairs(per_subject)).assign(comparison="training cohort")])
    tests.to_csv(out / "paired_tests.csv", index=False)
    hard = hard_case_table(per_subject)
    if not hard.empty:
        hard.to_csv(out / "hard_cases.csv", index=False)
        hard_case_tests(per_subject).to_csv(out / "hard_case_tests.csv", index=False)
    if not figures:
        return
    box_plots(per_subject, PAPER_METRICS, out / "boxplots.png")
    pairs = architecture_pairs(per_subject)
    if pairs:
        paired_differences(per_subject, pairs, ("dice", "hd", "hd95"), in_any_subgroup(per_subject),
                           out / "paired_differences.png")
    for model, part in per_subject.groupby("model"):
        ranked = part.sort_values("dice").reset_index(drop=True)
        for tag, i in {"worst": 0, "median": len(ranked) // 2, "best": len(ranked) - 1}.items():
            r = ranked.iloc[i]
            pred = Path(str(r.get("prediction") or ""))
            if pred.name and pred.is_file():
                overlay_png(r["image"], r["label"], pred, out / f"overlay_{model}_{tag}_{r['subject_id']}.png",
                            title=f"{model} {tag}: {r['subject_id']} (Dice {r['dice']:.3f}, HD {r['hd']:.1f} mm)")


def summarize(per_subject: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd and n per model x split x cohort for every metric, plus paired Wilcoxon p-values."""
    records = []
    trained_on = _training_cohorts(per_subject)
    for (model, split), part in per_subject.groupby(["model", "split"], sort=False):
        for cohort, code in COHORT_CODES.items():
            if trained_on[model] not in ("all", cohort):
                continue  # a sex-specific model has one row: its own sex
            sub = part if code is None else part[part["sex"] == code]
            if sub.empty:
                continue
            rec = {"model": model, "split": split, "cohort": cohort, "n": len(sub)}
            for m in [*METRIC_KEYS, *(c for c in CEILING_COLUMNS if c in sub)]:
                rec[f"{m}_mean"] = float(sub[m].mean())
                rec[f"{m}_sd"] = float(sub[m].std(ddof=1)) if len(sub) > 1 else 0.0
            records.append(rec)
    summary = pd.DataFrame(records)
    for pair in paired_tests(per_subject).itertuples():
        mask = (summary["split"] == pair.split) & (summary["cohort"] == pair.cohort) & (summary["model"] == pair.model_b)
        summary.loc[mask, f"{pair.metric}_p_vs_{pair.model_a}"] = pair.p_value
    return summary


def _training_cohorts(per_subject: pd.DataFrame) -> pd.Series:
    """Each model's training cohort (``all`` when the table does not say)."""
    if "cohort" not in per_subject:
        return pd.Series("all", index=list(dict.fromkeys(per_subject["model"])))
    return per_subject.groupby("model", sort=False)["cohort"].first()


def architecture_pairs(per_subject: pd.DataFrame) -> list[tuple[str, str]]:
    """Pairs of models trained on the same cohort (e.g. V-Net vs ST-V-Net): the like-for-like comparisons."""
    cohorts = _training_cohorts(per_subject)
    return [(a, b) for a, b in itertools.combinations(cohorts.index, 2) if cohorts[a] == cohorts[b]]


def training_cohort_pairs(per_subject: pd.DataFrame) -> list[tuple[str, str]]:
    """(pooled, sex-specific) pairs of one architecture, e.g. ``stvnet`` vs ``stvnet-female``: does training on
    one sex help that sex? (Sex-specific models are named ``<name>-<cohort>``.)"""
    cohorts = _training_cohorts(per_subject)
    return [(pooled, model) for model, cohort in cohorts.items() if cohort != "all"
            for pooled in cohorts.index if cohorts[pooled] == "all" and model == f"{pooled}-{cohort}"]


#: the columns of ``paired_tests.csv``
PAIRED_COLUMNS = ["model_a", "model_b", "split", "cohort", "metric", "n_pairs", "median_diff", "p_value", "mean_diff",
                  "ci_low", "ci_high", "cohen_dz", "rank_biserial"]


def paired_tests(per_subject: pd.DataFrame, pairs: list[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Wilcoxon signed-rank test per metric for each pair of models (default: :func:`architecture_pairs`)
    on the (fold, subject)s both scored, per split and test cohort."""
    rows = []
    for a, b in architecture_pairs(per_subject) if pairs is None else pairs:
        for split in per_subject["split"].unique():
            for cohort, code in COHORT_CODES.items():
                part = per_subject[per_subject["split"] == split]
                if code is not None:
                    part = part[part["sex"] == code]
                key = ["subject_id", "fold"] if split == "val" else ["subject_id"]
                left = part[part["model"] == a].groupby(key)[list(PAPER_METRICS)].mean()
                right = part[part["model"] == b].groupby(key)[list(PAPER_METRICS)].mean()
                both = left.join(right, lsuffix="_a", rsuffix="_b", how="inner")
                if len(both) < 2:
                    continue
                for m in PAPER_METRICS:
                    diff = both[f"{m}_b"] - both[f"{m}_a"]
                    p = 1.0 if np.allclose(diff, 0) else float(stats.wilcoxon(both[f"{m}_a"], both[f"{m}_b"]).pvalue)
                    rows.append({"model_a": a, "model_b": b, "split": split, "cohort": cohort, "metric": m,
                                 "n_pairs": len(both), "median_diff": float(diff.median()), "p_value": p,
                                 **effect_sizes(diff.to_numpy())})
    return pd.DataFrame(rows, columns=PAIRED_COLUMNS)


def effect_sizes(diff: np.ndarray) -> dict[str, float]:
    """How large a paired difference (b - a) is, beside whether it is significant: its mean with a 95% t-interval,
    Cohen's d_z (mean over the sd of the differences; infinite for a constant non-zero one) and the matched-pairs
    rank-biserial correlation (the Wilcoxon test's own effect size: the share of the rank sum on positive minus that
    on negative differences, -1..1)."""
    n = len(diff)
    mean = float(diff.mean())
    sd = float(diff.std(ddof=1)) if n > 1 else 0.0
    half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if n > 1 else float("nan")
    nonzero = diff[diff != 0]
    ranks = stats.rankdata(np.abs(nonzero))
    total = ranks.sum()
    return {"mean_diff": mean, "ci_low": mean - half, "ci_high": mean + half,
            "cohen_dz": mean / sd if sd > 0 else float(np.sign(mean) * np.inf) if mean else 0.0,
            "rank_biserial": float((ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / total) if total else 0.0}


def hard_case_tests(per_subject: pd.DataFrame) -> pd.DataFrame:
    """:func:`paired_tests` of the architectures within each hard-case subgroup (all subjects of it, either sex)."""
    parts = [paired_tests(rows).query("cohort == 'all'").assign(subgroup=name)
             for name, rows in subgroup_rows(per_subject).items()]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*PAIRED_COLUMNS, "subgroup"])


def _effect_markdown(tests: pd.DataFrame) -> list[str]:
    """Each paired comparison's effect size: mean difference (b - a) with its 95% CI, Cohen's d_z, rank-biserial r."""
    lines = ["## Paired differences", "",
             "Second model minus first on the same subjects (test: each subject's mean over the runs that held it out; "
             "validation: per subject and fold): mean [95% CI], Cohen's d_z, matched-pairs rank-biserial r, Wilcoxon "
             "p.", "",
             "| split | models | subjects | n | metric | mean difference [95% CI] | d_z | r | p |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in tests.itertuples():
        lines.append(f"| {r.split} | {r.model_b} − {r.model_a} | {r.cohort} | {r.n_pairs} | {r.metric} | "
                     f"{difference_cell(r)} | {r.cohen_dz:+.2f} | {r.rank_biserial:+.2f} | {r.p_value:.3g} |")
    return lines + [""]


def _sex_specific_markdown(per_subject: pd.DataFrame) -> list[str]:
    """Pooled vs sex-specific training of each architecture, on the subjects of that sex."""
    pairs = training_cohort_pairs(per_subject)
    if not pairs:
        return []
    tests = paired_tests(per_subject, pairs)
    tests = tests[tests["cohort"] != "all"]  # a sex-specific model only sees its own sex
    lines = ["## Sex-specific vs pooled training", "",
             "Median paired difference (sex-specific − pooled model) on the subjects both models held out (sex-specific "
             "splits are drawn within one sex, so the overlap can be small), Wilcoxon p.", "",
             "| split | architecture | subjects | n | " + " | ".join(PAPER_METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(PAPER_METRICS)]
    for (split, a, b, cohort), part in tests.groupby(["split", "model_a", "model_b", "cohort"], sort=False):
        by_metric = part.set_index("metric")
        cells = [f"{by_metric.loc[m, 'median_diff']:+.3g} (p={by_metric.loc[m, 'p_value']:.3g})" for m in PAPER_METRICS]
        lines.append(f"| {split} | {b} vs {a} | {cohort} | {int(part['n_pairs'].iloc[0])} | " + " | ".join(cells) + " |")
    untested = [f"{b} vs {a}" for a, b in pairs if not ((tests["model_a"] == a) & (tests["model_b"] == b)).any()]
    if untested:
        lines += ["", f"Not tested (fewer than 2 shared subjects): {', '.join(untested)}."]
    return lines + [""]


def summary_markdown(summary: pd.DataFrame, per_subject: pd.DataFrame) -> str:
    """The paper-style table: mean ± sd of DSC, sensitivity, specificity, HD (mm) and ASD (mm)."""
    heads = {"dice": "DSC", "sensitivity": "Sensitivity", "specificity": "Specificity", "hd": "HD (mm)", "assd": "ASSD (mm)"}
    lines = ["# Segmentation of the left proximal femur", "",
             "Mean ± sd over subjects; distances in mm in each scan's own grid (definitions: `stvnet.metrics`).", ""]
    for split, part in summary.groupby("split", sort=False):
        lines += [f"## {split} set", "", "| model | cohort | n | " + " | ".join(heads.values()) + " |",
                  "|---|---|---|" + "---|" * len(heads)]
        for r in part.itertuples():
            cells = []
            for m in heads:
                digits = 4 if m in ("dice", "sensitivity", "specificity") else 2
                cell = f"{getattr(r, m + '_mean'):.{digits}f} ± {getattr(r, m + '_sd'):.{digits}f}"
                pcols = [c for c in summary.columns if c.startswith(f"{m}_p_vs_")]
                for c in pcols:
                    val = summary.loc[r.Index, c]
                    if pd.notna(val):
                        cell += f" (p={val:.3g} vs {c.split('_p_vs_')[1]})"
                cells.append(cell)
            lines.append(f"| {r.model} | {r.cohort} | {r.n} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _ceiling_markdown(summary)
    tests = paired_tests(per_subject)
    if not tests.empty:
        lines += ["p-values: paired Wilcoxon signed-rank tests (two-sided) against a model trained on the same "
                  "cohort, on the same subjects.", ""]
        lines += _effect_markdown(tests)
    lines += _sex_specific_markdown(per_subject)
    lines += hard_case_markdown(hard_case_table(per_subject),
                                hard_case_tests(per_subject).query("metric in ('dice', 'hd')"))
    lines += _checkpoint_markdown(per_subject)
    return "\n".join(lines)


def _ceiling_markdown(summary: pd.DataFrame) -> list[str]:
    """Each model beside the ceiling of its ROI grid (a perfect network through the same preprocessing) and the gap."""
    if "ceiling_dice_mean" not in summary:
        return []
    lines = ["## Against the ceiling of the ROI grid", "",
             "Ceiling: each subject's label through the run's own preprocessing (orientation, spacing, ROI) and back "
             "to the scan's grid as predictions go, thresholded at the model's threshold (`stvnet.ceiling`). Gap: "
             "ceiling − model; what training loses, not resolution.", "",
             "| split | model | cohort | n | DSC | ceiling DSC | gap | HD95 (mm) | ceiling HD95 (mm) | ASSD (mm) | "
             "ceiling ASSD (mm) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.split} | {r.model} | {r.cohort} | {r.n} | {r.dice_mean:.4f} | {r.ceiling_dice_mean:.4f} | "
                     f"{r.ceiling_dice_mean - r.dice_mean:+.4f} | {r.hd95_mean:.2f} | {r.ceiling_hd95_mean:.2f} | "
                     f"{r.assd_mean:.2f} | {r.ceiling_assd_mean:.2f} |")
    return lines + [""]


def _checkpoint_markdown(per_subject: pd.DataFrame) -> list[str]:
    """Which checkpoint stood for each model and fold: its stage and epoch (best Dice within the final stage)."""
    if "ckpt_epoch" not in per_subject:
        return []
    seeds = "seed" in per_subject and per_subject["seed"].nunique() > 1
    keys = ["model", "fold", "seed"] if seeds else ["model", "fold"]
    used = per_subject.groupby(keys, sort=False)[["ckpt_stage", "ckpt_epoch"]].first().reset_index()
    lines = ["## Checkpoints evaluated", "",
             "Best validation DSC within each run's final stage (the last epoch if it never reached it).", "",
             f"| model | fold |{' seed |' if seeds else ''} stage | epoch |", f"|---|---|{'---|' if seeds else ''}---|---|"]
    lines += [f"| {r.model} | {r.fold} |{f' {int(r.seed)} |' if seeds else ''} {r.ckpt_stage} | {int(r.ckpt_epoch)} |"
              for r in used.itertuples()]
    return lines + [""]
