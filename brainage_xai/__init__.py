"""brainage-xai: dataset-level explanations of 3D brain-age networks.

A BIDS-App that trains a 3D pre-activation ResNet to predict age from MNI-registered
brain maps, decomposes the last layer's activations over a whole dataset with a
constrained non-negative Tucker model, and reports the regions of interest it finds.
"""

from ._version import __version__

__all__ = ["__version__"]
