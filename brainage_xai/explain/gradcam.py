"""GradCAM baseline: per-subject maps averaged over the dataset, on the template grid.

GradCAM (Selvaraju et al. 2017) weights each channel of a layer's activation by the mean
gradient of the output over that channel's voxels and sums over channels. It is computed
with Captum's ``LayerGradCam`` (a maintained implementation that handles 3D layers, and a
small pure-Python dependency on PyPI that works with the torch already required; MONAI's
GradCAM would pull in a much larger package for the same thing).

For the last layer of a network that ends in global average pooling and a linear head,
the gradient of the output with respect to every voxel of channel ``c`` is ``w_c / V``
(head weight over voxel count), the same everywhere, so GradCAM equals the class
activation map (CAM, Zhou et al. 2016) ``ReLU(sum_c w_c A_c)`` divided by ``V``:
:func:`cam_maps` computes that directly and the tests check the two agree. For an
earlier layer the gradients vary over voxels and GradCAM is no longer CAM.

Each subject's map lives on the feature grid; the average is upsampled to the template
with the same stride geometry as the RoIs (:func:`brainage_xai.imaging.geometry.upsample`) so the
two can be compared voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import DataError
from ..imaging.geometry import FeatureGeometry, upsample
from ..model.activations import resolve_layer
from ..model.network import model_mode
from ..model.training import place


def _batches(inputs, batch_size: int):
    """Yield float32 arrays of shape (b, 1, X, Y, Z) from (n, X, Y, Z) or (n, 1, X, Y, Z)."""
    batch = []
    for item in inputs:
        arr = np.asarray(item.get_fdata() if hasattr(item, "get_fdata") else item,
                         dtype=np.float32)
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise DataError(f"an input map has shape {arr.shape}, expected (X, Y, Z)")
        batch.append(arr)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def gradcam_maps(model, layer, inputs: Iterable, *, target: int = 0, relu: bool = True,
                 batch_size: int = 4, device="cpu") -> np.ndarray:
    """GradCAM of every input on the feature grid of ``layer``.

    Parameters
    ----------
    model : torch.nn.Module
        The regression network, output ``(batch, n_targets)``.
    layer : str, torch.nn.Module or list of them
        The activation to explain. A list is one activation split over several modules
        (an ensemble's members, :meth:`~brainage_xai.model.network.EnsembleNet.activation_modules`):
        GradCAM of their channels side by side, i.e. the sum of each module's map before
        the ReLU, every gradient taken of ``model``'s own output.
    inputs : iterable
        Input maps: arrays or tensors ``(X, Y, Z)`` or ``(1, X, Y, Z)``, or nibabel
        images; read one batch at a time, so a generator over maps on disk (e.g. the
        items of a :class:`~brainage_xai.model.data.MapDataset`) holds one batch only.
    target : int
        Output column (target) to explain.
    relu : bool
        Keep only positive evidence (GradCAM's ReLU); ``False`` keeps the sign, which for
        a regression tells which regions push the prediction down.
    batch_size : int
    device : str or torch.device

    Returns
    -------
    ndarray, shape (n, fx, fy, fz)
    """
    import torch
    from captum.attr import LayerGradCam

    layers = list(layer) if isinstance(layer, list | tuple) else [layer]
    explainers = [LayerGradCam(model, resolve_layer(model, m)) for m in layers]
    maps = []
    with model_mode(model):
        fmt = place(model, device)
        for batch in _batches(inputs, batch_size):
            x = torch.from_numpy(batch).to(device).contiguous(memory_format=fmt).requires_grad_(True)
            if len(explainers) == 1:
                attr = explainers[0].attribute(x, target=target, relu_attributions=relu)
            else:
                attr = sum(e.attribute(x, target=target, relu_attributions=False) for e in explainers)
                attr = attr.clamp(min=0) if relu else attr
            maps.append(attr.detach()[:, 0].cpu().numpy().astype(np.float64))
    if not maps:
        raise DataError("no input maps were given to GradCAM")
    return np.concatenate(maps)


def cam_maps(model, layer, head_weight, inputs: Iterable, *, relu: bool = True,
             batch_size: int = 4, device="cpu") -> np.ndarray:
    """Class activation maps ``sum_c w_c A_c`` (Zhou et al. 2016) for GAP + linear heads.

    Parameters
    ----------
    head_weight : array-like, shape (channels,)
        The linear head's weights for the target explained.

    Returns
    -------
    ndarray, shape (n, fx, fy, fz)
    """
    import torch

    module = resolve_layer(model, layer)
    w = torch.as_tensor(np.asarray(head_weight, dtype=np.float32), device=device)
    store = {}
    handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    maps = []
    try:
        with model_mode(model):
            fmt = place(model, device)
            with torch.no_grad():
                for batch in _batches(inputs, batch_size):
                    model(torch.from_numpy(batch).to(device).contiguous(memory_format=fmt))
                    cam = torch.einsum("c,bcxyz->bxyz", w, store["a"])
                    maps.append((cam.clamp(min=0) if relu else cam).cpu().numpy().astype(np.float64))
    finally:
        handle.remove()
    return np.concatenate(maps)


def average_gradcam(model, layer, inputs: Iterable, geometry: FeatureGeometry, template_img,
                    *, target: int = 0, relu: bool = True, batch_size: int = 4,
                    device="cpu", mask=None):
    """The dataset-level GradCAM baseline: subject maps averaged, on the template grid.

    Returns
    -------
    img : nibabel.Nifti1Image
        The average map upsampled with ``geometry``, template affine, float32.
    maps : ndarray, shape (n, fx, fy, fz)
        The per-subject maps on the feature grid.
    """
    import nibabel as nib

    maps = gradcam_maps(model, layer, inputs, target=target, relu=relu,
                        batch_size=batch_size, device=device)
    if tuple(maps.shape[1:]) != tuple(geometry.feature_shape):
        raise DataError(
            f"GradCAM maps have grid {maps.shape[1:]}, expected {geometry.feature_shape}"
        )
    avg = upsample(maps.mean(axis=0), geometry)
    if mask is not None:
        avg = avg * np.asarray(mask, dtype=bool)
    img = nib.Nifti1Image(avg.astype(np.float32), template_img.affine)
    img.header.set_xyzt_units("mm")
    return img, maps
