"""Starting a network from another run's weights: a trained backbone (a V-Net, a DynUNet, ...) into the same network
or into an ST-V-Net's ``backbone`` (the paper's stage 1 shared with the baseline), or an ST-V-Net's backbone into a
plain network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stvnet.models.protocol import BACKBONE

_PREFIX = BACKBONE + "."


def load_backbone_weights(net: nn.Module, path: str | Path) -> tuple[int, dict[str, Any] | None]:
    """Copy the backbone weights of the checkpoint at ``path`` into ``net``; returns how many tensors landed and the
    checkpoint's data record (its fold and subjects, checked against the new run's fold before training).

    Keys are matched after the ``net.`` prefix, also with ``backbone.`` added or removed, and only where shapes agree;
    every backbone tensor of the source must land somewhere, else the networks differ (width, depth, kernel size)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.init_weights: checkpoint {path} not found (resuming a run that started "
                                "from it? its weights are in the run's own checkpoint: pass --model.init_weights null)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    source = {k.removeprefix("net."): v for k, v in state.items()}
    # an ST-V-Net checkpoint: only its backbone must land
    required = {k for k in source if k.startswith(_PREFIX)} or set(source)
    own = net.state_dict()
    picked = {}
    for name, value in source.items():
        for candidate in (name, _PREFIX + name, name.removeprefix(_PREFIX)):
            if candidate in own and own[candidate].shape == value.shape:
                picked[candidate] = value
                break
    landed = {n for n in required if any(c in picked for c in (n, _PREFIX + n, n.removeprefix(_PREFIX)))}
    if not picked or landed != required:
        raise ValueError(f"{path}: no weights match this network for {len(required - landed)} of {len(required)} "
                         "backbone tensors (another architecture, width, depth or kernel size?)")
    net.load_state_dict(picked, strict=False)
    return len(picked), checkpoint.get("FemurDataModule")
