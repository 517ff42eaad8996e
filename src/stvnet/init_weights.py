"""Starting a network from another run's weights: a trained V-Net into a V-Net or into ST-V-Net's ``vnet`` (the
paper's stage 1 shared with the baseline), or an ST-V-Net's V-Net into a V-Net."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_vnet_weights(net: nn.Module, path: str | Path) -> tuple[int, dict[str, Any] | None]:
    """Copy the V-Net weights of the checkpoint at ``path`` into ``net``; returns how many tensors landed and the
    checkpoint's data record (its fold and subjects, checked against the new run's fold before training).

    Keys are matched after the ``net.`` prefix, also with ``vnet.`` added or removed, and only where shapes agree;
    every V-Net tensor of the source must land somewhere, else the networks differ (width, depth, kernel size)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model.init_weights: checkpoint {path} not found (resuming a run that started "
                                "from it? its weights are in the run's own checkpoint: pass --model.init_weights null)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint)
    source = {k.removeprefix("net."): v for k, v in state.items()}
    # an ST-V-Net checkpoint: only its V-Net part must land
    required = {k for k in source if k.startswith("vnet.")} or set(source)
    own = net.state_dict()
    picked = {}
    for name, value in source.items():
        for candidate in (name, "vnet." + name, name.removeprefix("vnet.")):
            if candidate in own and own[candidate].shape == value.shape:
                picked[candidate] = value
                break
    landed = {n for n in required if any(c in picked for c in (n, "vnet." + n, n.removeprefix("vnet.")))}
    if not picked or landed != required:
        raise ValueError(f"{path}: no weights match this network for {len(required - landed)} of {len(required)} "
                         "V-Net tensors (different width, depth or kernel size?)")
    net.load_state_dict(picked, strict=False)
    return len(picked), checkpoint.get("FemurDataModule")
