"""Faithfulness without ground truth: does occluding an RoI hurt the network?

For each RoI, the input maps inside it (the upsampled RoI thresholded at a fraction of its
peak) are replaced by the training mean map, and the network's test MAE is measured
again. The increase is compared with that of random compact blobs of the same volume
inside the brain (at least 20 draws per RoI): an RoI the network relies on must hurt
more than the 95th percentile of the random blobs. This works on any cohort, real or
simulated, because it needs only the network and the test set.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd

from ..bids.derivatives import roi_names as default_names
from ..errors import DataError

#: The fewest random blobs per RoI for a 95th percentile worth reading.
MIN_DRAWS = 20


def torch_predictor(model, *, target: int = 0, device="cpu", batch_size: int = 4,
                    scale: float = 1.0, shift: float = 0.0,
                    dtype=None) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a torch regression network as ``predict(x) -> y`` on numpy arrays.

    Parameters
    ----------
    model : torch.nn.Module
    target : int
        Output column to read.
    scale, shift : float
        Map the network's output to target units (``y = out * scale + shift``) when it was
        trained on a standardised target.
    dtype : torch.dtype, optional
        Autocast precision (e.g. ``torch.bfloat16``, what training uses on CPUs with AMX
        and on GPUs): the occlusion test makes hundreds of passes over the test set, and
        its baseline is computed with the same predictor, so increases stay comparable.

    Returns
    -------
    callable
        Takes ``(n, X, Y, Z)`` or ``(n, 1, X, Y, Z)`` float arrays, returns ``(n,)``.
    """
    import torch

    from ..model.training import predict_batches

    def predict(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 4:
            x = x[:, None]
        out = predict_batches(model, torch.from_numpy(x), batch_size=batch_size,
                              device=device, dtype=dtype)
        return out[:, target] * scale + shift

    return predict


def random_blob(brain_mask: np.ndarray, n_voxels: int, rng, zooms=(1.0, 1.0, 1.0),
                _coords=None) -> np.ndarray:
    """A compact blob of ``n_voxels`` brain voxels nearest a random brain voxel."""
    coords = _coords if _coords is not None else np.argwhere(brain_mask)
    if n_voxels > len(coords):
        raise DataError(
            f"a blob of {n_voxels} voxels does not fit in a brain mask of {len(coords)} voxels"
        )
    centre = coords[rng.integers(len(coords))]
    dist = (((coords - centre) * np.asarray(zooms)) ** 2).sum(axis=1)
    # random tie-breaking keeps blobs from always growing along the same axis
    dist = dist + rng.random(len(dist)) * 1e-3
    chosen = coords[np.argpartition(dist, n_voxels - 1)[:n_voxels]]
    blob = np.zeros(brain_mask.shape, dtype=bool)
    blob[tuple(chosen.T)] = True
    return blob


def _mae(predict, x, y):
    return float(np.mean(np.abs(predict(x) - y)))


def occlusion_test(predict: Callable, inputs: np.ndarray, y_true, roi_masks: np.ndarray,
                   fill: np.ndarray, brain_mask: np.ndarray, *, n_random: int = MIN_DRAWS,
                   seed: int = 0, zooms=(1.0, 1.0, 1.0), roi_names=None,
                   progress: bool = False):
    """Occlude each RoI and random same-volume blobs; compare the test MAE increases.

    Parameters
    ----------
    predict : callable
        ``predict((n, X, Y, Z)) -> (n,)`` in target units (see :func:`torch_predictor`).
    inputs : ndarray, shape (n, X, Y, Z)
        Test-set input maps.
    y_true : array-like, shape (n,)
    roi_masks : ndarray of bool, shape (R, X, Y, Z)
        Thresholded upsampled RoIs (:func:`brainage_xai.explain.rois.roi_masks`).
    fill : ndarray, shape (X, Y, Z)
        What occluded voxels become: the training mean map.
    brain_mask : ndarray of bool, shape (X, Y, Z)
        Where random blobs may lie.
    n_random : int
        Random blobs per RoI (at least 20).
    zooms : tuple of float
        Voxel size, so blobs are round in mm.
    progress : bool
        Show a progress bar over the RoIs (each is ``n_random + 1`` passes over the
        test set).

    Returns
    -------
    table : pandas.DataFrame
        One row per RoI: ``roi``, ``voxels``, ``mae_baseline``, ``mae_occluded``,
        ``mae_increase``, ``null_mean``, ``null_p95``, ``p_value`` (share of random blobs,
        with the RoI counted in, that hurt at least as much), ``above_null``.
    null : pandas.DataFrame
        ``roi``, ``draw``, ``mae_increase`` of every random blob.
    """
    x = np.asarray(inputs, dtype=np.float32)
    y = np.asarray(y_true, dtype=float)
    masks = np.asarray(roi_masks, dtype=bool)
    brain = np.asarray(brain_mask, dtype=bool)
    if n_random < MIN_DRAWS:
        raise DataError(f"n_random must be at least {MIN_DRAWS}; got {n_random}")
    if x.ndim != 4 or x.shape[0] != y.size:
        raise DataError(f"inputs have shape {x.shape}, expected ({y.size}, X, Y, Z)")
    if masks.ndim != 4 or masks.shape[1:] != x.shape[1:] or fill.shape != x.shape[1:]:
        raise DataError(
            f"RoI masks {masks.shape[1:]} and fill {fill.shape} must be on the input grid "
            f"{x.shape[1:]}"
        )
    names = roi_names or default_names(len(masks))
    rng = np.random.default_rng(seed)
    coords = np.argwhere(brain)
    fill = np.asarray(fill, dtype=np.float32)

    def occluded_mae(mask):
        xo = np.where(mask[None], fill[None], x)
        return _mae(predict, xo, y)

    import sys

    from tqdm.auto import tqdm

    base = _mae(predict, x, y)
    rows, null_rows = [], []
    bar = tqdm(list(zip(names, masks)), desc="occlusion test", unit="RoI",
               disable=not progress, file=sys.stderr)
    for name, mask in bar:
        n_vox = int(mask.sum())
        if n_vox == 0:
            # an all-zero column of U3 (a dead component): nothing to occlude
            warnings.warn(f"{name} is empty after thresholding; not occluded", stacklevel=2)
            rows.append({"roi": name, "voxels": 0, "volume_mm3": 0.0, "mae_baseline": base,
                         "mae_occluded": np.nan, "mae_increase": np.nan, "null_mean": np.nan,
                         "null_p95": np.nan, "p_value": np.nan, "above_null": False})
            continue
        increase = occluded_mae(mask) - base
        null = []
        for draw in range(n_random):
            blob = random_blob(brain, n_vox, rng, zooms, _coords=coords)
            null.append(occluded_mae(blob) - base)
            null_rows.append({"roi": name, "draw": draw, "mae_increase": null[-1]})
        null = np.asarray(null)
        p95 = float(np.percentile(null, 95))
        rows.append({
            "roi": name,
            "voxels": n_vox,
            "volume_mm3": n_vox * float(np.prod(zooms)),
            "mae_baseline": base,
            "mae_occluded": base + increase,
            "mae_increase": increase,
            "null_mean": float(null.mean()),
            "null_p95": p95,
            "p_value": float((1 + np.sum(null >= increase)) / (1 + null.size)),
            "above_null": bool(increase > p95),
        })
    return pd.DataFrame(rows), pd.DataFrame(null_rows)


