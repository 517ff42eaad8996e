"""Segmentation losses on logits / probabilities (binary femur masks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice (Milletari's V-Net loss, squared denominator), averaged over the batch.

    ``prob`` and ``target`` are ``[B, 1, ...]``; ``eps`` smooths empty masks (Dice of two empty masks is 1).
    """
    dims = tuple(range(1, prob.ndim))
    inter = (prob * target).sum(dims)
    denom = (prob * prob).sum(dims) + (target * target).sum(dims)
    return (1.0 - (2.0 * inter + eps) / (denom + eps)).mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "dice_bce") -> torch.Tensor:
    """``dice`` (the paper's loss) or ``dice_bce`` (Dice + binary cross-entropy, steadier early training)."""
    loss = soft_dice_loss(torch.sigmoid(logits), target)
    if kind == "dice_bce":
        loss = loss + F.binary_cross_entropy_with_logits(logits, target)
    elif kind != "dice":
        raise ValueError(f"loss must be 'dice' or 'dice_bce', got '{kind}'")
    return loss
