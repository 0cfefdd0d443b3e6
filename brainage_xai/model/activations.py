"""The activation tensor ``A`` (subjects x channels x voxels) that is decomposed.

Group level: :func:`write_activation_tensor` stores ``A`` as a float32 ``.npy`` (read
back memory-mapped by :func:`load_activation_tensor`) with a JSON beside it that gives
the subject order, their splits, the layer, the feature grid shape and its world affine.
The files live in the work directory (``WORK/group[/map-<name>]/activations/``): they are
reproducible from the model and the maps and can be large for early layers.

Participant level with ``--model``: :func:`write_participant_activations` writes one
subject's activation as a 4D NIfTI (one frame per channel, feature-grid affine) beside
its preprocessed map; the group level reuses these when their sidecar names the same
model (SHA-256) and layer.

Activations are computed in fp32 (no mixed precision), so that the network's head applied
to the voxel mean of ``A`` gives back exactly the predictions in ``predictions.tsv``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..bids.derivatives import participant_activations_path
from ..errors import DataError, UsageError
from ..imaging.geometry import FeatureGeometry
from ..utils.io import atomic_path, save_nifti, write_json
from .data import batches, check_grid, spans, standardise_inputs
from .io import load_model, model_sha256, weights_path
from .network import PreActResNet3d, model_mode
from .training import place

LOGGER = logging.getLogger("brainage_xai.activations")


@dataclass
class ActivationTensor:
    """``A`` with what is needed to interpret it.

    Attributes
    ----------
    array : numpy.ndarray
        ``(n, c, v)`` float32, memory-mapped read-only when loaded from disk.
    subjects : list of str
        Participant labels (without ``sub-``) in row order.
    split : list of str
        ``train``/``val``/``test`` of each row.
    layer, module : str
        The ``--layer`` name and the network module whose output it is.
    grid_shape : tuple of int
        Feature grid; ``v = prod(grid_shape)`` in C order.
    affine : numpy.ndarray
        World affine of the feature grid.
    stride : int
        Input voxels per feature voxel (feature voxel ``j`` sits on input voxel ``stride*j``).
    model_sha256 : str
    """

    array: np.ndarray
    subjects: list
    split: list
    layer: str
    module: str
    grid_shape: tuple
    affine: np.ndarray
    stride: int
    model_sha256: str

    def volumes(self) -> np.ndarray:
        """``A`` as ``(n, c, *grid_shape)`` (a view)."""
        return self.array.reshape(self.array.shape[:2] + tuple(self.grid_shape))

    def rows(self, split: str) -> np.ndarray:
        """Row indices of one split."""
        return np.flatnonzero(np.asarray(self.split) == split)


def check_layer(model: PreActResNet3d, layer: str | None, voxel_mm: float | None = None) -> str:
    """The layer ``--layer`` names in ``model`` (``None``: the last; ``auto``: by spacing).

    The one check of ``--layer``: a name the network does not have, or ``auto`` without
    the voxel size, is a usage error.
    """
    try:
        return model.check_layer(layer, voxel_mm)
    except ValueError as exc:
        raise UsageError(f"--layer: {exc}") from exc


def iter_activations(
    model: PreActResNet3d,
    x: torch.Tensor,
    layer: str | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
) -> Iterator[np.ndarray]:
    """Yield the activation of ``layer`` for batches of inputs ``(n, 1, *grid)`` (a tensor,
    or a :class:`~brainage_xai.model.data.MapDataset` read one batch at a time).

    The activation is captured by a forward hook on the BN-ReLU module that produces it
    (one per member of an ensemble, side by side along the channels).

    Yields
    ------
    numpy.ndarray
        ``(batch, c, *feature_grid)`` float32.
    """
    layer = check_layer(model, layer)
    device = torch.device(device)
    modules = layer_modules(model, layer)
    captured: list = [None] * len(modules)

    def hook(k):
        return lambda mod, inp, out: captured.__setitem__(k, out.detach().float().cpu())

    handles = [m.register_forward_hook(hook(k)) for k, m in enumerate(modules)]
    try:
        with model_mode(model):
            fmt = place(model, device)  # outside inference mode: the weights stay normal tensors
            with torch.inference_mode():
                for xb in batches(x, spans(len(x), batch_size), device):
                    model(xb.to(device).contiguous(memory_format=fmt))
                    out = captured[0] if len(captured) == 1 else torch.cat(captured, dim=1)
                    yield out.contiguous().numpy()
    finally:
        for h in handles:
            h.remove()


def layer_modules(model, layer: str) -> list:
    """The modules whose outputs, side by side along the channels, make up ``layer``.

    Several for an ensemble (:meth:`~brainage_xai.model.network.EnsembleNet.activation_modules`),
    one for a single network or any model with only ``activation_module``.
    """
    get = getattr(model, "activation_modules", None)
    return list(get(layer)) if get is not None else [model.activation_module(layer)]


def gradient_rms(
    model: PreActResNet3d,
    x: torch.Tensor,
    layer: str | None = None,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    target: int = 0,
) -> np.ndarray:
    """Root mean square over subjects of the output's gradient with respect to ``layer``.

    For every channel and feature voxel of the activation ``layer``, how strongly the
    prediction (output column ``target``) moves when that activation moves, averaged
    over the inputs ``x`` ``(n, 1, *grid)`` (the training subjects; a tensor or a
    :class:`~brainage_xai.model.data.MapDataset`) as
    ``sqrt(mean_n (d y_n / d A_n[c, v])²)``. Computed with Captum's
    ``LayerGradientXActivation(multiply_by_inputs=False)`` (the layer gradient) on the
    network in eval mode, one batch at a time; accumulated in float64.

    Returns
    -------
    numpy.ndarray
        ``(c, *feature_grid)`` float64, non-negative.
    """
    from captum.attr import LayerGradientXActivation

    layer = check_layer(model, layer)
    if len(x) == 0:
        raise DataError("no inputs to take the gradient over")
    device = torch.device(device)
    modules = layer_modules(model, layer)
    # Captum takes a list of layers and returns a gradient per layer (an ensemble's
    # members: the gradient of the ensemble's mean output, 1/K of each member's own).
    explainer = LayerGradientXActivation(model, modules if len(modules) > 1 else modules[0],
                                         multiply_by_inputs=False)
    total = None
    with model_mode(model):
        fmt = place(model, device)
        for batch in batches(x, spans(len(x), batch_size), device):
            batch = batch.to(device).contiguous(memory_format=fmt)
            grad = explainer.attribute(batch, target=target)
            grad = torch.cat(list(grad), dim=1) if len(modules) > 1 else grad
            square = (grad.detach().double() ** 2).sum(dim=0).cpu().numpy()
            total = square if total is None else total + square
    return np.sqrt(total / len(x))


def write_activation_tensor(
    paths: tuple[Path, Path],
    batches: Iterator[np.ndarray],
    *,
    subjects: Sequence[str],
    split: Sequence[str],
    model: PreActResNet3d,
    layer: str,
    input_shape: Sequence[int],
    input_affine: np.ndarray,
    model_sha: str,
) -> Path:
    """Write ``A`` from batches of ``(b, c, *grid)`` activations; returns the JSON path.

    ``paths`` are the ``.npy`` and its ``.json``. The ``.npy`` is filled through a memory
    map, so ``A`` never has to fit in memory.
    """
    npy, meta = (Path(p) for p in paths)
    n, c = len(subjects), model.layer_channels(layer)
    grid = model.feature_shape(input_shape, layer)
    v = int(np.prod(grid))
    with atomic_path(npy) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, c, v))
        row = 0
        for batch in batches:
            if tuple(batch.shape[1:]) != (c, *grid):
                raise DataError(f"activation batch has shape {batch.shape[1:]}, expected {(c, *grid)}")
            array[row : row + len(batch)] = batch.reshape(len(batch), c, v)
            row += len(batch)
        if row != n:
            raise DataError(f"got activations for {row} subjects, expected {n}")
        array.flush()
        del array
    write_json(
        meta,
        {
            "subjects": list(subjects),
            "split": list(split),
            "layer": layer,
            "module": model.activation_module_name(layer),
            "shape": [n, c, v],
            "grid_shape": list(grid),
            "affine": model.feature_affine(input_affine, layer),
            "stride": model.layer_stride(layer),
            "input_shape": [int(s) for s in input_shape],
            "input_affine": np.asarray(input_affine),
            "model_sha256": model_sha,
            "dtype": "float32",
            "order": "C: voxel index v = np.ravel_multi_index(ijk, grid_shape)",
        },
    )
    return meta


def load_activation_tensor(path: str | os.PathLike) -> ActivationTensor:
    """Open an activation tensor (its ``.json`` or ``.npy``) memory-mapped read-only."""
    path = Path(path)
    meta_path, npy = path.with_suffix(".json"), path.with_suffix(".npy")
    if not meta_path.is_file() or not npy.is_file():
        raise DataError(f"activation tensor {npy} or its JSON is missing")
    meta = json.loads(meta_path.read_text())
    array = np.load(npy, mmap_mode="r")
    if list(array.shape) != meta["shape"]:
        raise DataError(f"{npy} has shape {array.shape}, its JSON says {meta['shape']}")
    return ActivationTensor(
        array=array,
        subjects=meta["subjects"],
        split=meta["split"],
        layer=meta["layer"],
        module=meta["module"],
        grid_shape=tuple(meta["grid_shape"]),
        affine=np.asarray(meta["affine"], dtype=float),
        stride=int(meta["stride"]),
        model_sha256=meta["model_sha256"],
    )


# -- participant level ------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, mtime_ns: int) -> tuple[PreActResNet3d, dict, str]:
    # Participant runs over several labels call this once per subject.
    model, meta = load_model(path)
    return model, meta, model_sha256(path)


def model_for(path: str | os.PathLike) -> tuple[PreActResNet3d, dict, str]:
    """The model at ``path`` (loaded once per process), its metadata and SHA-256."""
    path = weights_path(path)
    return _cached_model(str(path), path.stat().st_mtime_ns if path.exists() else 0)


def check_model_grid(meta: dict, shape, affine, what: str) -> None:
    """Raise :class:`DataError` if a map's grid is not the model's input grid."""
    grid = meta.get("input_grid") or {}
    if "shape" not in grid or "affine" not in grid:
        raise DataError("the model's metadata has no input grid (shape, affine)")
    check_grid(shape, affine, grid["shape"], np.asarray(grid["affine"]), what=f"{what} (vs the model)")


def write_participant_activations(config, subject: str, preproc_path: str | os.PathLike) -> Path:
    """Write one subject's activation of ``config.layer`` as a 4D NIfTI; return its path.

    Parameters
    ----------
    config : brainage_xai.config.Config
        ``model`` (required), ``layer``, ``device``.
    subject : str
        Participant label without ``sub-``.
    preproc_path : path-like
        The subject's preprocessed map (the model's input).

    Raises
    ------
    DataError
        The map is not on the model's input grid.
    """
    import nibabel as nib

    from .training import resolve_device

    if config.model is None:
        raise UsageError("participant activations need --model")
    model, meta, sha = model_for(config.model)
    img = nib.load(str(preproc_path))
    layer = check_layer(model, config.layer, float(max(img.header.get_zooms()[:3])))
    check_model_grid(meta, img.shape, img.affine, f"sub-{subject} map {Path(preproc_path).name}")
    data = np.asarray(img.dataobj, dtype=np.float32).reshape((1, 1) + img.shape[:3])
    x = standardise_inputs(data, meta["normalisation"])
    (act,) = iter_activations(model, x, layer, device=resolve_device(config.device))
    out_img = nib.Nifti1Image(np.moveaxis(act[0], 0, -1), model.feature_affine(img.affine, layer))
    out_img.header.set_xyzt_units("mm")
    path = participant_activations_path(preproc_path, layer)
    save_nifti(out_img, path)
    write_json(
        path.with_name(path.name[: -len(".nii.gz")] + ".json"),
        {
            "Description": f"Activation of layer {layer} of the brain-age network: one volume per channel",
            "Layer": layer,
            "Module": model.activation_module_name(layer),
            "Channels": model.layer_channels(layer),
            "Stride": model.layer_stride(layer),
            "ModelSHA256": sha,
            "Sources": [f"bids::sub-{subject}/anat/{Path(preproc_path).name}"],
        },
    )
    return path


def read_participant_activations(preproc_path: str | os.PathLike, layer: str, sha: str) -> np.ndarray | None:
    """A subject's stored activation ``(c, *grid)`` if it was made by model ``sha``, else ``None``."""
    import nibabel as nib

    path = participant_activations_path(preproc_path, layer)
    sidecar = path.with_name(path.name[: -len(".nii.gz")] + ".json")
    if not path.is_file() or not sidecar.is_file():
        return None
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    if info.get("ModelSHA256") != sha or info.get("Layer") != layer:
        return None
    return np.moveaxis(np.asarray(nib.load(str(path)).dataobj, dtype=np.float32), -1, 0)


