"""`stvnet evaluate`: masks in the scans' own geometry, per-subject CSV, paper-style summary, figures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import stvnet.evaluation
import stvnet.validation_rows
from stvnet.cli import main as cli_main
from stvnet.evaluation import (
    PAIRED_COLUMNS,
    PAPER_METRICS,
    architecture_pairs,
    effect_sizes,
    evaluate_runs,
    paired_tests,
    summarize,
    summary_markdown,
    training_cohort_pairs,
    write_report,
)
from stvnet.metrics import METRIC_KEYS, evaluate_case
from tests.conftest import ROOT, SpacingRecorder, png_colours


def _colour_count(path, colour, third: int, tol: float = 0.08) -> int:
    """Pixels of one RGB colour in the left, middle or right third of a PNG (one panel of a tri-planar overlay)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(str(path))[..., :3]
    width = rgb.shape[1] // 3
    part = rgb[:, third * width:(third + 1) * width]
    return int((np.abs(part - np.asarray(colour)).max(-1) < tol).sum())


@pytest.mark.not_in_mutation_run
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
    assert list(per_subject.columns) == ["subject_id", "sex", "fold", "seed", "model", "split", "cohort", "image",
                                         "label", "ckpt_epoch", "ckpt_stage", "prediction", *METRIC_KEYS,
                                         "ceiling_dice", "ceiling_hd95", "ceiling_assd",
                                         "joint_space_mm", "osteoporotic", "metal"]  # no index; hard-case columns
    assert all(Path(p).is_file() for p in per_subject["prediction"])  # each row names the mask it scored
    assert set(per_subject["cohort"]) == {"all"}
    # each Dice is the one of the saved mask against the label, in the label's own spacing
    for _, r in per_subject.iterrows():
        mask = np.asarray(nib.load(out / "predictions" / r["model"] / f"fold{r['fold']}" / f"{r['subject_id']}.nii.gz").dataobj)
        label = nib.load(r["label"])
        expected = evaluate_case(mask, np.asarray(label.dataobj) > 0, label.header.get_zooms()[:3])
        assert r["dice"] == pytest.approx(expected["dice"]) and r["hd95"] == pytest.approx(expected["hd95"])
    assert per_subject["dice"].min() > 0.3
    tests = pd.read_csv(out / "paired_tests.csv")
    assert list(tests.columns) == [*PAIRED_COLUMNS, "comparison"]
    assert set(tests["comparison"]) == {"architecture"} and set(tests["model_a"] + tests["model_b"]) == {"vnetvnet_b"}
    assert list(pd.read_csv(out / "summary.csv").columns)[:3] == ["model", "split", "cohort"]  # no index column
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
    # box plots: one 3.2 x 3.6 in panel per paper metric at 110 dpi, men's (blue) and women's (red) points on them
    # (tab:blue and tab:red at alpha 0.7 over white)
    size, counts = png_colours(out / "boxplots.png", {"M": (0.38, 0.63, 0.80), "F": (0.89, 0.41, 0.41)}, tol=0.06)
    assert size == (round(3.2 * 5 * 110), round(3.6 * 110))
    for sex, n in per_subject["sex"].value_counts().items():
        assert counts[sex] > 10 * n, (sex, n, counts)  # every subject's point, in its sex's colour
    for model in ("vnet", "vnet_b"):
        ranked = per_subject[per_subject["model"] == model].sort_values("dice")["subject_id"].tolist()
        for tag, sid in (("worst", ranked[0]), ("median", ranked[len(ranked) // 2]), ("best", ranked[-1])):
            (overlay,) = list(out.glob(f"overlay_{model}_{tag}_sub-*.png"))
            assert overlay.name == f"overlay_{model}_{tag}_{sid}.png"
            # three views at 13 x 4.8 in, 100 dpi, each with the ground truth (lime) and the prediction (red) drawn
            size, counts = png_colours(overlay, {"truth": (0.0, 1.0, 0.0), "prediction": (1.0, 0.0, 0.0)})
            assert size == (1300, 480) and counts["truth"] > 50 and counts["prediction"] > 50, (overlay, counts)
            # every panel (axial, coronal, sagittal thirds) shows both outlines
            thirds = [_colour_count(overlay, c, third) for c in ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0)) for third in range(3)]
            assert min(thirds) > 5, (overlay, thirds)
    with pytest.raises(FileExistsError):
        evaluate_runs([trained_runs["vnet"]], out)
    # --manifest is the table the subjects are read from: one without them is refused
    other = tmp_path / "other.csv"
    pd.read_csv(tiny_cohort).head(2).assign(image=lambda t: [str(tiny_cohort.parent / p) for p in t["image"]],
                                            label=lambda t: [str(tiny_cohort.parent / p) for p in t["label"]]).to_csv(other, index=False)
    with pytest.raises(ValueError, match="are not in this manifest"):
        evaluate_runs([trained_runs["vnet"]], tmp_path / "eval2", manifest=str(other))


def test_evaluate_cli_refuses_existing_folder(trained_runs, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("results")
    assert cli_main(["evaluate", str(trained_runs["vnet"]), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"stvnet evaluate: error: {out} already exists; pass --overwrite to replace it or choose another --out"]
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


def test_paired_tests_compare_like_with_like():
    """V-Net vs ST-V-Net within a training cohort; sex-specific vs pooled only within one architecture."""
    rng = np.random.default_rng(1)
    rows = []
    for model, cohort, shift in (("vnet", "all", 0.0), ("stvnet", "all", 0.01),
                                 ("vnet-female", "female", 0.02), ("stvnet-female", "female", 0.03)):
        for i in range(10):
            sex = "F" if i < 6 else "M"
            if cohort == "female" and sex == "M":
                continue
            metrics = {m: 0.0 for m in METRIC_KEYS}
            metrics.update(dice=0.9 + shift + rng.normal(0, 0.001), hd=5.0 - shift * 10 + rng.normal(0, 0.01))
            rows.append({"subject_id": f"s{i}", "sex": sex, "fold": 0, "model": model, "cohort": cohort,
                         "split": "test", **metrics})
    table = pd.DataFrame(rows)
    assert architecture_pairs(table) == [("vnet", "stvnet"), ("vnet-female", "stvnet-female")]
    assert training_cohort_pairs(table) == [("vnet", "vnet-female"), ("stvnet", "stvnet-female")]
    summary = summarize(table)
    p_columns = {c.split("_p_vs_")[1] for c in summary.columns if "_p_vs_" in c}
    assert p_columns == {"vnet", "vnet-female"}  # never a sex-specific model tested against a pooled one
    assert summary[summary["model"] == "stvnet-female"]["cohort"].tolist() == ["female"]
    stv_f = summary[(summary["model"] == "stvnet-female") & (summary["cohort"] == "female")].iloc[0]
    assert stv_f["dice_p_vs_vnet-female"] == pytest.approx(2 / 2**6)  # better on all 6 women
    cross = paired_tests(table, training_cohort_pairs(table))
    assert set(cross["cohort"]) == {"all", "female"} and (cross["n_pairs"] == 6).all()
    dice = cross[(cross["model_b"] == "stvnet-female") & (cross["metric"] == "dice")]
    assert dice["median_diff"].iloc[0] == pytest.approx(0.02, abs=0.003)
    md = summary_markdown(summary, table)
    assert "## Sex-specific vs pooled training" in md
    assert "| test | stvnet-female vs stvnet | female | 6 | +0.0" in md


def test_evaluate_can_score_largest_component_masks(trained_runs, tmp_path):
    from scipy import ndimage

    raw = evaluate_runs([trained_runs["vnet"]], tmp_path / "raw", figures=False)
    post = evaluate_runs([trained_runs["vnet"]], tmp_path / "lcc", figures=False, keep_largest=True)
    masks = list((tmp_path / "lcc" / "predictions").rglob("*.nii.gz"))
    assert len(masks) == len(post) > 0
    for path in masks:
        _, n = ndimage.label(np.asarray(nib.load(path).dataobj), structure=np.ones((3, 3, 3)))
        assert n <= 1
    # removing voxels never adds true positives
    assert (post["sensitivity"].to_numpy() <= raw["sensitivity"].to_numpy() + 1e-12).all()


def _per_subject_with_a_female_model() -> pd.DataFrame:
    """A pooled V-Net (6 test subjects, 4 women) and a V-Net trained on women (the same 4 women)."""
    rng = np.random.default_rng(3)
    rows = []
    for model, cohort, subjects in (("vnet", "all", ["a", "b", "c", "d", "m1", "m2"]), ("vnet-female", "female", ["a", "b", "c", "d"])):
        for sid in subjects:
            metrics = {m: float(rng.uniform(0.5, 1.0)) for m in METRIC_KEYS}
            rows.append({"subject_id": sid, "sex": "M" if sid.startswith("m") else "F", "fold": 0, "model": model,
                         "split": "test", "cohort": cohort, "ckpt_epoch": 7, "ckpt_stage": "finetune", **metrics})
    return pd.DataFrame(rows)


def test_report_tables_hold_the_summary_and_the_sex_specific_comparison():
    per_subject = _per_subject_with_a_female_model()
    summary = summarize(per_subject)
    md = summary_markdown(summary, per_subject)
    pooled = per_subject[per_subject["model"] == "vnet"]
    women = pooled[pooled["sex"] == "F"]
    # the pooled model's row on women: n and mean ± sd of each paper metric, 4 or 2 decimals
    row = next(line for line in md.splitlines() if line.startswith("| vnet | female | 4 |"))
    assert f"{women['dice'].mean():.4f} ± {women['dice'].std(ddof=1):.4f}" in row
    assert f"{women['hd'].mean():.2f} ± {women['hd'].std(ddof=1):.2f}" in row
    assert next(line for line in md.splitlines() if line.startswith("| vnet | all | 6 |"))
    assert not any(line.startswith("| vnet-female | male") for line in md.splitlines())  # only its own sex
    assert "## Sex-specific vs pooled training" in md.splitlines()
    female = per_subject[per_subject["model"] == "vnet-female"].set_index("subject_id")
    diff = (female["dice"] - women.set_index("subject_id")["dice"]).median()
    (line,) = [line for line in md.splitlines() if line.startswith("| test | vnet-female vs vnet |")]  # women only
    assert line.startswith("| test | vnet-female vs vnet | female | 4 |")
    assert line.split(" | ")[4].startswith(f"{diff:+.3g} (p=")
    assert "## Checkpoints evaluated" in md and "finetune" in md
    assert training_cohort_pairs(per_subject) == [("vnet", "vnet-female")]


def test_the_report_files_hold_the_sex_specific_comparison(tmp_path):
    """write_report: per_subject.csv as given, and paired_tests.csv with the pooled vs female-trained model rows
    labelled 'training cohort', paired on the women both scored."""
    from stvnet.evaluation import write_report

    per_subject = _per_subject_with_a_female_model()
    stvnet = per_subject[per_subject["model"] == "vnet"].assign(model="stvnet")
    stvnet["dice"] += 0.01
    per_subject = pd.concat([per_subject, stvnet], ignore_index=True)
    write_report(per_subject, tmp_path, figures=False)
    assert pd.read_csv(tmp_path / "per_subject.csv").equals(per_subject)
    tests = pd.read_csv(tmp_path / "paired_tests.csv")
    assert list(tests.columns) == [*PAIRED_COLUMNS, "comparison"]  # no index column
    architecture = tests[tests["comparison"] == "architecture"]
    assert set(zip(architecture["model_a"], architecture["model_b"])) == {("vnet", "stvnet")}
    sex_specific = tests[tests["comparison"] == "training cohort"]
    assert set(zip(sex_specific["model_a"], sex_specific["model_b"])) == {("vnet", "vnet-female")}
    women = per_subject[per_subject["sex"] == "F"].pivot(index="subject_id", columns="model", values="dice")
    row = sex_specific[(sex_specific["metric"] == "dice") & (sex_specific["cohort"] == "female")].iloc[0]
    assert row["n_pairs"] == 4 and row["median_diff"] == pytest.approx((women["vnet-female"] - women["vnet"]).median())
    assert not list(tmp_path.glob("*.png"))  # figures=False draws nothing


def test_a_run_is_scored_in_each_labels_own_grid_and_its_masks_saved(tmp_path):
    """score_run on a label stored as X x Y x Z x 1 at 2 x 1 x 3 mm: the mask (the label moved one voxel along z)
    is scored against the label reshaped to 3D, in mm of the label's own spacing, and saved as given (its voxels and
    the predictor's affine), one file per subject; each row names the subject, its scan, label, sex, the run's
    model, fold, training cohort and checkpoint."""
    import nibabel as nib

    from stvnet.evaluation import RunInfo, score_run

    truth = np.zeros((12, 12, 12), np.uint8)
    truth[3:9, 3:9, 3:9] = 1
    affine = np.diag([2.0, 1.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(truth[..., None], affine), str(tmp_path / "label.nii.gz"))
    moved = np.roll(truth, 1, axis=2)
    mask_affine = affine.copy()
    mask_affine[:3, 3] = (5.0, -6.0, 7.0)

    class Predictor:
        threshold = 0.5

        def with_ceiling(self, image, label):  # the label itself went through the preprocessing unharmed
            return moved.astype(np.float32), truth.astype(np.float32), mask_affine

    info = RunInfo(tmp_path / "x.ckpt", "vnet-female", 2, "female", {}, 7, "finetune", {"test": ["s1", "s2"]}, "")
    label = str(tmp_path / "label.nii.gz")
    table = pd.DataFrame({"image": ["a.nii.gz", "b.nii.gz"], "label": [label, label], "sex": ["F", "F"]},
                         index=pd.Index(["s1", "s2"], name="subject_id"))
    rows = score_run(info, table, Predictor(), "test", tmp_path / "masks", keep_largest=False)
    assert [r["subject_id"] for r in rows] == ["s1", "s2"]
    for row, image in zip(rows, ("a.nii.gz", "b.nii.gz")):
        assert row["dice"] == pytest.approx(2 * 5 / 12) and row["hd"] == pytest.approx(3.0)  # one slice of 3 mm
        assert row["ceiling_dice"] == 1.0 and row["ceiling_hd95"] == 0.0 and row["ceiling_assd"] == 0.0
        assert {k: row[k] for k in ("fold", "model", "split", "cohort", "image", "label", "sex", "ckpt_epoch",
                                    "ckpt_stage")} == {
            "fold": 2, "model": "vnet-female", "split": "test", "cohort": "female", "image": image, "label": label,
            "sex": "F", "ckpt_epoch": 7, "ckpt_stage": "finetune"}
        saved = nib.load(str(tmp_path / "masks" / f"{row['subject_id']}.nii.gz"))
        assert np.array_equal(np.asanyarray(saved.dataobj), moved) and np.allclose(saved.affine, mask_affine)


GOLDEN_REPORT = ROOT / "tests" / "golden" / "report.md"


def test_the_report_reads_exactly_as_the_golden_file():
    """The whole Markdown report (headings, explanations, column titles, p-value notes, the checkpoint table) of a
    fixed table with two architectures and a sex-specific model, word for word. After an intended change of the
    report, rewrite the file with ``STVNET_UPDATE_GOLDEN=1 pytest -k golden`` and review its diff."""
    per_subject = _per_subject_with_a_female_model()
    stvnet = per_subject[per_subject["model"] == "vnet"].assign(model="stvnet", ckpt_epoch=9)
    stvnet["dice"] += np.linspace(0.01, 0.06, len(stvnet))
    # male models sharing one subject with the pooled ones: listed as not tested
    males = [part[part["subject_id"] == sid].assign(model=f"{part['model'].iloc[0]}-male", cohort="male")
             for part, sid in ((stvnet, "m1"), (per_subject[per_subject["model"] == "vnet"], "m2"))]
    female = stvnet[stvnet["sex"] == "F"].assign(model="stvnet-female", cohort="female")
    female["dice"] -= np.linspace(0.0, 0.03, len(female))
    # validation rows first: splits and pairs are reported in the order evaluated, not sorted
    val = pd.concat([per_subject[per_subject["model"] == "vnet"], stvnet]).assign(split="val")
    per_subject = pd.concat([val, per_subject, stvnet, *males, female], ignore_index=True)
    # hard cases: a narrow joint in a, c and m1; osteoporotic bone in a, b and d
    per_subject["joint_space_mm"] = per_subject["subject_id"].map({"a": 1.0, "c": 1.2, "m1": 0.8}).fillna(2.5)
    per_subject["osteoporotic"] = per_subject["subject_id"].isin(["a", "b", "d"])
    md = summary_markdown(summarize(per_subject), per_subject)
    if os.environ.get("STVNET_UPDATE_GOLDEN"):
        GOLDEN_REPORT.parent.mkdir(exist_ok=True)
        GOLDEN_REPORT.write_text(md)
    assert md == GOLDEN_REPORT.read_text()


@pytest.mark.mutation_target("score_run")
def test_evaluate_runs_writes_what_its_defaults_promise(tiny_cohort, tmp_path, monkeypatch):
    """evaluate_runs end to end with a stand-in network (the label plus one stray voxel) on a hand-made run folder:
    by default it creates a nested --out, saves the raw masks (stray voxel kept, so DSC < 1), writes summary.csv as
    summarize() gives it and draws figures; keep_largest scores the largest component (DSC 1); save_masks and
    figures off write neither; the device reaches the checkpoint loader; a non-empty --out is refused."""
    import nibabel as nib
    import yaml

    import stvnet.evaluation
    from tests.stvnet.test_inference import write_checkpoint

    manifest = pd.read_csv(tiny_cohort)
    subjects = list(manifest["subject_id"])
    label_of = {Path(i).name: tiny_cohort.parent / lab for i, lab in zip(manifest["image"], manifest["label"])}
    run = tmp_path / "runs" / "vnet" / "all" / "fold0" / "t"
    write_checkpoint(run / "checkpoints" / "last.ckpt", stage=None, fold=0, cohort="all")
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "vnet"}, "seed_everything": 0}))
    (run / "splits.json").write_text(json.dumps({"folds": [{"train": subjects[5:], "val": subjects[4:5]}],
                                                 "test": subjects[:4], "fold": 0, "manifest": str(tiny_cohort)}))
    devices = []

    class StrayVoxelPredictor:
        @classmethod
        def from_checkpoint(cls, path, device="auto"):
            devices.append(device)
            return cls()

        threshold = 0.5

        def with_ceiling(self, image, label_path):
            label = nib.load(label_of[Path(image).name])
            assert Path(label_path) == label_of[Path(image).name]  # the subject's own label, for its ceiling
            truth = np.asanyarray(label.dataobj).astype(np.float32)
            prob = truth.copy()
            prob[0, 0, 0] = 0.9
            perfect = truth.copy()
            perfect[tuple(np.argwhere(truth > 0)[0])] = 0.4  # the round trip loses one femur voxel
            return prob, perfect, label.affine

    monkeypatch.setattr(stvnet.evaluation, "Predictor", StrayVoxelPredictor)
    out = tmp_path / "a" / "b" / "eval"
    table = evaluate_runs([run], out, device="cpu", splits=("test", "val"))
    assert devices == ["cpu"] and list(table["subject_id"]) == subjects[:5]  # the test split, then val
    assert list(table["split"]) == ["test"] * 4 + ["val"]
    assert (table["dice"] < 1.0).all()  # raw masks: the stray voxel is scored
    voxels = np.array([int((np.asanyarray(nib.load(label_of[Path(i).name]).dataobj) > 0).sum()) for i in table["image"]])
    assert np.allclose(table["ceiling_dice"], 2 * (voxels - 1) / (2 * voxels - 1))  # the ceiling: one voxel missed
    assert sorted(p.name for p in (out / "predictions" / "vnet" / "fold0").iterdir()) == sorted(
        f"{s}.nii.gz" for s in subjects[:5])
    written = pd.read_csv(out / "summary.csv")
    expected = summarize(table)
    assert list(written.columns) == list(expected.columns)
    assert np.allclose(written["dice_mean"], expected["dice_mean"]) and list(written["cohort"]) == list(expected["cohort"])
    assert (out / "summary.md").read_text() == summary_markdown(expected, table)
    ceiling = next(line for line in (out / "summary.md").read_text().splitlines() if line.startswith("| test | vnet | all |"))
    cells = [c.strip() for c in ceiling.split("|")]
    test_rows = table[table["split"] == "test"]
    assert float(cells[5]) == pytest.approx(test_rows["dice"].mean(), abs=1e-4)
    assert float(cells[6]) == pytest.approx(test_rows["ceiling_dice"].mean(), abs=1e-4)
    assert float(cells[7]) == pytest.approx(test_rows["ceiling_dice"].mean() - test_rows["dice"].mean(), abs=2e-4)
    assert list(pd.read_csv(out / "paired_tests.csv").columns)[:3] == ["model_a", "model_b", "split"]  # header only
    ranked = table.sort_values("dice")["subject_id"].tolist()  # a model's rows of every split
    worst, median, best = ranked[0], ranked[len(ranked) // 2], ranked[-1]
    assert len(ranked) == 5 and len(set(ranked)) == 5
    assert {p.name for p in out.glob("*.png")} == {"boxplots.png", f"overlay_vnet_worst_{worst}.png",
                                                   f"overlay_vnet_median_{median}.png", f"overlay_vnet_best_{best}.png"}
    largest = evaluate_runs([run], tmp_path / "lcc", keep_largest=True, figures=False)
    assert (largest["dice"] == 1.0).all() and len(largest) == 4
    (tmp_path / "bare").mkdir()
    bare = evaluate_runs([run], tmp_path / "bare", save_masks=False, figures=False)
    assert not (tmp_path / "bare" / "predictions").exists() and not list((tmp_path / "bare").glob("*.png"))
    assert (bare["prediction"] == "").all()  # no mask written, none named
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        evaluate_runs([run], out)
    # a second seed of the same model and fold: its own masks, rows and checkpoint line
    import shutil

    again = run.parent / "t2"
    shutil.copytree(run, again)
    (again / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "vnet"}, "seed_everything": 1}))
    seeded = evaluate_runs([run, again], tmp_path / "seeds", figures=False)
    assert seeded.groupby("seed")["subject_id"].apply(list).to_dict() == {0: subjects[:4], 1: subjects[:4]}
    assert {p.name for p in (tmp_path / "seeds" / "predictions" / "vnet").iterdir()} == {"fold0_seed0", "fold0_seed1"}
    assert "| model | fold | seed | stage | epoch |" in (tmp_path / "seeds" / "summary.md").read_text()


