"""Figures for reports: metric box plots and tri-planar overlays of ground truth and prediction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torchio as tio  # noqa: E402

from data_modules.scan_io import is_nifti  # noqa: E402

LABELS = {"dice": "DSC", "sensitivity": "Sensitivity", "specificity": "Specificity", "hd": "HD (mm)",
          "hd95": "HD95 (mm)", "assd": "ASSD (mm)", "jaccard": "Jaccard", "precision": "Precision", "rvd": "RVD"}


def save_figure(fig: plt.Figure, title: str, path: str | Path, dpi: int = 110) -> Path:
    """Title, lay out, write and close a figure; returns its path."""
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def box_plots(per_subject: pd.DataFrame, metrics: Sequence[str], path: str | Path) -> Path:
    """One panel per metric, one box per model (points overlaid), split by sex in colour."""
    models = list(dict.fromkeys(per_subject["model"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6))
    for ax, m in zip(np.atleast_1d(axes), metrics):
        data = [per_subject.loc[per_subject["model"] == mod, m].dropna().to_numpy() for mod in models]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(models) + 1), models, rotation=20)
        for i, mod in enumerate(models, start=1):
            part = per_subject[per_subject["model"] == mod]
            jitter = np.linspace(-0.12, 0.12, max(len(part), 1))
            colours = np.where(part["sex"] == "M", "tab:blue", "tab:red")
            ax.scatter(i + jitter[: len(part)], part[m], s=10, c=colours, alpha=0.7, zorder=3)
        ax.set_title(LABELS.get(m, m))
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, "Per-subject metrics (blue: men, red: women)", path)


def _canonical(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A scan's voxels in RAS orientation and its spacing (a DICOM series or NRRD is read by TorchIO)."""
    if not is_nifti(path):
        img = tio.ToCanonical()(tio.ScalarImage(path))
        return img.data[0].numpy(), np.asarray(img.spacing, dtype=float)
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), np.asarray(img.header.get_zooms()[:3], dtype=float)


def femoral_head_center(label: np.ndarray, spacing: np.ndarray) -> tuple[int, int, int]:
    """Voxel near the femoral head's centre (RAS array): centroid of the label's top 35 mm."""
    idx = np.argwhere(label > 0)
    if len(idx) == 0:
        return tuple(int(s // 2) for s in label.shape)
    top = idx[:, 2].max()
    head = idx[idx[:, 2] >= top - 35.0 / spacing[2]]
    return tuple(int(v) for v in np.round(head.mean(0)))


def overlay_png(image: str | Path, label: str | Path, prediction: str | Path, path: str | Path, title: str = "") -> Path:
    """Axial, coronal and sagittal slices through the femoral head; ground truth green, prediction red."""
    img, spacing = _canonical(image)
    gt, _ = _canonical(label)
    pred, _ = _canonical(prediction)
    c = femoral_head_center(gt, spacing)
    views = [
        ("axial", img[:, :, c[2]], gt[:, :, c[2]], pred[:, :, c[2]], spacing[1] / spacing[0]),
        ("coronal", img[:, c[1], :], gt[:, c[1], :], pred[:, c[1], :], spacing[2] / spacing[0]),
        ("sagittal", img[c[0], :, :], gt[c[0], :, :], pred[c[0], :, :], spacing[2] / spacing[1]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for ax, (name, im, g, p, aspect) in zip(axes, views):
        ax.imshow(im.T, cmap="gray", origin="lower", vmin=-200, vmax=1600, aspect=aspect)
        if g.any():
            ax.contour(g.T, levels=[0.5], colors="lime", linewidths=1.2)
        if p.any():
            ax.contour(p.T, levels=[0.5], colors="red", linewidths=1.0, linestyles="--")
        ax.set_title(name)
        ax.axis("off")
    return save_figure(fig, f"{title}\nground truth: green, prediction: red dashed", path, dpi=100)


def paired_differences(per_subject: pd.DataFrame, pairs: Sequence[tuple[str, str]], metrics: Sequence[str],
                       hard: pd.Series | None, path: str | Path) -> Path:
    """Per-subject differences (second model minus first, each subject's mean over the runs that scored it), one row
    of panels per model pair and split, one panel per metric, subjects sorted by the difference; hard cases
    (``hard``: a boolean per row of ``per_subject``) in orange, so a user sees whether a gain sits on them."""
    panels = [(a, b, split) for a, b in pairs for split in dict.fromkeys(per_subject["split"])]
    fig, axes = plt.subplots(len(panels), len(metrics), figsize=(3.4 * len(metrics), 2.8 * len(panels)),
                             squeeze=False)
    flagged = per_subject.assign(hard=False if hard is None else hard.astype(bool))
    for row, (a, b, split) in zip(axes, panels):
        part = flagged[flagged["split"] == split]
        means = {m: part[part["model"] == m].groupby("subject_id")[[*metrics, "hard"]].mean() for m in (a, b)}
        both = means[a].join(means[b], lsuffix="_a", rsuffix="_b", how="inner")
        for ax, metric in zip(row, metrics):
            diff = (both[f"{metric}_b"] - both[f"{metric}_a"]).sort_values()
            colours = np.where(both.loc[diff.index, "hard_a"] > 0, "tab:orange", "tab:grey")
            ax.scatter(np.arange(len(diff)), diff, s=12, c=colours)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_title(f"{split}: {b} − {a}\n{LABELS.get(metric, metric)}", fontsize=9)
            ax.set_xlabel("subjects, sorted")
            ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, "Paired per-subject differences (orange: hard cases)", path)
