"""V-Net shapes, the spatial transformer's identity start and warp, and ST-V-Net's wiring."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stvnet.models import STVNet, VNet, warp
from stvnet.models.stn import AffineSTN


@pytest.mark.parametrize("size", [(32, 32, 32), (37, 50, 23), (9, 17, 8)])
@pytest.mark.parametrize("depth", [2, 3])
def test_vnet_output_matches_any_input_size(size, depth):
    net = VNet(base_channels=4, depth=depth, kernel_size=3)
    out = net(torch.randn(2, 1, *size))
    assert out.shape == (2, 1, *size)


def test_vnet_rejects_bad_config_and_input():
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        VNet(kernel_size=4)
    with pytest.raises(ValueError, match="expects a \\[batch, channel"):
        VNet(base_channels=4)(torch.randn(1, 16, 16, 16))


def test_norm_scope_all_normalises_after_every_convolution_and_keeps_checkpoint_keys():
    """``norm_scope: all`` puts a norm after the input stage's and every down-/up-convolution (as nnU-Net does);
    ``blocks`` keeps today's layers, so checkpoints written before the option still load."""
    blocks = VNet(base_channels=4, depth=2, kernel_size=3, norm="instance")
    every = VNet(base_channels=4, depth=2, kernel_size=3, norm="instance", norm_scope="all")
    count = lambda net: sum(isinstance(m, torch.nn.InstanceNorm3d) for m in net.modules())  # noqa: E731
    assert count(every) - count(blocks) == 1 + 2 * 2  # input stage, two down- and two up-convolutions
    assert set(every.state_dict()) > set(blocks.state_dict())
    assert every(torch.randn(1, 1, 12, 12, 12)).shape == (1, 1, 12, 12, 12)
    assert not any(k.startswith("input_stage.norm") or "_norm." in k for k in blocks.state_dict())
    with pytest.raises(ValueError, match="norm_scope must be blocks or all"):
        VNet(norm_scope="everywhere")


def test_vnet_gradients_reach_first_layer():
    net = VNet(base_channels=4, depth=3, kernel_size=3)
    net(torch.randn(1, 1, 16, 16, 16)).sum().backward()
    assert net.input_stage.conv.weight.grad.abs().sum() > 0


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


def test_st_vnet_without_training_equals_its_vnet():
    vnet = VNet(base_channels=4, depth=2, kernel_size=3)
    model = STVNet(vnet, stn_features=(4, 4))
    prior = torch.zeros(1, 16, 16, 16)
    prior[0, 4:12, 4:12, 4:12] = 0.8
    model.set_prior(prior)
    x = torch.randn(2, 1, 16, 16, 16)
    out = model(x)
    assert set(out) == {"logits", "backbone_logits", "prior", "theta"}
    assert torch.allclose(out["logits"], vnet(x), atol=1e-6)
    assert torch.allclose(out["prior"], prior.expand(2, 1, 16, 16, 16), atol=1e-5)


def test_st_vnet_prior_travels_with_the_state_dict():
    model = STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4,))
    model.set_prior(torch.rand(1, 8, 8, 8))
    fresh = STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4,))
    assert not fresh.has_prior
    fresh.load_state_dict(model.state_dict())
    assert fresh.has_prior and torch.equal(fresh.prior, model.prior)
    with pytest.raises(ValueError, match="differs from the shape prior"):
        fresh(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(RuntimeError, match="no shape prior"):
        STVNet(VNet(base_channels=4, depth=2))(torch.randn(1, 1, 8, 8, 8))


def test_the_prior_is_handed_over_once_from_the_data():
    """The prior is data: built by whatever has shape_prior() (the datamodule), set once, never rebuilt."""
    from stvnet.prior_handover import hand_over_prior

    class Data:
        calls: list[str] = []

        def shape_prior(self, alignment: str = "roi") -> torch.Tensor:
            self.calls.append(alignment)
            return torch.full((1, 8, 8, 8), 0.25)

    net = STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4,))
    data = Data()
    assert hand_over_prior(net, data, "com") and data.calls == ["com"]
    assert torch.equal(net.prior, torch.full((1, 1, 8, 8, 8), 0.25))
    assert not hand_over_prior(net, data, "roi") and data.calls == ["com"]  # it has one: not rebuilt
    assert not hand_over_prior(VNet(base_channels=4, depth=2), None, "roi")  # a V-Net needs none
    with pytest.raises(RuntimeError, match="needs a datamodule with shape_prior"):
        hand_over_prior(STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4,)), None, "roi")


def test_a_trained_vnet_starts_an_st_vnet_and_a_different_one_is_refused(tmp_path):
    from stvnet.init_weights import load_backbone_weights

    source = VNet(base_channels=4, depth=2, kernel_size=3)
    torch.save({"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()},
                "FemurDataModule": {"fold": 1}}, tmp_path / "vnet.ckpt")
    target = STVNet(VNet(base_channels=4, depth=2, kernel_size=3), stn_features=(4,))
    n, record = load_backbone_weights(target, tmp_path / "vnet.ckpt")
    assert n == len(source.state_dict()) and record == {"fold": 1}
    assert all(torch.equal(target.backbone.state_dict()[k], v) for k, v in source.state_dict().items())
    with pytest.raises(ValueError, match="no weights match this network"):
        load_backbone_weights(STVNet(VNet(base_channels=8, depth=2, kernel_size=3), stn_features=(4,)), tmp_path / "vnet.ckpt")