def _triple(value) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value, dtype=float))
    return np.repeat(arr, 3) if arr.size == 1 else arr


def resolve_layer(model, layer):
    """Return the module ``layer`` names in ``model`` (a module is returned as is)."""
    if not isinstance(layer, str):
        return layer
    modules = dict(model.named_modules())
    if layer not in modules:
        raise DataError(
            f"layer {layer!r} is not a module of the network; expected one of "
            f"{[n for n in modules if n][:20]}"
        )
    return modules[layer]


def feature_geometry(model, layer, input_shape) -> FeatureGeometry:
    """Derive the stride geometry of ``layer``'s output from the network itself.

    Runs one forward pass on zeros and composes the kernel, stride, padding and dilation
    of every convolution and pooling executed before ``layer`` returns: a module with
    kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` centres output voxel
    ``j`` on its input voxel ``s * j + (k - 1) * d / 2 - p``. Shortcut convolutions that
    map the same grid to the same grid as the main path are checked for agreement.

    Parameters
    ----------
    model : torch.nn.Module
    layer : str or torch.nn.Module
        The module whose output is explained (name as in ``model.named_modules()``).
    input_shape : tuple of int
        Spatial shape of one input volume.

    Returns
    -------
    FeatureGeometry
    """
    import torch
    from torch import nn

    target = resolve_layer(model, layer)
    records: list[tuple] = []
    out_shape: dict[str, tuple] = {}
    hooks = []

    def record(mod, inp, out):
        records.append((mod, tuple(inp[0].shape[2:]), tuple(out.shape[2:])))

    def grab(mod, inp, out):
        out_shape.setdefault("shape", tuple(out.shape[2:]))

    in_channels = 1
    for mod in model.modules():
        if isinstance(mod, nn.Conv3d | nn.MaxPool3d | nn.AvgPool3d):
            hooks.append(mod.register_forward_hook(record))
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv3d)), None)
    if first_conv is not None:
        in_channels = first_conv.in_channels
    hooks.append(target.register_forward_hook(grab))
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        with model_mode(model), torch.no_grad():
            model(torch.zeros((1, in_channels, *input_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
    if "shape" not in out_shape:
        raise DataError(f"layer {layer!r} was not run by the network's forward pass")

    grids = {tuple(input_shape): (np.ones(3), np.zeros(3))}
    for mod, shp_in, shp_out in records:
        if shp_in not in grids:
            continue
        s_in, o_in = grids[shp_in]
        k = _triple(mod.kernel_size)
        s = _triple(mod.stride if mod.stride is not None else mod.kernel_size)
        p = _triple(mod.padding) if not isinstance(mod.padding, str) else (k - 1) / 2
        d = _triple(getattr(mod, "dilation", 1))
        centre = (k - 1) * d / 2 - p
        new = (s_in * s, o_in + s_in * centre)
        if shp_out == shp_in:
            continue  # same-grid convolutions ('same' padding) do not move voxels
        if shp_out in grids:
            if not (np.allclose(grids[shp_out][0], new[0]) and np.allclose(grids[shp_out][1], new[1])):
                warnings.warn(
                    f"two paths reach feature grid {shp_out} with different centres "
                    f"({grids[shp_out][1]} vs {new[1]}); using the first",
                    stacklevel=2,
                )
            continue
        grids[shp_out] = new
    shape = out_shape["shape"]
    if shape not in grids:
        raise DataError(f"cannot trace the grid {shape} of layer {layer!r} back to the input")
    stride, offset = grids[shape]
    return FeatureGeometry(
        tuple(int(n) for n in input_shape),
        tuple(int(n) for n in shape),
        tuple(float(v) for v in stride),
        tuple(float(v) for v in offset),
    )
