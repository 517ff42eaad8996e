"""ST-V-Net's wiring: equal to its V-Net untrained, the prior in its state dict, handed over once, started from a V-Net."""

from __future__ import annotations

import pytest
import torch

from stvnet.models import STVNet, VNet


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
