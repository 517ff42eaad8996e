"""3D spatial transformer (Jaderberg et al., 2015): regress an affine transform, then warp with it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

IDENTITY = (1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def warp(volume: torch.Tensor, theta: torch.Tensor, size: Sequence[int] | None = None, mode: str = "bilinear") -> torch.Tensor:
    """Resample ``volume`` ``[B, C, D, H, W]`` with affine ``theta`` ``[B, 3, 4]`` (``affine_grid`` convention:
    theta maps output normalised coordinates, ordered (W, H, D), to input ones; ``align_corners=False``)."""
    out_size = (volume.shape[0], volume.shape[1], *(size or volume.shape[2:]))
    grid = F.affine_grid(theta.to(volume.dtype), list(out_size), align_corners=False)
    return F.grid_sample(volume, grid, mode=mode, padding_mode="zeros", align_corners=False)


class AffineSTN(nn.Module):
    """Localisation network regressing a 3D affine (12 parameters), initialised to the identity.

    Strided convolutions shrink the input quickly (the transform is global), global average pooling and
    two linear layers give ``theta``. The last layer starts at zero weight and identity bias, so the
    untrained STN returns its input unchanged.
    """

    def __init__(self, in_channels: int = 3, features: Sequence[int] = (8, 16, 32, 32), hidden: int = 64):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for f in features:
            layers += [nn.Conv3d(channels, f, kernel_size=3, stride=2, padding=1), nn.InstanceNorm3d(f, affine=True), nn.LeakyReLU(0.1)]
            channels = f
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool3d(1), nn.Flatten())
        self.regressor = nn.Sequential(nn.Linear(channels, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, 12))
        nn.init.zeros_(self.regressor[-1].weight)
        with torch.no_grad():
            self.regressor[-1].bias.copy_(torch.tensor(IDENTITY))

    def theta(self, x: torch.Tensor) -> torch.Tensor:
        """Affine parameters ``[B, 3, 4]`` for the localisation input ``x``."""
        return self.regressor(self.features(x)).view(-1, 3, 4)

    def forward(self, x: torch.Tensor, moving: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Warp ``moving`` with the transform regressed from ``x``; returns ``(warped, theta)``."""
        theta = self.theta(x)
        return warp(moving, theta, size=x.shape[2:]), theta
