"""How a synthetic cohort compares with real hip QCT (``stvnet synth --report``): each tissue's HU statistics per
subject against published ranges, pooled histograms, the HU profile from the femoral head through the joint space
into the acetabular roof, and coronal and axial views.

Tissue masks come from the generator's own distance fields, re-evaluated on each scan's grid from the cohort's
``parameters.csv``, so every statistic is measured on the voxels of exactly that tissue (the femur's cortex and its
trabecular core 1.5 mm plus half a voxel diagonal away from the cortex, so that partial volume does not mix them).

Published ranges (the statistic a subject's tissue must fall in):

* trabecular bone of the proximal femur, median 50-350 HU: volumetric BMD by QCT of the femoral neck and
  trochanter in adults 20-90 years (Riggs BL et al., J Bone Miner Res 2004;19:1945-1954) and the ISCD positions on
  hip QCT (Engelke K et al., J Clin Densitom 2008;11:123-162), converted with ~1 HU per mg/cm³ hydroxyapatite;
* cortical bone of the proximal femur, 99th percentile 300-1500 HU: cortical density at clinical resolution is
  blurred by the slice profile, so thin shells peak far below the ~2000 HU of compact bone (Treece GM et al., Med
  Image Anal 2010;14:276-290);
* skeletal muscle, median 0-70 HU: normal-density muscle 31-100 HU, lipid-rich muscle of the elderly 0-30 HU
  (Goodpaster BH et al., J Appl Physiol 2000;89:104-110);
* subcutaneous fat, median -190 to -30 HU (Yoshizumi T et al., Radiology 1999;211:283-286);
* urine in the bladder, median -9 to 20 HU: simple fluid on unenhanced CT (Silverman SG et al., Radiology
  2019;292:475-488, the Bosniak classification's definition);
* trabecular bone of the sacrum and L5, median 30-250 HU: volumetric BMD by spinal QCT of adults, < 80 mg/cm3
  osteoporotic and > 120 normal (ACR-SPR-SSR practice parameter for QCT, 2018), young adults up to ~250.

The report also sets each statistic beside one real pelvic CT (3 mm, TotalSegmentator labels) measured for the
project's issue 16: femur median 168 HU (p95 419, p99 629), pelvis median 188 HU, muscle median 22 HU (p5-p95
-27...69), femoral-head surface peak 273 HU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torchio as tio  # noqa: E402
from scipy import ndimage  # noqa: E402

from data_modules.synthetic.cohort import read_parameters  # noqa: E402
from data_modules.synthetic.anatomy import SubjectParams, anatomy, head_centre, to_world  # noqa: E402


@dataclass(frozen=True)
class Range:
    """A published range of one statistic of one tissue's HU."""

    statistic: str
    low: float
    high: float
    source: str


PUBLISHED: dict[str, Range] = {
    "trabecular": Range("median", 50.0, 350.0, "Riggs 2004; Engelke 2008"),
    "cortical": Range("p99", 300.0, 1500.0, "Treece 2010"),
    "muscle": Range("median", 0.0, 70.0, "Goodpaster 2000"),
    "fat": Range("median", -190.0, -30.0, "Yoshizumi 1999"),
    "bladder": Range("median", -9.0, 20.0, "Silverman 2019"),
    "vertebra": Range("median", 30.0, 250.0, "ACR-SPR-SSR 2018"),
}
#: one real pelvic CT at 3 mm (issue 16), for comparison (the cohort is measured resampled to the same voxel size)
REAL_CT_MM = 3.0
REAL_CT = {"femur": {"median": 168.0, "p95": 419.0, "p99": 629.0}, "pelvis": {"median": 188.0},
           "muscle": {"median": 22.0, "p5": -27.0, "p95": 69.0}, "head surface peak": {"peak": 273.0}}
TISSUES = ("femur", "cortical", "trabecular", "pelvis", "muscle", "fat", "bladder", "vertebra")
STATISTICS = ("median", "p5", "p95", "p99")
_PERCENTILE = {"median": 50, "p5": 5, "p95": 95, "p99": 99}
#: the joint-space profile: distances from the femoral head's centre, along the subject's superior axis (mm)
PROFILE_MM = np.arange(0.0, 45.0, 0.5)
#: at most this many voxels of a tissue per subject go into the pooled histograms
HISTOGRAM_SAMPLE = 20000


