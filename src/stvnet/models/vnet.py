"""V-Net (Milletari, Navab & Ahmadi, 2016) as a plain ``nn.Module``.

Residual stages of ``kernel_size``^3 convolutions with PReLU, strided 2x2x2 down-convolutions that double
the channels, transposed 2x2x2 up-convolutions that halve them, and skip connections concatenated into
the decoder. ``depth`` counts the down-sampling steps: the paper's ST-V-Net uses three down- and three
up-sampling layers (Milletari's original used four). Inputs of any size work: they are padded to a
multiple of ``2**depth`` inside and the output is cropped back.

The network returns one logit channel per foreground class (``out_channels=1`` for the femur).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int, norm: str) -> nn.Module:
    """The normalisation layer ``norm`` names (``none``: the identity)."""
    if norm == "batch":
        return nn.BatchNorm3d(channels)
    if norm == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    return nn.Identity()


def _conv_block(channels: int, n_convs: int, kernel_size: int, norm: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers.append(nn.Conv3d(channels, channels, kernel_size, padding=kernel_size // 2, bias=norm == "none"))
        if norm != "none":
            layers.append(_norm(channels, norm))
        if i < n_convs - 1:
            layers.append(nn.PReLU(channels))
    return nn.Sequential(*layers)


class InputStage(nn.Module):
    """First stage: one conv to ``channels``, residual with the input broadcast over channels."""

    def __init__(self, in_channels: int, channels: int, kernel_size: int, norm: str, edge_norm: str = "none"):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, channels, kernel_size, padding=kernel_size // 2)
        self.norm = _norm(channels, edge_norm)
        self.act = nn.PReLU(channels)
        self.repeats = -(-channels // in_channels)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x.repeat(1, self.repeats, 1, 1, 1)[:, : self.channels]
        return self.act(self.norm(self.conv(x)) + skip)


class DownStage(nn.Module):
    """Strided down-convolution (channels x2), then a residual block of ``n_convs`` convolutions."""

    def __init__(self, in_channels: int, n_convs: int, kernel_size: int, norm: str, dropout: float,
                 edge_norm: str = "none"):
        super().__init__()
        out = in_channels * 2
        self.down = nn.Conv3d(in_channels, out, kernel_size=2, stride=2)
        self.down_norm = _norm(out, edge_norm)
        self.down_act = nn.PReLU(out)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.block = _conv_block(out, n_convs, kernel_size, norm)
        self.act = nn.PReLU(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down_act(self.down_norm(self.down(x)))
        return self.act(self.block(self.dropout(down)) + down)


class UpStage(nn.Module):
    """Transposed up-convolution to the skip's width, concatenation with the skip, residual block.

    As in Milletari et al., the stage's output has twice the skip's channels.
    """

    def __init__(self, in_channels: int, skip_channels: int, n_convs: int, kernel_size: int, norm: str, dropout: float,
                 edge_norm: str = "none"):
        super().__init__()
        half = skip_channels
        out = 2 * skip_channels
        self.up = nn.ConvTranspose3d(in_channels, half, kernel_size=2, stride=2)
        self.up_norm = _norm(half, edge_norm)
        self.up_act = nn.PReLU(half)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.block = _conv_block(out, n_convs, kernel_size, norm)
        self.act = nn.PReLU(out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        merged = torch.cat([self.up_act(self.up_norm(self.up(self.dropout(x)))), skip], dim=1)
        return self.act(self.block(merged) + merged)


class VNet(nn.Module):
    """Configurable V-Net returning segmentation logits of the input's spatial size.

    Args:
        in_channels: image channels (1 for CT).
        out_channels: foreground logit channels (1: binary femur mask, read with a sigmoid).
        base_channels: width of the first stage (Milletari: 16); doubled at each down-sampling.
        depth: number of down-/up-sampling steps (paper: 3).
        convs_per_stage: convolutions in each encoder stage below the input stage (Milletari: 2, 3, 3, 3);
            shorter lists are padded with their last value.
        decoder_convs: convolutions in each decoder stage, from the deepest up (default: the encoder's, mirrored).
        kernel_size: convolution kernel (Milletari: 5).
        norm: ``none`` (original), ``batch`` or ``instance`` normalisation inside the residual blocks.
        norm_scope: ``blocks``: normalise inside the residual blocks only; ``all``: after every convolution, the
            input stage's and the down-/up-convolutions' too (as nnU-Net does).
        dropout: channel dropout before the deep stages (0 disables it).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        base_channels: int = 16,
        depth: int = 3,
        convs_per_stage: Sequence[int] = (2, 3, 3),
        decoder_convs: Sequence[int] | None = None,
        kernel_size: int = 5,
        norm: str = "none",
        norm_scope: str = "blocks",
        dropout: float = 0.0,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if norm not in ("none", "batch", "instance"):
            raise ValueError(f"norm must be none, batch or instance, got '{norm}'")
        if norm_scope not in ("blocks", "all"):
            raise ValueError(f"norm_scope must be blocks or all, got '{norm_scope}'")
        edge = norm if norm_scope == "all" else "none"
        convs = list(convs_per_stage) or [2]
        convs = (convs + [convs[-1]] * depth)[:depth]
        up_convs = list(decoder_convs) if decoder_convs else convs[::-1]
        up_convs = (up_convs + [up_convs[-1]] * depth)[:depth]
        self.depth = depth
        self.input_stage = InputStage(in_channels, base_channels, kernel_size, norm, edge)
        self.down = nn.ModuleList()
        channels = [base_channels]
        for i in range(depth):
            self.down.append(DownStage(channels[-1], convs[i], kernel_size, norm, dropout if i >= depth - 2 else 0.0, edge))
            channels.append(channels[-1] * 2)
        self.up = nn.ModuleList()
        current = channels[-1]
        for k, i in enumerate(reversed(range(depth))):
            skip = channels[i]
            stage = UpStage(current, skip, up_convs[k], kernel_size, norm, dropout if i >= depth - 2 else 0.0, edge)
            self.up.append(stage)
            current = 2 * skip
        self.head = nn.Conv3d(current, out_channels, kernel_size=1)

    @property
    def size_multiple(self) -> int:
        """Inputs are padded internally to a multiple of this along each axis."""
        return 2**self.depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ValueError(f"VNet expects a [batch, channel, x, y, z] tensor, got shape {tuple(x.shape)}")
        size = x.shape[2:]
        m = self.size_multiple
        pad = [0, 0] * 3
        for axis, n in enumerate(size):
            extra = (-n) % m
            pad[2 * (2 - axis) + 1] = extra  # F.pad lists the last axis first
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        skips = [self.input_stage(x)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        out = skips.pop()
        for stage in self.up:
            out = stage(out, skips.pop())
        logits = self.head(out)
        return logits[:, :, : size[0], : size[1], : size[2]]
