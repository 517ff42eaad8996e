"""The V-Net: output shapes for any input size, bad configs, normalisation scope, gradients."""

from __future__ import annotations

import pytest
import torch

from stvnet.models import VNet


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
