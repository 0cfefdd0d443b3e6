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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .derivatives import nifti_stem
from .errors import DataError, UsageError
from .model.data import check_grid, standardise_inputs
from .model.io import load_model, model_sha256, weights_path
from .model.network import PreActResNet3d
from .model.training import place
from .utils.io import atomic_path, save_nifti, write_json

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


def _check_layer(model: PreActResNet3d, layer: str | None, voxel_mm: float | None = None) -> str:
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
    """Yield the activation of ``layer`` for batches of inputs ``(n, 1, *grid)``.

    The activation is captured by a forward hook on the BN-ReLU module that produces it
    (one per member of an ensemble, side by side along the channels).

    Yields
    ------
    numpy.ndarray
        ``(batch, c, *feature_grid)`` float32.
    """
    layer = _check_layer(model, layer)
    device = torch.device(device)
    modules = layer_modules(model, layer)
    captured: list = [None] * len(modules)

    def hook(k):
        return lambda mod, inp, out: captured.__setitem__(k, out.detach().float().cpu())

    handles = [m.register_forward_hook(hook(k)) for k, m in enumerate(modules)]
    was_training = model.training
    fmt = place(model.eval(), device)
    try:
        with torch.inference_mode():
            for start in range(0, x.shape[0], batch_size):
                model(x[start : start + batch_size].to(device).contiguous(memory_format=fmt))
                out = captured[0] if len(captured) == 1 else torch.cat(captured, dim=1)
                yield out.contiguous().numpy()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


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
    over the inputs ``x`` ``(n, 1, *grid)`` (the training subjects) as
    ``sqrt(mean_n (d y_n / d A_n[c, v])²)``. Computed with Captum's
    ``LayerGradientXActivation(multiply_by_inputs=False)`` (the layer gradient) on the
    network in eval mode, one batch at a time; accumulated in float64.

    Returns
    -------
    numpy.ndarray
        ``(c, *feature_grid)`` float64, non-negative.
    """
    from captum.attr import LayerGradientXActivation

    layer = _check_layer(model, layer)
    if x.shape[0] == 0:
        raise DataError("no inputs to take the gradient over")
    device = torch.device(device)
    was_training = model.training
    fmt = place(model.eval(), device)
    modules = layer_modules(model, layer)
    # Captum takes a list of layers and returns a gradient per layer (an ensemble's
    # members: the gradient of the ensemble's mean output, 1/K of each member's own).
    explainer = LayerGradientXActivation(model, modules if len(modules) > 1 else modules[0],
                                         multiply_by_inputs=False)
    total = None
    try:
        for start in range(0, x.shape[0], batch_size):
            batch = x[start : start + batch_size].to(device).contiguous(memory_format=fmt)
            grad = explainer.attribute(batch, target=target)
            grad = torch.cat(list(grad), dim=1) if len(modules) > 1 else grad
            square = (grad.detach().double() ** 2).sum(dim=0).cpu().numpy()
            total = square if total is None else total + square
    finally:
        model.train(was_training)
    return np.sqrt(total / x.shape[0])


def tensor_paths(folder: str | os.PathLike, layer: str) -> tuple[Path, Path]:
    """The ``.npy`` and ``.json`` of the activation tensor of ``layer`` in ``folder``."""
    base = Path(folder) / f"layer-{layer}_activations"
    return base.with_suffix(".npy"), base.with_suffix(".json")


def write_activation_tensor(
    folder: str | os.PathLike,
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

    The ``.npy`` is filled through a memory map, so ``A`` never has to fit in memory.
    """
    npy, meta = tensor_paths(folder, layer)
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


def participant_activations_path(preproc_path: str | os.PathLike, layer: str) -> Path:
    """``sub-X_..._desc-<layer>_activations.nii.gz`` beside the preprocessed map.

    The entities before ``desc-`` (space, res, label) are kept, so the activations of
    different maps of one subject do not collide.
    """
    preproc_path = Path(preproc_path)
    stem = nifti_stem(preproc_path).rsplit("_", 1)[0]  # drop the suffix (probseg, ...)
    parts = [p for p in stem.split("_") if not p.startswith("desc-")]
    return preproc_path.with_name("_".join(parts) + f"_desc-{layer}_activations.nii.gz")


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

    from .model.training import resolve_device

    if config.model is None:
        raise UsageError("participant activations need --model")
    model, meta, sha = model_for(config.model)
    img = nib.load(str(preproc_path))
    layer = _check_layer(model, config.layer, float(max(img.header.get_zooms()[:3])))
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
