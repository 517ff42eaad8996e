"""``stvnet compare``: V-Net vs ST-V-Net (or any models) from local run records alone.

Reads each run folder's ``metrics.csv`` and ``config.yaml`` (no network, no W&B account) and, when given, the
``per_subject.csv`` of an evaluation. Writes to one folder:

* ``runs.csv``: one row per run (model, cohort, fold, seed, best epoch, validation metrics and the warped prior's
  Dice at the best epoch, epochs to reach the Dice threshold);
* ``comparison.md`` / ``comparison.csv``: per cohort, mean ± sd over runs (folds x seeds) per model, and the
  evaluation's tables (paired Wilcoxon tests with effect sizes, per sex, hard cases);
* ``learning_curves.png``: validation Dice vs epoch per model (mean over folds, min-max band), one panel per
  cohort — the paper claims ST-V-Net converges faster; the epochs-to-threshold column says whether it does here.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from data_modules.errors import InvalidInput, MissingInput, output_folder  # noqa: E402
from stvnet.evaluation import summarize, summary_markdown  # noqa: E402
from stvnet.stages import config_stages, schedule_position  # noqa: E402

VAL_METRICS = ("dice", "sensitivity", "specificity", "hd", "hd95", "assd")
# an ST-V-Net's own parts at the best epoch: the warped shape prior's Dice and its backbone's alone (NaN otherwise)
ST_METRICS = ("prior_dice", "backbone_dice")


def _mean_sd(mean: float, sd: float) -> str:
    return "–" if np.isnan(mean) else f"{mean:.4f} ± {sd:.4f}"


def final_stage_index(config: dict) -> int | None:
    """Index of the last stage of the run's StageSchedule (``None`` without one)."""
    return len(config_stages(config)) - 1 if schedule_position(config) is not None else None


def best_epoch_row(val: pd.DataFrame, final_index: int | None) -> pd.Series:
    """The epoch that stands for a run, by the checkpoint policy: best validation Dice within the final stage (any
    epoch without a schedule); the last epoch when the run never reached its final stage."""
    if final_index is not None and "val/stage" in val:
        final = val[val["val/stage"] == final_index]
        if final.empty:
            return val.loc[val["epoch"].idxmax()]
        val = final
    return val.loc[val["val/dice"].idxmax()]


def read_run(run: str | Path, threshold: float) -> tuple[dict, pd.DataFrame]:
    """Summary row and per-epoch validation curve of one run folder."""
    run = Path(run)
    missing = [name for name in ("config.yaml", "metrics.csv") if not (run / name).is_file()]
    if missing:
        raise MissingInput(f"{run}: not a run folder (no {' or '.join(missing)}); give the folders written by stvnet "
                           "train (runs/<name>/<cohort>/fold<k>/<time>)")
    config = yaml.safe_load((run / "config.yaml").read_text())
    metrics = pd.read_csv(run / "metrics.csv")
    if "val/dice" not in metrics:
        raise InvalidInput(f"{run}: metrics.csv has no validation Dice (the run never validated); train it for at "
                           "least one epoch, or leave it out")
    val = metrics.dropna(subset=["val/dice"]).groupby("epoch", as_index=False).last()
    best = best_epoch_row(val, final_stage_index(config))
    reached = val[val["val/dice"] >= threshold]
    row = {
        "model": config["run"]["name"], "cohort": config["data"]["cohort"], "fold": config["data"]["fold"],
        "seed": config.get("seed_everything"), "run": str(run), "epochs": int(val["epoch"].max()) + 1, "best_epoch": int(best["epoch"]),
        "best_stage": int(best["val/stage"]) if "val/stage" in best and pd.notna(best["val/stage"]) else np.nan,
        "epochs_to_threshold": int(reached["epoch"].iloc[0]) + 1 if len(reached) else np.nan,
    }
    for m in (*VAL_METRICS, *ST_METRICS):
        row[f"val_{m}"] = float(best[f"val/{m}"]) if f"val/{m}" in best else np.nan
    curve = val[["epoch", "val/dice"]].assign(model=row["model"], cohort=row["cohort"], run=row["run"])
    return row, curve