def test_summary_rows_of_a_cohort_without_one_sex_and_of_a_single_subject():
    """A model scored on women only has no male row but still its female row; a cohort of one subject has sd 0."""
    rows = [{"subject_id": f"f{i}", "sex": "F", "fold": 0, "model": "a", "split": "test", "dice": 0.8 + i / 100,
             **{m: 0.5 for m in METRIC_KEYS if m != "dice"}} for i in range(3)]
    rows += [{**r, "model": "b"} for r in rows] + [{**rows[0], "subject_id": "m0", "sex": "M", "model": "b"}]
    summary = summarize(pd.DataFrame(rows)).set_index(["model", "cohort"])
    assert sorted(summary.index) == [("a", "all"), ("a", "female"), ("b", "all"), ("b", "female"), ("b", "male")]
    assert summary.loc[("a", "female"), "n"] == 3 and summary.loc[("b", "male"), "n"] == 1
    assert summary.loc[("b", "male"), "dice_sd"] == 0.0


def test_paired_tests_pair_test_subjects_across_folds_and_validation_subjects_within_a_fold():
    """The held-out test subjects, scored by every fold's model, are paired once each (their mean over folds); a
    validation subject is paired per fold (here v1 was validated in two folds, e.g. runs of two split seeds)."""
    rows = []
    for model, shift in (("a", 0.0), ("b", 0.01)):
        for fold in (0, 1):
            rows += [{"subject_id": f"t{i}", "sex": "F", "fold": fold, "model": model, "split": "test",
                      **{m: 0.8 + shift + i / 100 + fold / 1000 for m in PAPER_METRICS}} for i in range(4)]
            rows += [{"subject_id": sid, "sex": "F", "fold": fold, "model": model, "split": "val",
                      **{m: 0.7 + shift + fold / 1000 for m in PAPER_METRICS}} for sid in (["v1", "v2"], ["v1", "v3"])[fold]]
    tests = paired_tests(pd.DataFrame(rows))
    n_pairs = tests[tests["cohort"] == "all"].groupby("split")["n_pairs"].first()
    assert n_pairs.to_dict() == {"test": 4, "val": 4}  # t0..t3 once; (v1, 0), (v2, 0), (v1, 1), (v3, 1)


