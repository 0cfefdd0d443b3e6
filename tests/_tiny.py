"""A tiny real 3D regression network for the explanation tests (GAP + linear head)."""

import numpy as np
import torch
from torch import nn


class TinyNet(nn.Module):
    """Two stride-2 stages with a strided 1x1 shortcut, ReLU features, GAP, linear head."""

    def __init__(self, channels: int = 6):
        super().__init__()
        self.stem = nn.Conv3d(1, 4, 3, padding=1)
        self.down1 = nn.Conv3d(4, channels, 3, stride=2, padding=1)
        self.short1 = nn.Conv3d(4, channels, 1, stride=2)
        self.down2 = nn.Conv3d(channels, channels, 3, stride=2, padding=1)
        self.features = nn.ReLU()
        self.head = nn.Linear(channels, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.down1(x) + self.short1(x))
        x = self.features(self.down2(x))
        return self.head(x.mean(dim=(2, 3, 4)))


def tiny_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


def mni_affine(res: float = 4.0) -> np.ndarray:
    """A MNI-like affine (RAS, origin near the template's) for tiny test grids."""
    aff = np.diag([res, res, res, 1.0])
    aff[:3, 3] = [-72.0, -104.0, -60.0]
    return aff
