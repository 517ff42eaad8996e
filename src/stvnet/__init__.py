"""ST-V-Net: shape-prior V-Net for proximal femur segmentation in QCT, as a Lightning framework."""

__version__ = "0.1.0"
