"""The pre-activation 3D ResNet that predicts age from a brain map.

The architecture is the paper's (section 4.1.2): a 3 x 3 x 3 stem convolution, five
blocks of pre-activation residual units (He et al. 2016b) with 3, 4, 6, 4 and 3 units and
8, 16, 32, 64 and 128 channels, stride 2 on entering blocks 2 to 5, a final BN-ReLU,
global average pooling and a linear head with one output per target. Widths and depths
are parameters so that tests and small demos can use a narrow network.

The activation that the decomposition explains is a BN-ReLU output, so it is
non-negative: for the last block it is the network's final BN-ReLU; for an earlier block
``k`` it is the first BN-ReLU of block ``k + 1``, which is block ``k``'s output after
pre-activation, on block ``k``'s (finer) grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

PAPER_WIDTHS = (8, 16, 32, 64, 128)
PAPER_DEPTHS = (3, 4, 6, 4, 3)


@contextlib.contextmanager
def model_mode(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """Put ``model`` in training or evaluation mode for a ``with`` block, then restore it.

    Every pass outside training (predictions, activations, gradients, explanations)
    runs the network in evaluation mode (batch norm with its running statistics) and
    hands it back in the mode it came in.
    """
    was_training = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was_training)


class PreActUnit(nn.Module):
    """A pre-activation residual unit: (BN-ReLU-Conv3d) twice plus a shortcut.

    Parameters
    ----------
    in_channels, out_channels : int
        Channels in and out.
    stride : int
        Stride of the first convolution (2 on entering a block that halves the grid).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.preact = nn.Sequential(nn.BatchNorm3d(in_channels), nn.ReLU(inplace=False))
        self.conv1 = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            # He et al. 2016b: a projection shortcut takes the pre-activated input.
            self.shortcut = nn.Conv3d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.preact(x)
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.relu2(self.bn2(out)))
        return out + residual


#: Feature spacing (mm) that ``--layer auto`` aims for: fine enough to tell apart
#: regions a few centimetres across. On the synthetic cohort at 4 mm, block1 (4 mm apart)
#: is the only layer where the RoIs find all five planted regions; block2 (8 mm) misses
#: the parietal one (docs/benchmarks.md, "Layers and tensors"). The tensor then has as
#: many voxels as the input: n × c × voxels floats (1 GB for 200 subjects at 4 mm).
AUTO_SPACING_MM = 4.0