def tissue_masks(prm: SubjectParams, affine: np.ndarray, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Boolean masks of each tissue on a scan's grid (an axis-aligned LPS grid, as the generator writes)."""
    spacing = tuple(abs(float(affine[i, i])) for i in range(3))
    sdfs, _ = anatomy(prm, spacing, origin=tuple(float(v) for v in affine[:3, 3]), shape=shape)
    femur = sdfs["label"] < 0.0
    bones = np.minimum(np.minimum(sdfs["left"], sdfs["right"]), np.minimum(sdfs["pelvis"], sdfs["spine"]))
    if "metal" in sdfs:
        bones = np.minimum(bones, sdfs["metal"])
    viscera = np.minimum(np.minimum(sdfs["bladder"], sdfs["gas"]), sdfs["vessels"] - 5.0)  # vessels with their sheath
    soft = (bones > 3.0) & (viscera > 3.0)
    margin = 1.5 + 0.5 * float(np.linalg.norm(spacing))  # past the partial volume of the voxels holding the cortex
    return {
        "femur": femur,
        "cortical": femur & (sdfs["left"] > -sdfs["left_cortex"]),
        "trabecular": femur & (sdfs["left"] < -(sdfs["left_cortex"] + margin)) & (sdfs["left_canal"] > margin),
        "pelvis": sdfs["pelvis"] < 0.0,
        "muscle": (sdfs["skin"] < 0.84) & soft,
        "fat": (sdfs["skin"] > 0.88) & (sdfs["skin"] < 0.98) & soft,
        "bladder": (sdfs["bladder"] < -margin) & (bones > 3.0),
        "vertebra": sdfs["spine"] < -(1.0 + margin),
    }


def joint_space_profile(image: np.ndarray, affine: np.ndarray, prm: SubjectParams) -> np.ndarray:
    """HU along :data:`PROFILE_MM` from the left femoral head's centre towards the subject's superior: through the
    head, its surface, the joint space and the acetabular roof (linear interpolation)."""
    centre = head_centre(prm, side=-1.0)
    points = to_world(prm, np.outer(PROFILE_MM, [0.0, 0.0, 1.0]) + centre)
    voxels = (np.linalg.inv(affine) @ np.c_[points, np.ones(len(points))].T)[:3]
    return ndimage.map_coordinates(image.astype(np.float32), voxels, order=1, mode="nearest")


def measure_subject(image: np.ndarray, affine: np.ndarray, prm: SubjectParams,
                    rng: np.random.Generator) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """One subject: a row of statistics per tissue (and the head-surface peak), a sample of each tissue's voxels for
    the histograms, and the joint-space profile."""
    masks = tissue_masks(prm, affine, image.shape)
    row: dict = {"subject_id": prm.subject_id, "sex": prm.sex}
    samples = {}
    for tissue, mask in masks.items():
        values = image[mask].astype(np.float32)
        for stat in STATISTICS:
            row[f"{tissue} {stat}"] = float(np.percentile(values, _PERCENTILE[stat])) if values.size else float("nan")
        samples[tissue] = rng.choice(values, min(values.size, HISTOGRAM_SAMPLE), replace=False)
    profile = joint_space_profile(image, affine, prm)
    surface = np.abs(PROFILE_MM - prm.head_radius) <= 3.0
    row["head surface peak"] = float(profile[surface].max())
    # the real CT's resolution, for the side-by-side table
    coarse, coarse_affine = resampled(image, affine, REAL_CT_MM)
    coarse_masks = tissue_masks(prm, coarse_affine, coarse.shape)
    for tissue, stats in REAL_CT.items():
        if tissue in coarse_masks:
            values = coarse[coarse_masks[tissue]]
            for stat in stats:
                row[f"{tissue} {stat} at {REAL_CT_MM:g} mm"] = float(np.percentile(values, _PERCENTILE[stat]))
    row[f"head surface peak at {REAL_CT_MM:g} mm"] = float(joint_space_profile(coarse, coarse_affine, prm)[surface].max())
    return row, samples, profile


def resampled(image: np.ndarray, affine: np.ndarray, mm: float) -> tuple[np.ndarray, np.ndarray]:
    """A scan resampled to ``mm`` isotropic voxels, averaging what each new voxel covers (antialiased), and its
    affine."""
    scan = tio.ScalarImage(tensor=torch.from_numpy(image.astype(np.float32))[None], affine=affine)
    out = tio.Resample(mm, antialias=True)(scan)
    return out.data[0].numpy(), out.affine


def in_range(table: pd.DataFrame) -> pd.DataFrame:
    """Per published range: the cohort's median of the statistic, its lowest and highest subject and the fraction of
    subjects inside the range (of those with the tissue in view: the spine or bladder may lie outside a scan)."""
    rows = []
    for tissue, r in PUBLISHED.items():
        values = table[f"{tissue} {r.statistic}"]
        rows.append({"tissue": tissue, "statistic": r.statistic, "published": f"{r.low:g} to {r.high:g} HU",
                     "source": r.source, "median": values.median(), "lowest": values.min(), "highest": values.max(),
                     "inside": ((values >= r.low) & (values <= r.high))[values.notna()].mean()})
    return pd.DataFrame(rows)


def measure_cohort(manifest: str | Path, subjects: int | None = None,
                   seed: int = 0) -> tuple[pd.DataFrame, dict[str, np.ndarray], np.ndarray]:
    """The first ``subjects`` scans of a synthetic cohort (all by default): the per-subject table, pooled voxel
    samples per tissue, and the joint-space profiles (subjects x distances)."""
    manifest = Path(manifest)
    params = {p.subject_id: p for p in read_parameters(manifest.parent / "parameters.csv")}
    table = pd.read_csv(manifest, dtype={"subject_id": str})
    rng = np.random.default_rng(seed)
    rows, pooled, profiles = [], {t: [] for t in TISSUES}, []
    for record in table.head(subjects).itertuples():
        img = nib.load(str(manifest.parent / record.image))
        image = np.asarray(img.dataobj)
        row, samples, profile = measure_subject(image, img.affine, params[record.subject_id], rng)
        rows.append(row)
        profiles.append(profile)
        for tissue, values in samples.items():
            pooled[tissue].append(values)
    return (pd.DataFrame(rows), {t: np.concatenate(v) for t, v in pooled.items()}, np.stack(profiles))


def _save_figure(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_histograms(pooled: dict[str, np.ndarray], path: Path) -> Path:
    """One panel per tissue: the pooled HU histogram, the published range shaded and the real CT's median marked."""
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for ax, tissue in zip(axes.flat, TISSUES):
        ax.hist(pooled[tissue], bins=80, color="#4878a8", density=True)
        if tissue in PUBLISHED:
            r = PUBLISHED[tissue]
            ax.axvspan(r.low, r.high, color="#2ca02c", alpha=0.15, label=f"published {r.statistic} ({r.source})")
        if tissue in REAL_CT:
            ax.axvline(REAL_CT[tissue]["median"], color="#d62728", label="real CT median (3 mm)")
        ax.axvline(float(np.median(pooled[tissue])), color="black", linestyle="--", label="this cohort's median")
        ax.set_title(tissue)
        ax.set_xlabel("HU")
        ax.legend(fontsize=7)
    return _save_figure(fig, path)


def plot_profile(profiles: np.ndarray, head_radii: np.ndarray, path: Path) -> Path:
    """Mean and spread of the joint-space profiles, the head surfaces marked, the real CT's head-surface peak drawn."""
    fig, ax = plt.subplots(figsize=(7, 4))
    mean, sd = profiles.mean(0), profiles.std(0)
    ax.plot(PROFILE_MM, mean, color="#4878a8", label="cohort mean")
    ax.fill_between(PROFILE_MM, mean - sd, mean + sd, color="#4878a8", alpha=0.25, label="± sd")
    ax.axvspan(head_radii.min(), head_radii.max(), color="grey", alpha=0.2, label="head surface (radii)")
    ax.axhline(REAL_CT["head surface peak"]["peak"], color="#d62728", linestyle=":", label="real CT head-surface peak")
    ax.set_xlabel("distance from the femoral head's centre, superior (mm)")
    ax.set_ylabel("HU")
    ax.legend(fontsize=8)
    return _save_figure(fig, path)


def plot_views(manifest: Path, prm: SubjectParams, path: Path) -> Path:
    """Coronal and axial slices through one subject's left femoral head (window -200..1500 HU), label outlined."""
    table = pd.read_csv(manifest, dtype={"subject_id": str}).set_index("subject_id")
    img = nib.load(str(manifest.parent / table.loc[prm.subject_id, "image"]))
    image = np.asarray(img.dataobj).astype(np.float32)
    label = np.asarray(nib.load(str(manifest.parent / table.loc[prm.subject_id, "label"])).dataobj)
    centre = np.linalg.inv(img.affine) @ np.r_[to_world(prm, head_centre(prm, side=-1.0)[None])[0], 1.0]
    i, j, k = (int(round(float(np.clip(c, 0, n - 1)))) for c, n in zip(centre[:3], image.shape))
    spacing = [abs(float(img.affine[a, a])) for a in range(3)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    # rows bottom to top: superior up in the coronal view, anterior up in the axial one (LPS: j runs posterior)
    for ax, (name, pixels, mask, aspect) in zip(axes, (
            ("coronal", image[:, j, :].T, label[:, j, :].T, spacing[2] / spacing[0]),
            ("axial", image[:, ::-1, k].T, label[:, ::-1, k].T, spacing[1] / spacing[0]))):
        ax.imshow(pixels, cmap="gray", vmin=-200, vmax=1500, origin="lower", aspect=aspect)
        ax.contour(mask, levels=[0.5], colors="#d62728", linewidths=0.8)
        ax.set_title(f"{prm.subject_id} {name} through the left femoral head")
        ax.axis("off")
    return _save_figure(fig, path)


def write_report(manifest: str | Path, out: str | Path, subjects: int | None = None) -> Path:
    """Measure the cohort and write ``realism.md``, ``per_subject.csv``, ``histograms.png``, ``joint_space.png`` and
    ``views.png`` into ``out``; returns the Markdown report's path."""
    manifest, out = Path(manifest), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table, pooled, profiles = measure_cohort(manifest, subjects)
    table.to_csv(out / "per_subject.csv", index=False)
    params = {p.subject_id: p for p in read_parameters(manifest.parent / "parameters.csv")}
    radii = np.array([params[s].head_radius for s in table["subject_id"]])
    plot_histograms(pooled, out / "histograms.png")
    plot_profile(profiles, radii, out / "joint_space.png")
    plot_views(manifest, params[table["subject_id"].iloc[0]], out / "views.png")
    checks = in_range(table)
    lines = [f"# Realism of {manifest} ({len(table)} subjects)", "",
             "Each tissue's statistic per subject against its published range (sources in data_modules/synthetic/realism.py).",
             "", "| tissue | statistic | published | source | cohort median | cohort min-max | subjects inside |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.tissue} | {r.statistic} | {r.published} | {r.source} | {r.median:.0f} | {r.lowest:.0f} to "
              f"{r.highest:.0f} | {r.inside:.0%} |" for r in checks.itertuples()]
    lines += ["", f"Beside one real pelvic CT at {REAL_CT_MM:g} mm (issue 16), the cohort resampled to {REAL_CT_MM:g} mm "
              "voxels (antialiased) and at its own voxel size:", "",
              f"| statistic | this cohort at {REAL_CT_MM:g} mm (median over subjects) | at its own voxel size | real CT |",
              "|---|---|---|---|"]
    for tissue, stats in REAL_CT.items():
        for stat, value in stats.items():
            column = tissue if stat == "peak" else f"{tissue} {stat}"
            lines.append(f"| {column} | {table[f'{column} at {REAL_CT_MM:g} mm'].median():.0f} | "
                         f"{table[column].median():.0f} | {value:.0f} |")
    lines += ["", "![histograms](histograms.png)", "", "![joint space](joint_space.png)", "", "![views](views.png)", ""]
    report = out / "realism.md"
    report.write_text("\n".join(lines))
    return report
