"""The femur shape prior: a probabilistic atlas built from the training labels of the current fold."""

from __future__ import annotations

from collections.abc import Sequence

import torch

ALIGNMENTS = ("roi", "com")


def _center_of_mass(mask: torch.Tensor) -> torch.Tensor:
    grids = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in mask.shape), indexing="ij")
    total = mask.sum().clamp_min(1e-8)
    return torch.stack([(g * mask).sum() / total for g in grids])


def build_shape_prior(labels: Sequence[torch.Tensor], alignment: str = "roi") -> torch.Tensor:
    """Mean of binary label volumes (each ``[D, H, W]`` in the ROI frame) -> prior ``[1, D, H, W]`` in [0, 1].

    ``alignment='roi'`` averages the labels as they lie in the ROI (the fixed crop is the alignment);
    ``'com'`` first shifts each label (by whole voxels) so its centre of mass sits at the mean centre of mass,
    giving a sharper atlas that the spatial transformer then has to move onto each subject.
    """
    if not labels:
        raise ValueError("a shape prior needs at least one training label")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"alignment must be one of {ALIGNMENTS}, got '{alignment}'")
    shape = labels[0].shape
    stack = torch.stack([(lbl.reshape(shape) > 0).double() for lbl in labels])
    if alignment == "com":
        coms = torch.stack([_center_of_mass(m) for m in stack])
        target = coms.mean(0)
        shifted = []
        for mask, com in zip(stack, coms):
            shift = [int(v) for v in torch.round(target - com).tolist()]
            moved = torch.roll(mask, shifts=shift, dims=(0, 1, 2))
            # zero what wrapped around the border
            for axis, s in enumerate(shift):
                index = [slice(None)] * 3
                if s > 0:
                    index[axis] = slice(0, s)
                elif s < 0:
                    index[axis] = slice(s, None)
                if s:
                    moved[tuple(index)] = 0
            shifted.append(moved)
        stack = torch.stack(shifted)
    return stack.mean(0, keepdim=True).float()
