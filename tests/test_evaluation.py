"""`stvnet evaluate`: masks in the scans' own geometry, per-subject CSV, paper-style summary, figures."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from stvnet.cli import main as cli_main
from stvnet.evaluation import evaluate_runs, paired_tests, summarize
from stvnet.metrics import METRIC_KEYS


@pytest.mark.slow
def test_evaluate_two_models_writes_full_report(trained_runs, tiny_cohort, tmp_path):
    out = tmp_path / "eval"
    table = evaluate_runs([trained_runs["vnet"], trained_runs["vnet_b"]], out, splits=("test", "val"))
    manifest = pd.read_csv(tiny_cohort)
    n_test = table[(table["model"] == "vnet") & (table["split"] == "test")].shape[0]
    assert n_test == round(0.1 * len(manifest))
    assert set(table["model"]) == {"vnet", "vnet_b"} and set(table["split"]) == {"test", "val"}
    assert np.isfinite(table[[m for m in METRIC_KEYS if m != "rvd"]].to_numpy()).all()
    per_subject = pd.read_csv(out / "per_subject.csv")
    assert {"subject_id", "sex", "fold", "model", *METRIC_KEYS} <= set(per_subject.columns)
    # predicted masks live in each scan's original grid
    row = per_subject.iloc[0]
    pred = nib.load(out / "predictions" / row["model"] / f"fold{row['fold']}" / f"{row['subject_id']}.nii.gz")
    image = nib.load(row["image"])
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["cohort"]) == {"all", "male", "female"}
    assert "dice_p_vs_vnet" in summary.columns
    md = (out / "summary.md").read_text()
    assert "| model | cohort | n | DSC |" in md and "p=" in md
    assert (out / "boxplots.png").stat().st_size > 10_000
    for model in ("vnet", "vnet_b"):
        for tag in ("best", "median", "worst"):
            assert len(list(out.glob(f"overlay_{model}_{tag}_sub-*.png"))) == 1
    with pytest.raises(FileExistsError):
        evaluate_runs([trained_runs["vnet"]], out)


def test_evaluate_cli_refuses_existing_folder(trained_runs, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("results")
    assert cli_main(["evaluate", str(trained_runs["vnet"]), "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "results"


def test_summary_statistics_and_paired_wilcoxon():
    noise = np.random.default_rng(0).normal(0, 0.01, size=12)
    rows = []
    for model, better in (("a", 0), ("b", 1)):
        for i in range(12):
            base = {m: 0.0 for m in METRIC_KEYS}
            # b's Dice exceeds a's on every subject, by distinct amounts
            base.update(dice=0.9 + noise[i] + better * 0.002 * (i + 1), hd=5 + i * 0.1 - better)
            rows.append({"subject_id": f"s{i}", "sex": "M" if i % 2 else "F", "fold": 0, "model": model,
                         "split": "test", **base})
    table = pd.DataFrame(rows)
    summary = summarize(table)
    a_all = summary[(summary["model"] == "a") & (summary["cohort"] == "all")].iloc[0]
    assert a_all["n"] == 12 and a_all["dice_mean"] == pytest.approx(table[table["model"] == "a"]["dice"].mean())
    assert a_all["dice_sd"] == pytest.approx(table[table["model"] == "a"]["dice"].std(ddof=1))
    tests = paired_tests(table)
    dice_all = tests[(tests["metric"] == "dice") & (tests["cohort"] == "all")].iloc[0]
    # b beats a on every subject: the exact two-sided signed-rank p for n=12 is 2 / 2**12
    assert dice_all["n_pairs"] == 12 and dice_all["p_value"] == pytest.approx(2 / 2**12)
