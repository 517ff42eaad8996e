"""ST-V-Net: a segmentation backbone whose output is constrained by a femur shape prior aligned by a spatial
transformer.

The paper (Zhao et al., 2021) adds a 3D STN carrying a shape prior of the proximal femur to a V-Net and
trains the whole in stages, but does not publish the exact wiring. This reimplementation chooses:

* **prior**: the mean femur mask of the current fold's training labels in the ROI frame (a buffer, saved in
  checkpoints, so a checkpoint alone predicts);
* **backbone**: any network that maps ``[B, 1, D, H, W]`` images to ``[B, 1, D, H, W]`` logits: the paper's
  :class:`~stvnet.models.vnet.VNet`, a MONAI ``DynUNet`` or ``SegResNet``, a user's own (chosen in YAML);
* **STN input**: the image, the backbone's probabilities and the prior (``stn_inputs`` selects);
* **warp**: the STN regresses a 12-parameter affine (identity at start) that moves the prior onto the subject;
* **fusion** (``fusion='logit'``): final logit = a * backbone logit + b * logit(warped prior) + c, a 1x1x1
  convolution initialised to (1, ``prior_weight``, 0); ``prior_weight: 0`` makes an untrained fusion reproduce the
  backbone exactly. A Bayesian reading: the warped prior acts as a spatial prior on the backbone's evidence,
  suppressing bone far from the expected femur (pelvis, other side). ``fusion='none'`` keeps the backbone's output
  and uses the prior only in the loss (a pure training-time constraint);
* **losses** (chosen per stage in the config): Dice on the fused output, on the backbone's own output, and between
  the warped prior and the ground truth (which is what teaches the STN to align).

The ``backbone`` is the plain network of the baseline experiment, so weights move between them
(:mod:`stvnet.init_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stvnet.models.stn import AffineSTN
from stvnet.models.protocol import BACKBONE

STN_INPUTS = ("image", BACKBONE, "prior")


class STVNet(nn.Module):
    """A segmentation backbone + affine STN + shape prior.

    Args:
        backbone: the segmentation network: any ``nn.Module`` returning one logit channel of its input's size (a
            :class:`~stvnet.models.vnet.VNet` in the paper).
        stn_features: channels of the localisation network's strided convolutions.
        stn_inputs: which volumes the localisation network sees (subset of image, backbone, prior).
        fusion: ``logit`` (prior enters the output) or ``none`` (prior only constrains training).
        prior_weight: the fusion's initial weight of the prior's log-odds (0: the untrained fusion is the backbone).
        prior_eps: clamp for the prior's log-odds (``log(eps / (1 - eps))`` is the strongest veto).
    """

    def __init__(
        self,
        backbone: nn.Module,
        stn_features: Sequence[int] = (8, 16, 32, 32),
        stn_inputs: Sequence[str] = STN_INPUTS,
        fusion: str = "logit",
        prior_weight: float = 0.0,
        prior_eps: float = 1e-3,
    ):
        super().__init__()
        if fusion not in ("logit", "none"):
            raise ValueError(f"fusion must be 'logit' or 'none', got '{fusion}'")
        unknown = set(stn_inputs) - set(STN_INPUTS)
        if unknown or not stn_inputs:
            raise ValueError(f"stn_inputs must be a non-empty subset of {STN_INPUTS}, got {list(stn_inputs)}")
        self.backbone = backbone
        self.stn_inputs = tuple(stn_inputs)
        self.stn = AffineSTN(in_channels=len(self.stn_inputs), features=stn_features)
        self.fusion_mode = fusion
        self.fusion = nn.Conv3d(2, 1, kernel_size=1)
        with torch.no_grad():
            self.fusion.weight.copy_(torch.tensor([1.0, float(prior_weight)]).view(1, 2, 1, 1, 1))
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
        return {BACKBONE: self.backbone, "stn": self.stn, "fusion": self.fusion}

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
        backbone_logits = self.backbone(x)
        if not isinstance(backbone_logits, torch.Tensor) or backbone_logits.shape != (x.shape[0], 1, *x.shape[2:]):
            got = tuple(backbone_logits.shape) if isinstance(backbone_logits, torch.Tensor) else type(backbone_logits).__name__
            raise ValueError(f"the backbone must return [batch, 1, *input size] logits {(x.shape[0], 1, *x.shape[2:])}, "
                             f"got {got} (set its out_channels to 1; turn off deep supervision)")
        prior = self.prior.expand(x.shape[0], -1, -1, -1, -1)
        available = {"image": x, BACKBONE: torch.sigmoid(backbone_logits), "prior": prior}
        loc_input = torch.cat([available[name] for name in self.stn_inputs], dim=1)
        warped, theta = self.stn(loc_input, prior)
        if self.fusion_mode == "logit":
            p = warped.clamp(self.prior_eps, 1 - self.prior_eps)
            logits = self.fusion(torch.cat([backbone_logits, torch.log(p) - torch.log1p(-p)], dim=1))
        else:
            logits = backbone_logits
        return {"logits": logits, "backbone_logits": backbone_logits, "prior": warped, "theta": theta}