@pytest.mark.mutation_target("paired_tests")
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_identical_scores_give_p_1_and_a_constant_difference_is_still_tested():
    """Wilcoxon cannot rank all-zero differences (p = 1 by definition here, without scipy's division warning); a
    difference of exactly 1 mm on every subject is a real, consistent difference (exact p = 2 / 2**8 for 8 pairs)."""
    rows = []
    for model, extra_hd in (("vnet", 0.0), ("stvnet", 1.0)):
        for i in range(8):
            metrics = {m: 0.5 for m in METRIC_KEYS}
            metrics.update(dice=0.9 + 0.01 * i, hd=4.0 + 0.3 * i + extra_hd)
            rows.append({"subject_id": f"s{i}", "sex": "F", "fold": 0, "model": model, "split": "test", **metrics})
    tests = paired_tests(pd.DataFrame(rows)).set_index(["cohort", "metric"])
    assert tests.loc[("all", "dice"), "p_value"] == 1.0 and tests.loc[("all", "dice"), "median_diff"] == 0.0
    assert tests.loc[("all", "hd"), "p_value"] == pytest.approx(2 / 2**8)
    assert tests.loc[("all", "hd"), "median_diff"] == pytest.approx(1.0)


@pytest.mark.mutation_target("effect_sizes")
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_effect_sizes_of_known_paired_differences():
    """Mean difference with its t-interval, d_z and the rank-biserial r on differences worked out by hand; zero
    differences carry no rank (as in the Wilcoxon test)."""
    e = effect_sizes(np.array([1.0, 2.0, 3.0, 4.0]))
    sd = np.std([1, 2, 3, 4], ddof=1)
    assert e["mean_diff"] == 2.5 and e["cohen_dz"] == pytest.approx(2.5 / sd)
    assert e["ci_high"] - e["mean_diff"] == pytest.approx(3.182446 * sd / 2) and e["rank_biserial"] == 1.0
    assert e["ci_low"] == pytest.approx(2.5 - 3.182446 * sd / 2)
    mixed = effect_sizes(np.array([-1.0, 0.0, 2.0, 3.0]))  # ranks 1, 2, 3 for |-1|, 2, 3: (5 - 1) / 6
    assert mixed["rank_biserial"] == pytest.approx(4 / 6) and mixed["mean_diff"] == 1.0
    assert effect_sizes(np.zeros(3)) == {"mean_diff": 0.0, "ci_low": 0.0, "ci_high": 0.0, "cohen_dz": 0.0,
                                         "rank_biserial": 0.0}
    # one pair: no spread to scale by (d_z infinite in the difference's direction) and no interval, without numpy's
    # degrees-of-freedom warning
    single = effect_sizes(np.array([-0.3]))
    assert single["mean_diff"] == -0.3 and single["cohen_dz"] == -np.inf and single["rank_biserial"] == -1.0
    assert np.isnan(single["ci_low"]) and np.isnan(single["ci_high"])