class PreActResNet3d(nn.Module):
    """Pre-activation 3D ResNet regressor.

    Parameters
    ----------
    widths : sequence of int
        Channels of each block (paper: 8, 16, 32, 64, 128).
    depths : sequence of int
        Residual units in each block (paper: 3, 4, 6, 4, 3).
    n_outputs : int
        Outputs of the linear head (one per target).
    in_channels : int
        Channels of the input map (1).
    """

    def __init__(
        self,
        widths: Sequence[int] = PAPER_WIDTHS,
        depths: Sequence[int] = PAPER_DEPTHS,
        n_outputs: int = 1,
        in_channels: int = 1,
    ):
        super().__init__()
        widths, depths = tuple(int(w) for w in widths), tuple(int(d) for d in depths)
        if len(widths) != len(depths) or not widths:
            raise ValueError(
                f"widths and depths must have the same non-zero length; got {widths} and {depths}"
            )
        if min(widths) < 1 or min(depths) < 1:
            raise ValueError(f"widths and depths must be positive; got {widths} and {depths}")
        self.widths, self.depths = widths, depths
        self.n_outputs, self.in_channels = int(n_outputs), int(in_channels)
        self.stem = nn.Conv3d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks = []
        channels = widths[0]
        for b, (width, depth) in enumerate(zip(widths, depths)):
            units = [PreActUnit(channels, width, stride=1 if b == 0 else 2)]
            units += [PreActUnit(width, width) for _ in range(depth - 1)]
            blocks.append(nn.Sequential(*units))
            channels = width
        self.blocks = nn.ModuleList(blocks)
        self.final = nn.Sequential(nn.BatchNorm3d(channels), nn.ReLU(inplace=False))
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(channels, self.n_outputs)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- architecture description ------------------------------------------------------
    @property
    def layers(self) -> tuple[str, ...]:
        """Names of the activations that can be decomposed (``block1`` ... ``blockN``)."""
        return tuple(f"block{b + 1}" for b in range(len(self.widths)))

    @property
    def default_layer(self) -> str:
        """The last block's final BN-ReLU, the paper's choice."""
        return self.layers[-1]

    def architecture(self) -> dict:
        """A JSON-serialisable description from which :func:`build_network` rebuilds it."""
        return {
            "name": "PreActResNet3d",
            "widths": list(self.widths),
            "depths": list(self.depths),
            "n_outputs": self.n_outputs,
            "in_channels": self.in_channels,
        }

    def check_layer(self, layer: str | None, voxel_mm: float | None = None) -> str:
        """Return ``layer`` (or the default) after checking that the network has it.

        ``"auto"`` needs ``voxel_mm`` (the input voxel size) and picks
        :meth:`layer_for_spacing`.
        """
        if layer is None:
            return self.default_layer
        if layer == "auto" and voxel_mm is not None:
            return self.layer_for_spacing(voxel_mm)
        if layer not in self.layers:
            choices = list(self.layers) + (["auto"] if voxel_mm is not None else [])
            raise ValueError(f"'layer' must be one of {choices}. {layer!r} was provided.")
        return layer

    def layer_for_spacing(self, voxel_mm: float, spacing_mm: float = AUTO_SPACING_MM) -> str:
        """The deepest layer whose feature voxels are at most ``spacing_mm`` apart.

        For inputs of ``voxel_mm`` (the largest voxel dimension); the first block if
        none is that fine. At the default 4 mm: ``block1`` at 4 mm (and coarser),
        ``block2`` at 2 mm, ``block3`` at 1 mm, and the paper's last layer ``block5``
        only at 0.25 mm.
        """
        best = self.layers[0]
        for b, name in enumerate(self.layers):
            if (2**b) * float(voxel_mm) <= spacing_mm + 1e-6:
                best = name
        return best

    def activation_module_name(self, layer: str | None = None) -> str:
        """Name (as in ``named_modules()``) of the BN-ReLU whose output is ``layer``."""
        b = self.layers.index(self.check_layer(layer))
        return "final" if b == len(self.widths) - 1 else f"blocks.{b + 1}.0.preact"

    def activation_module(self, layer: str | None = None) -> nn.Module:
        """The BN-ReLU module whose output is the activation ``layer``."""
        return self.get_submodule(self.activation_module_name(layer))

    def activation_modules(self, layer: str | None = None) -> list[nn.Module]:
        """The modules whose outputs, side by side along the channels, are ``layer``.

        One for a single network; one per member for an :class:`EnsembleNet`.
        """
        return [self.activation_module(layer)]

    def layer_stride(self, layer: str | None = None) -> int:
        """Input voxels per feature voxel along each axis at ``layer``."""
        return 2 ** self.layers.index(self.check_layer(layer))

    def layer_channels(self, layer: str | None = None) -> int:
        """Channels of the activation ``layer``."""
        return self.widths[self.layers.index(self.check_layer(layer))]

    def feature_shape(self, input_shape: Sequence[int], layer: str | None = None) -> tuple:
        """Spatial shape of the activation ``layer`` for an input of ``input_shape``."""
        shape = [int(s) for s in input_shape]
        for _ in range(self.layers.index(self.check_layer(layer))):
            # A 3-wide convolution with stride 2 and padding 1.
            shape = [(s - 1) // 2 + 1 for s in shape]
        return tuple(shape)

    def feature_affine(self, input_affine: np.ndarray, layer: str | None = None) -> np.ndarray:
        """World affine of the activation grid of ``layer``.

        A stride-2 convolution with padding 1 centres output voxel ``j`` on input voxel
        ``2 j``, so feature voxel ``j`` sits on input voxel ``stride * j`` (offset 0): the
        grid is the input grid subsampled, not stretched over the image.
        """
        scale = np.diag([float(self.layer_stride(layer))] * 3 + [1.0])
        return np.asarray(input_affine, dtype=float) @ scale

    # -- forward -------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The final BN-ReLU activation, ``(batch, channels, *grid)``."""
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.final(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class EnsembleNet(nn.Module):
    """Networks of one architecture that predict together: the mean of their outputs.

    The ensemble's activation at a layer is its members' activations side by side along
    the channel axis (member 0's channels first): the ensemble's prediction is the
    mean of the members' heads on their pooled features, a linear function of those
    channels, as a single network's is of its own. Everything about the grid (layers,
    strides, feature shape) is the members'.

    Parameters
    ----------
    members : sequence of PreActResNet3d
        Two or more networks with the same :meth:`~PreActResNet3d.architecture`.
    """

    def __init__(self, members: Sequence[PreActResNet3d]):
        super().__init__()
        members = list(members)
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members; got {len(members)}")
        first = members[0].architecture()
        if any(m.architecture() != first for m in members[1:]):
            raise ValueError("the members of an ensemble must share one architecture")
        self.members = nn.ModuleList(members)

    @property
    def n_members(self) -> int:
        return len(self.members)

    def __getattr__(self, name):
        # The grid and layer description (widths, layers, check_layer, layer_stride,
        # feature_shape, ...) is the members'; nn.Module's own lookup comes first.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in _SHARED:
                return getattr(self.members[0], name)
            raise

    def architecture(self) -> dict:
        return {**self.members[0].architecture(), "ensemble": self.n_members}

    def layer_channels(self, layer: str | None = None) -> int:
        """Channels of the activation ``layer``: every member's."""
        return self.n_members * self.members[0].layer_channels(layer)

    def activation_module_name(self, layer: str | None = None) -> str:
        """Member 0's module for ``layer`` (its geometry is every member's)."""
        return "members.0." + self.members[0].activation_module_name(layer)

    def activation_module(self, layer: str | None = None) -> nn.Module:
        """Member 0's module for ``layer``: its grid; use :meth:`activation_modules` for the values."""
        return self.members[0].activation_module(layer)

    def activation_modules(self, layer: str | None = None) -> list[nn.Module]:
        return [m.activation_module(layer) for m in self.members]

    @property
    def head(self) -> nn.Linear:
        """The ensemble's head on its pooled channels: the members' heads side by side, / K."""
        heads = [m.head for m in self.members]
        out = nn.Linear(sum(h.in_features for h in heads), heads[0].out_features)
        with torch.no_grad():
            out.weight.copy_(torch.cat([h.weight for h in heads], dim=1) / self.n_members)
            out.bias.copy_(torch.stack([h.bias for h in heads]).mean(dim=0))
        return out.to(heads[0].weight.device)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.features(x) for m in self.members], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


_SHARED = frozenset({
    "widths", "depths", "n_outputs", "in_channels", "layers", "default_layer", "check_layer",
    "layer_for_spacing", "layer_stride", "feature_shape", "feature_affine",
})  # fmt: skip


def build_network(architecture: dict) -> PreActResNet3d | EnsembleNet:
    """Rebuild a network from :meth:`PreActResNet3d.architecture`.

    ``"ensemble": K`` (K >= 2) builds an :class:`EnsembleNet` of K such networks, each
    initialised in turn from the global torch generator.
    """
    if architecture.get("name", "PreActResNet3d") != "PreActResNet3d":
        raise ValueError(f"unknown architecture {architecture.get('name')!r}")
    k = int(architecture.get("ensemble", 1))
    if k < 1:
        raise ValueError(f"ensemble must be at least 1; got {k}")

    def one():
        return PreActResNet3d(
            widths=architecture["widths"],
            depths=architecture["depths"],
            n_outputs=architecture.get("n_outputs", 1),
            in_channels=architecture.get("in_channels", 1),
        )

    return one() if k == 1 else EnsembleNet([one() for _ in range(k)])


def head_from_torch(module):
    """Wrap a torch head (e.g. the network's final ``nn.Linear``) as a numpy callable.

    The returned function maps voxel-averaged activations (m, c) to predictions (m, t),
    running ``module`` in eval mode, without gradients, on its own device and dtype.
    """
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32

    def head(avg):
        with model_mode(module), torch.no_grad():
            out = module(torch.as_tensor(np.asarray(avg), dtype=dtype, device=device))
        return out.detach().cpu().double().numpy()

    return head
