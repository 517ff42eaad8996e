"""The spatial transformer: its identity start and its warp."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stvnet.models import warp
from stvnet.models.stn import AffineSTN


def test_stn_starts_as_identity():
    stn = AffineSTN(in_channels=2)
    x = torch.randn(2, 2, 20, 24, 16)
    moving = torch.rand(2, 1, 20, 24, 16)
    warped, theta = stn(x, moving)
    assert torch.allclose(theta, torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]).expand(2, 3, 4))
    assert torch.allclose(warped, moving, atol=1e-5)


def test_warp_translation_moves_by_whole_voxels():
    vol = torch.zeros(1, 1, 16, 16, 16)
    vol[0, 0, 6:10, 5:9, 4:8] = 1.0
    theta = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]])
    # affine_grid's x is the last (W) axis; 2 voxels of 16 is 2 * 2/16 in normalised units
    theta[0, 0, 3] = -2 * 2 / 16
    moved = warp(vol, theta)
    assert torch.allclose(moved, torch.roll(vol, shifts=2, dims=4), atol=1e-5)


def test_known_affine_is_recovered_by_optimising_the_warp():
    torch.manual_seed(0)
    grid = torch.linspace(-1, 1, 24)
    z, y, x = torch.meshgrid(grid, grid, grid, indexing="ij")
    # an asymmetric object (three blobs of different sizes), so the affine is identifiable
    blob = sum(
        torch.exp(-(((x - cx) / s) ** 2 + ((y - cy) / s) ** 2 + ((z - cz) / s) ** 2))
        for cx, cy, cz, s in ((0.0, 0.0, 0.0, 0.35), (0.45, -0.3, 0.2, 0.2), (-0.3, 0.4, -0.35, 0.15))
    )[None, None]
    true = torch.tensor([[[1.05, 0.08, 0.0, 0.10], [-0.05, 0.95, 0.0, -0.08], [0.0, 0.04, 1.0, 0.06]]])
    fixed = warp(blob, true)
    theta = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]], requires_grad=True)
    opt = torch.optim.Adam([theta], lr=0.01)
    for _ in range(400):
        opt.zero_grad()
        loss = F.mse_loss(warp(blob, theta), fixed)
        loss.backward()
        opt.step()
    assert (theta.detach() - true).abs().max() < 0.02
