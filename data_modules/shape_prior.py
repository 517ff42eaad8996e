"""The femur shape prior: a probabilistic atlas built from the training labels of the current fold."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

ALIGNMENTS = ("roi", "com")


def build_shape_prior(labels: Sequence[torch.Tensor], alignment: str = "roi") -> torch.Tensor:
    """Mean of label volumes (each ``[D, H, W]`` in the ROI frame: binary, or soft, each voxel holding its femur
    fraction, as ``label_interpolation: linear`` gives) -> prior ``[1, D, H, W]`` in [0, 1]. Soft labels are averaged
    as they are: binarised at > 0, a voxel with any femur in it would count whole and dilate the prior.

    ``alignment='roi'`` averages the labels as they lie in the ROI (the fixed crop is the alignment);
    ``'com'`` first shifts each label (by whole voxels) so its centre of mass sits at the mean centre of mass,
    giving a sharper atlas that the spatial transformer then has to move onto each subject.
    """
    if not labels:
        raise ValueError("a shape prior needs at least one training label")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got '{alignment}'")
    shape = labels[0].shape
    stack = torch.stack([lbl.reshape(shape).double().clamp(0.0, 1.0) for lbl in labels])
    if alignment == "com":
        masks = stack.numpy()
        coms = np.array([ndimage.center_of_mass(m) for m in masks])
        shifts = np.round(coms.mean(0) - coms)  # whole voxels: the label values are kept; what leaves the box is lost
        stack = torch.from_numpy(np.stack([ndimage.shift(m, s, order=0, mode="constant", cval=0.0)
                                           for m, s in zip(masks, shifts)]))
    return stack.mean(0, keepdim=True).float()