@pytest.mark.mutation_target("write_report", "hard_case_tests")
def test_hard_cases_are_scored_apart_and_compared_within_their_subgroup(tmp_path):
    """Subjects with a narrow joint space or osteoporotic bone (manifest columns) get their own means, each subject
    counted once over the runs that scored it, and the architectures are compared on them alone."""
    from stvnet.hard_cases import hard_case_table

    rows = []
    for i in range(8):
        narrow, porotic = i < 4, i % 2 == 0
        for fold in (0, 1):  # two runs score every test subject: their mean stands for the subject
            for model, hd in (("vnet", 10.0 if narrow else 4.0), ("stvnet", (7.0 if narrow else 4.0) + fold)):
                rows.append({"subject_id": f"s{i}", "sex": "F", "fold": fold, "model": model, "split": "test",
                             "cohort": "all", **dict.fromkeys(METRIC_KEYS, 0.9), "hd": hd, "hd95": hd / 2,
                             "joint_space_mm": 1.0 if narrow else 2.5, "osteoporotic": porotic,
                             "metal": {0: "prosthesis", 2: "screws"}.get(i, "none")})
    per_subject = pd.DataFrame(rows)
    table = hard_case_table(per_subject).set_index(["subgroup", "members", "model"])
    assert table.loc[("metal in the other hip", "in", "vnet"), "subjects"] == 2  # a prosthesis or screws, not "none"
    assert table.loc[("metal in the other hip", "out", "vnet"), "subjects"] == 6
    narrow = table.loc[("narrow joint space (< 1.5 mm)", "in")]
    assert narrow.loc["vnet", "subjects"] == 4 and narrow.loc["vnet", "hd"] == 10.0
    assert narrow.loc["stvnet", "hd"] == 7.5 and table.loc[("narrow joint space (< 1.5 mm)", "out", "stvnet"), "hd"] == 4.5
    assert table.loc[("osteoporotic", "in", "vnet"), "subjects"] == 4
    write_report(per_subject, tmp_path, figures=False)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "hard_cases.csv"), hard_case_table(per_subject),
                                  check_dtype=False)
    written = pd.read_csv(tmp_path / "hard_case_tests.csv")
    assert list(written.columns) == [*PAIRED_COLUMNS, "subgroup"]
    tests = written.set_index(["subgroup", "metric"])
    hd = tests.loc[("narrow joint space (< 1.5 mm)", "hd")]
    assert hd["n_pairs"] == 4 and hd["mean_diff"] == -2.5 and hd["rank_biserial"] == -1.0
    summary = (tmp_path / "summary.md").read_text()
    assert "## Hard cases" in summary
    assert "| narrow joint space (< 1.5 mm) | test | stvnet − vnet | 4 | hd | -2.5 [-2.5, -2.5] | -1.00 | 0.125 |" in summary
    (tmp_path / "figures").mkdir()
    write_report(per_subject, tmp_path / "figures", figures=True)
    # one row of dice / hd / hd95 panels for the one pair and split; the 4 narrow-joint and 2 more osteoporotic
    # subjects in orange (~22 pixels a dot), the other 2 not, in each of the three panels: 18 orange dots, not 24
    size, counts = png_colours(tmp_path / "figures" / "paired_differences.png", {"hard": (1.0, 0.5, 0.05)}, tol=0.05)
    assert size == (round(3.4 * 3 * 110), round(2.8 * 110)) and 16 * 18 < counts["hard"] < 26 * 18, counts
    # a manifest without the columns: no hard-case table or file
    plain = per_subject.drop(columns=["joint_space_mm", "osteoporotic", "metal"])
    assert hard_case_table(plain).empty
    (tmp_path / "plain").mkdir()
    write_report(plain, tmp_path / "plain", figures=False)
    assert not (tmp_path / "plain" / "hard_cases.csv").exists()
    assert "Hard cases" not in (tmp_path / "plain" / "summary.md").read_text()


