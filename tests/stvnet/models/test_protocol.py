"""ST-V-Net on any backbone: the STN, shape prior and fusion wrap a V-Net, a MONAI network or a user's own network,
and the stage schedule addresses it by its role (``backbone``), never by the name of an architecture."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from monai.networks.nets import DynUNet
from torch import nn

from data_modules.datamodule import FemurDataModule
from stvnet.lightning_module import FemurSegmenter
from stvnet.models import STVNet
from tests.conftest import ROOT, tiny_data_args, tiny_train_args
from tests.stvnet.callbacks.test_stage_callbacks import Recorder, make_trainer


class TwoConvNet(nn.Module):
    """A user's own segmentation network, unknown to the library: two convolutions to one logit channel."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv3d(1, width, 3, padding=1), nn.InstanceNorm3d(width, affine=True),
                                  nn.LeakyReLU(0.1), nn.Conv3d(width, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _with_prior(net: STVNet, size: int = 16) -> STVNet:
    prior = torch.zeros(1, size, size, size)
    prior[0, 4:12, 4:12, 4:12] = 0.8
    net.set_prior(prior)
    return net


@pytest.mark.parametrize("backbone", [
    TwoConvNet(),
    DynUNet(3, 1, 1, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16],
            res_block=True)], ids=["user", "dynunet"])
def test_an_untrained_wrapper_is_its_backbone_and_declares_it_by_role(backbone):
    model = _with_prior(STVNet(backbone, stn_features=(4, 4)))
    x = torch.randn(2, 1, 16, 16, 16)
    out = model(x)
    assert set(model.parts()) == {"backbone", "stn", "fusion"} and model.parts()["backbone"] is backbone
    assert torch.allclose(out["logits"], backbone(x), atol=1e-5) and torch.equal(out["backbone_logits"], backbone(x))
    assert set(FemurSegmenter(backbone).parts()) == {"backbone"}  # a plain network is one part: the backbone


def test_a_prior_weight_puts_the_prior_into_the_untrained_output():
    backbone = TwoConvNet()
    model = _with_prior(STVNet(backbone, stn_features=(4,), prior_weight=1.0))
    x = torch.randn(1, 1, 16, 16, 16)
    out = model(x)
    p = out["prior"].clamp(1e-3, 1 - 1e-3)
    assert torch.allclose(out["logits"], backbone(x) + torch.log(p / (1 - p)), atol=1e-4)


def test_a_backbone_that_returns_something_else_than_one_logit_channel_is_named():
    two = nn.Conv3d(1, 2, 1)
    with pytest.raises(ValueError, match=r"must return \[batch, 1, \*input size\] logits \(2, 1, 16, 16, 16\), got "
                                         r"\(2, 2, 16, 16, 16\) \(set its out_channels to 1"):
        _with_prior(STVNet(two, stn_features=(4,)))(torch.randn(2, 1, 16, 16, 16))


@pytest.mark.slow
def test_a_users_own_backbone_trains_through_every_stage_without_library_edits(tiny_cohort, tmp_path):
    """Each stage trains exactly its parts of an ST-V-Net around a network the library has never seen."""
    dm = FemurDataModule(**tiny_data_args(tiny_cohort, tmp_path / "splits"))
    rec = Recorder()
    make_trainer(tmp_path, 4, rec).fit(FemurSegmenter(STVNet(TwoConvNet(), stn_features=(4, 8)), lr=0.01), datamodule=dm)
    expected = {0: {"backbone"}, 1: {"stn", "fusion"}, 2: {"stn", "fusion"}, 3: {"backbone", "stn", "fusion"}}
    for epoch, parts in expected.items():
        assert rec.epochs[epoch]["grads"] == parts and rec.epochs[epoch]["changed"] == parts, epoch


@pytest.mark.slow
def test_the_command_line_trains_an_st_wrapper_around_a_backbone_named_in_yaml(tiny_cohort, tmp_path):
    """``stvnet train`` with a YAML that names a user's class as the backbone of experiments/stvnet.yaml: all three
    stages run, and the checkpoint rebuilds the network from its own record."""
    from stvnet.cli import main as cli_main
    from stvnet.inference import Predictor, find_checkpoint

    config = tmp_path / "mine.yaml"
    config.write_text(yaml.safe_dump({"run": {"name": "mine"}, "model": {"net": {
        "class_path": "stvnet.models.STVNet",
        "init_args": {"backbone": {"class_path": "tests.stvnet.models.test_protocol.TwoConvNet", "init_args": {"width": 3}},
                      "stn_features": [4, 8]}}}}))
    args = tiny_train_args(tiny_cohort, tmp_path / "runs", epochs=3, config=ROOT / "experiments" / "stvnet.yaml")
    drop = {i for i, a in enumerate(args) if a.startswith("--model.net")}  # the V-Net's width and depth, with values
    args = [a for i, a in enumerate(args) if i not in drop and i - 1 not in drop]
    assert cli_main(["train", *args, "--config", str(config)]) == 0
    (run,) = list((tmp_path / "runs" / "mine" / "all" / "fold0").iterdir())
    metrics = pd.read_csv(run / "metrics.csv")
    assert sorted(set(metrics["val/stage"].dropna())) == [0, 1, 2]
    predictor = Predictor.from_checkpoint(find_checkpoint(run), device="cpu")
    assert type(predictor.model.net.backbone).__name__ == "TwoConvNet" and predictor.model.net.backbone.body[0].out_channels == 3