def learning_curves(curves: pd.DataFrame, path: Path, threshold: float) -> None:
    cohorts = list(dict.fromkeys(curves["cohort"]))
    fig, axes = plt.subplots(1, len(cohorts), figsize=(5.5 * len(cohorts), 4), squeeze=False)
    for ax, cohort in zip(axes[0], cohorts):
        part = curves[curves["cohort"] == cohort]
        for model, m in part.groupby("model", sort=False):
            stats = m.groupby("epoch")["val/dice"].agg(["mean", "min", "max"])
            ax.plot(stats.index + 1, stats["mean"], marker="o", ms=3, label=f"{model} ({m['run'].nunique()} runs)")
            ax.fill_between(stats.index + 1, stats["min"], stats["max"], alpha=0.2)
        ax.axhline(threshold, color="grey", ls=":", lw=1)
        ax.set_title(f"cohort: {cohort}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation DSC")
        ax.set_ylim(max(0.0, part["val/dice"].min() - 0.05), 1.0)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare_runs(runs: list[str | Path], out: str | Path, evaluation: str | Path | None = None,
                 threshold: float = 0.9) -> pd.DataFrame:
    """Build the comparison report; returns the per-run table."""
    out = Path(out)
    rows, curves = zip(*(read_run(r, threshold) for r in runs))  # every run is checked before anything is written
    output_folder(out, "--out")
    table = pd.DataFrame(rows)
    table.to_csv(out / "runs.csv", index=False)
    learning_curves(pd.concat(curves), out / "learning_curves.png", threshold)
    agg = []
    for (cohort, model), part in table.groupby(["cohort", "model"], sort=False):
        rec = {"cohort": cohort, "model": model, "runs": len(part), "folds": part["fold"].nunique(),
               "seeds": part["seed"].nunique(dropna=False),
               "epochs_to_threshold_mean": part["epochs_to_threshold"].mean(),
               "reached_threshold": int(part["epochs_to_threshold"].notna().sum())}
        for m in (*VAL_METRICS, *ST_METRICS):
            rec[f"val_{m}_mean"] = part[f"val_{m}"].mean()
            rec[f"val_{m}_sd"] = part[f"val_{m}"].std(ddof=1) if len(part) > 1 else 0.0
        agg.append(rec)
    summary = pd.DataFrame(agg)
    summary.to_csv(out / "comparison.csv", index=False)
    lines = ["# V-Net vs ST-V-Net", "",
             f"Validation metrics at each run's best epoch (the checkpoint evaluated; mean ± sd over runs: folds x "
             f"seeds); epochs to reach validation DSC ≥ {threshold} (mean over the runs that reached it); for an ST-V-Net "
             f"the DSC of its warped shape prior and of its backbone alone at that epoch.", "",
             "| cohort | model | runs (folds x seeds) | val DSC | val HD95 (mm) | val ASSD (mm) | epochs to DSC ≥ thr | "
             "prior DSC | backbone DSC |", "|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        ept = "never" if not r.reached_threshold else f"{r.epochs_to_threshold_mean:.1f} ({r.reached_threshold}/{r.runs})"
        prior, backbone = (_mean_sd(getattr(r, f"val_{m}_mean"), getattr(r, f"val_{m}_sd")) for m in ST_METRICS)
        lines.append(f"| {r.cohort} | {r.model} | {r.runs} ({r.folds} x {r.seeds}) | {r.val_dice_mean:.4f} ± "
                     f"{r.val_dice_sd:.4f} | {r.val_hd95_mean:.2f} ± {r.val_hd95_sd:.2f} | {r.val_assd_mean:.2f} ± "
                     f"{r.val_assd_sd:.2f} | {ept} | {prior} | {backbone} |")
    lines.append("")
    if evaluation:
        per_subject = pd.read_csv(Path(evaluation) / "per_subject.csv")
        lines.append(summary_markdown(summarize(per_subject), per_subject).replace("# Segmentation", "## Test set: segmentation", 1))
    lines += ["", "![learning curves](learning_curves.png)", ""]
    if evaluation:  # the evaluation's figures, linked relative to this report
        for name, title in (("paired_differences.png", "paired per-subject differences"), ("boxplots.png", "box plots")):
            figure = Path(evaluation) / name
            if figure.is_file():
                lines += [f"![{title}]({Path(os.path.relpath(figure, out)).as_posix()})", ""]
    (out / "comparison.md").write_text("\n".join(lines))
    return table
