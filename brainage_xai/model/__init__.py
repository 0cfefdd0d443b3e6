"""The 3D ResNet, its training and its weights on disk."""

from .io import load_model, model_sha256, save_model
from .network import PAPER_DEPTHS, PAPER_WIDTHS, EnsembleNet, PreActResNet3d, build_network

__all__ = [
    "PAPER_DEPTHS",
    "PAPER_WIDTHS",
    "EnsembleNet",
    "PreActResNet3d",
    "build_network",
    "load_model",
    "model_sha256",
    "save_model",
]
