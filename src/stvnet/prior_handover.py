"""Handing the shape prior to an ST-V-Net: the prior is data (the mean of the fold's *training* labels, built by
the datamodule), so it is built there and given to the network once, before training starts."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class PriorSource(Protocol):
    """What can build a prior: :class:`~data_modules.datamodule.FemurDataModule`."""

    def shape_prior(self, alignment: str = "roi") -> torch.Tensor: ...


def needs_prior(net: nn.Module) -> bool:
    """Whether ``net`` carries a shape prior that has not been given yet (a resumed run's comes with its weights)."""
    return getattr(net, "has_prior", True) is False


def hand_over_prior(net: nn.Module, source: PriorSource | None, alignment: str) -> bool:
    """Build the prior from ``source`` and set it in ``net`` if ``net`` needs one; returns whether it did."""
    if not needs_prior(net):
        return False
    if source is None or not hasattr(source, "shape_prior"):
        raise RuntimeError("ST-V-Net needs a datamodule with shape_prior() to build its prior")
    net.set_prior(source.shape_prior(alignment=alignment))
    return True
