"""ST-V-Net: a V-Net whose output is constrained by a femur shape prior aligned by a spatial transformer.

The paper (Zhao et al., 2021) adds a 3D STN carrying a shape prior of the proximal femur to a V-Net and
trains the whole in stages, but does not publish the exact wiring. This reimplementation chooses:

* **prior**: the mean femur mask of the current fold's training labels in the ROI frame (a buffer, saved in
  checkpoints, so a checkpoint alone predicts);
* **STN input**: the image, the V-Net's probabilities and the prior (``stn_inputs`` selects);
* **warp**: the STN regresses a 12-parameter affine (identity at start) that moves the prior onto the subject;
* **fusion** (``fusion='logit'``): final logit = a * V-Net logit + b * logit(warped prior) + c, a 1x1x1
  convolution initialised to (1, 0, 0) so an untrained fusion reproduces the V-Net exactly. A Bayesian
  reading: the warped prior acts as a spatial prior on the V-Net's evidence, suppressing bone far from the
  expected femur (pelvis, other side). ``fusion='none'`` keeps the V-Net output and uses the prior only in
  the loss (a pure training-time constraint);
* **losses** (chosen per stage in the config): Dice on the fused output, on the V-Net branch, and between
  the warped prior and the ground truth (which is what teaches the STN to align).

The inner ``vnet`` is the baseline's :class:`~stvnet.models.vnet.VNet`, so weights move between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stvnet.models.stn import AffineSTN
from stvnet.models.vnet import VNet

STN_INPUTS = ("image", "vnet", "prior")


class STVNet(nn.Module):
    """V-Net + affine STN + shape prior.

    Args:
        vnet: the segmentation network (a :class:`VNet`).
        stn_features: channels of the localisation network's strided convolutions.
        stn_inputs: which volumes the localisation network sees (subset of image, vnet, prior).
        fusion: ``logit`` (prior enters the output) or ``none`` (prior only constrains training).
        prior_eps: clamp for the prior's log-odds (``log(eps / (1 - eps))`` is the strongest veto).
    """

    def __init__(
        self,
        vnet: VNet,
        stn_features: Sequence[int] = (8, 16, 32, 32),
        stn_inputs: Sequence[str] = STN_INPUTS,
        fusion: str = "logit",
        prior_eps: float = 1e-3,
    ):
        super().__init__()
        if fusion not in ("logit", "none"):
            raise ValueError(f"fusion must be 'logit' or 'none', got '{fusion}'")
        unknown = set(stn_inputs) - set(STN_INPUTS)
        if unknown or not stn_inputs:
            raise ValueError(f"stn_inputs must be a non-empty subset of {STN_INPUTS}, got {list(stn_inputs)}")
        self.vnet = vnet
        self.stn_inputs = tuple(stn_inputs)
        self.stn = AffineSTN(in_channels=len(self.stn_inputs), features=stn_features)
        self.fusion_mode = fusion
        self.fusion = nn.Conv3d(2, 1, kernel_size=1)
        with torch.no_grad():
            self.fusion.weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1, 1))
            self.fusion.bias.zero_()
        self.prior_eps = prior_eps
        self.register_buffer("prior", torch.zeros(1, 1, 1, 1, 1))
        self._register_load_state_dict_pre_hook(self._resize_prior)

    def _resize_prior(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        key = prefix + "prior"
        if key in state_dict and state_dict[key].shape != self.prior.shape:
            self.prior = torch.zeros_like(state_dict[key], device=self.prior.device)

    def parts(self) -> dict[str, nn.Module]:
        """The parts a training stage can train or freeze, by name."""
        return {"vnet": self.vnet, "stn": self.stn, "fusion": self.fusion}

    @property
    def has_prior(self) -> bool:
        """Whether a shape prior has been set (from training labels or a checkpoint)."""
        return self.prior.numel() > 1

    def set_prior(self, prior: torch.Tensor) -> None:
        """Install the shape prior ``[D, H, W]``, ``[1, D, H, W]`` or ``[1, 1, D, H, W]`` with values in [0, 1]."""
        prior = prior.detach().float()
        while prior.ndim < 5:
            prior = prior.unsqueeze(0)
        if prior.min() < 0 or prior.max() > 1:
            raise ValueError("the shape prior must hold probabilities in [0, 1]")
        self.prior = prior.to(self.prior.device)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.has_prior:
            raise RuntimeError("ST-V-Net has no shape prior: call set_prior() or load a trained checkpoint")
        if tuple(self.prior.shape[2:]) != tuple(x.shape[2:]):
            raise ValueError(
                f"input size {tuple(x.shape[2:])} differs from the shape prior's {tuple(self.prior.shape[2:])}: "
                "ST-V-Net works on whole ROIs of the size it was trained with (set data.patch_size: null)"
            )
        vnet_logits = self.vnet(x)
        prior = self.prior.expand(x.shape[0], -1, -1, -1, -1)
        available = {"image": x, "vnet": torch.sigmoid(vnet_logits), "prior": prior}
        loc_input = torch.cat([available[name] for name in self.stn_inputs], dim=1)
        warped, theta = self.stn(loc_input, prior)
        if self.fusion_mode == "logit":
            p = warped.clamp(self.prior_eps, 1 - self.prior_eps)
            logits = self.fusion(torch.cat([vnet_logits, torch.log(p) - torch.log1p(-p)], dim=1))
        else:
            logits = vnet_logits
        return {"logits": logits, "vnet_logits": vnet_logits, "prior": warped, "theta": theta}
