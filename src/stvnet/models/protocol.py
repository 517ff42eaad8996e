"""What the training code may assume of a network, and nothing more.

* A network maps an image batch ``[B, 1, D, H, W]`` to femur logits of the same size: a tensor (a plain backbone: the
  V-Net, a MONAI network, a user's own) or a dict holding at least ``logits`` (an ST-V-Net also returns
  ``backbone_logits``, the warped ``prior`` and the affine ``theta``).
* Its trainable **parts** are what stages train or freeze by name: a network with a ``parts()`` method declares them
  (ST-V-Net: ``backbone``, ``stn``, ``fusion``); any other network is one part, the ``backbone``.
* A network that carries a shape prior says so with ``has_prior`` and takes it with ``set_prior(prior)``.
"""

from __future__ import annotations

#: the segmentation network's role: a plain network is nothing else; an ST-V-Net wraps one
BACKBONE = "backbone"
