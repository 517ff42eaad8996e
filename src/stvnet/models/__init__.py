"""Segmentation networks as plain ``nn.Module``s (no Lightning)."""

from stvnet.models.st_vnet import STVNet
from stvnet.models.stn import AffineSTN, warp
from stvnet.models.vnet import VNet

__all__ = ["AffineSTN", "STVNet", "VNet", "warp"]