@pytest.mark.slow
def test_runs_evaluated_in_parallel_score_as_one_at_a_time(trained_runs, tmp_path):
    """--workers: each run scored in a process of its own gives the same table, in the runs' order, and its masks."""
    runs = [trained_runs["vnet"], trained_runs["vnet_b"]]
    serial = evaluate_runs(runs, tmp_path / "serial", figures=False)
    parallel = evaluate_runs(runs, tmp_path / "parallel", figures=False, workers=2)
    assert parallel["model"].tolist() == ["vnet"] * (len(serial) // 2) + ["vnet_b"] * (len(serial) // 2)
    pd.testing.assert_frame_equal(parallel.drop(columns="prediction"), serial.drop(columns="prediction"))
    assert all(Path(p).is_file() and "parallel" in p for p in parallel["prediction"])


@pytest.mark.mutation_target("hard_case_tests", "_checkpoint_markdown")
def test_a_cohort_without_hard_cases_still_gets_the_tables_columns_and_one_seed_no_seed_column():
    """No subgroup columns: hard_case_tests is empty but keeps its schema (callers query and concatenate it). The
    checkpoint table names seeds only when runs differ by seed, and then one row per fold and seed."""
    from stvnet.evaluation import _checkpoint_markdown, hard_case_tests

    rows = [{"subject_id": f"s{i}", "sex": "F", "fold": fold, "seed": seed, "model": model, "split": "test",
             "cohort": "all", "ckpt_epoch": 3 + seed, "ckpt_stage": "finetune", **dict.fromkeys(METRIC_KEYS, 0.9)}
            for i in range(3) for fold in (1, 0) for seed in (0, 1) for model in ("vnet", "stvnet")]
    per_subject = pd.DataFrame(rows)
    empty = hard_case_tests(per_subject)
    assert empty.empty and list(empty.columns) == [*PAIRED_COLUMNS, "subgroup"]
    one_seed = _checkpoint_markdown(per_subject[per_subject["seed"] == 1])
    assert one_seed[4:6] == ["| model | fold | stage | epoch |", "|---|---|---|---|"]
    assert one_seed[6:8] == ["| vnet | 1 | finetune | 4 |", "| stvnet | 1 | finetune | 4 |"]
    two_seeds = _checkpoint_markdown(per_subject)
    assert two_seeds[4:6] == ["| model | fold | seed | stage | epoch |", "|---|---|---|---|---|"]
    assert two_seeds[6:10] == ["| vnet | 1 | 0 | finetune | 3 |", "| stvnet | 1 | 0 | finetune | 3 |",
                               "| vnet | 1 | 1 | finetune | 4 |", "| stvnet | 1 | 1 | finetune | 4 |"]


@pytest.mark.slow
def test_evaluation_scores_in_each_labels_own_spacing(trained_runs, tiny_cohort, tmp_path, monkeypatch):
    recorder = SpacingRecorder(evaluate_case)
    monkeypatch.setattr(stvnet.evaluation, "evaluate_case", recorder)
    table = stvnet.evaluation.evaluate_runs([trained_runs["vnet"]], tmp_path / "eval", save_masks=False, figures=False)
    zooms = [tuple(float(z) for z in nib.load(label).header.get_zooms()[:3]) for label in table["label"]]
    assert recorder.spacings == zooms and len(set(zooms[0])) > 1  # anisotropic, passed in array-axis order
