"""Faithfulness without ground truth: does occluding an RoI hurt the network?

For each RoI, the input maps inside it (the upsampled RoI thresholded at a fraction of its
peak) are replaced by the training mean map, and the network's test MAE is measured
again. The increase is compared with that of random compact blobs of about the same
volume inside the brain (at least 20 draws, shared by RoIs of similar volume and by every
network tested): an RoI the network relies on must hurt more than the 95th percentile of
the random blobs. This works on any cohort, real or simulated, because it needs only the
network and the test set.
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


#: RoIs whose thresholded volumes are within this factor of each other share one null:
#: the same random blobs (of their geometric-mean volume) for all of them and for every
#: network, so that the test costs ``RoIs + bins x draws`` passes per network instead of
#: ``RoIs x (draws + 1)``.
VOLUME_RATIO = 1.25

TABLE_COLUMNS = ["roi", "voxels", "volume_mm3", "null_voxels", "mae_baseline", "mae_occluded",
                 "mae_increase", "null_mean", "null_p95", "p_value", "above_null"]
NULL_COLUMNS = ["roi", "draw", "mae_increase"]
#: Column descriptions of ``occlusion.tsv`` and ``occlusion_null.tsv`` (their JSON sidecars).
TABLE_SIDECAR = {
    "network": {"Description": "The network tested (a consensus tests each of its networks)"},
    "roi": {"Description": "RoI name"},
    "voxels": {"Description": "Voxels of the RoI thresholded at half its peak (what is occluded)"},
    "volume_mm3": {"Description": "Their volume", "Units": "mm^3"},
    "null_voxels": {"Description": "Voxels of the random blobs the RoI is compared with"},
    "mae_baseline": {"Description": "Test MAE of the network on the intact maps"},
    "mae_occluded": {"Description": "Test MAE with the RoI replaced by the training mean map"},
    "mae_increase": {"Description": "mae_occluded - mae_baseline"},
    "null_mean": {"Description": "Mean MAE increase of the random blobs"},
    "null_p95": {"Description": "95th percentile of the random blobs' MAE increase"},
    "p_value": {"Description": "Share of random blobs, the RoI counted in, that raise the MAE at least as much"},
    "above_null": {"Description": "mae_increase is above null_p95: the network relies on the RoI"},
}
NULL_SIDECAR = {
    "network": TABLE_SIDECAR["network"],
    "roi": {"Description": "The RoI the blob is compared with (RoIs of similar volume share blobs)"},
    "draw": {"Description": "Random blob number"},
    "mae_increase": {"Description": "Test MAE increase when the blob is replaced by the training mean map"},
}


def volume_bins(voxels, ratio: float = VOLUME_RATIO) -> list[tuple[int, list[int]]]:
    """Group RoIs by volume: ``[(blob voxels, [RoI indices]), ...]`` (empty RoIs left out).

    Sorted by volume, an RoI joins the current bin while its volume is within ``ratio``
    of the bin's smallest; the bin's blobs have the geometric mean of its volumes.
    """
    order = [i for i in np.argsort(voxels, kind="stable") if voxels[i] > 0]
    bins: list[list[int]] = []
    for i in order:
        if bins and voxels[i] <= ratio * voxels[bins[-1][0]]:
            bins[-1].append(i)
        else:
            bins.append([i])
    return [(int(round(np.exp(np.mean(np.log([voxels[i] for i in b]))))), b) for b in bins]


def occlusion_test(predict, inputs: np.ndarray, y_true, roi_masks: np.ndarray,
                   fill: np.ndarray, brain_mask: np.ndarray, *, n_random: int = MIN_DRAWS,
                   seed: int = 0, zooms=(1.0, 1.0, 1.0), roi_names=None,
                   progress: bool = False, volume_ratio: float = VOLUME_RATIO):
    """Occlude each RoI and random blobs of its volume; compare the test MAE increases.

    Parameters
    ----------
    predict : callable or dict of str to callable
        ``predict((n, X, Y, Z)) -> (n,)`` in target units (see :func:`torch_predictor`);
        several networks as ``{name: predict}``, each tested on the same RoIs and blobs.
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
        Random blobs per volume bin (at least 20).
    zooms : tuple of float
        Voxel size, so blobs are round in mm.
    progress : bool
        Show a progress bar over the passes.
    volume_ratio : float
        RoIs within this factor of volume share one null (:func:`volume_bins`); 1 gives
        each volume its own.

    Returns
    -------
    table : pandas.DataFrame
        One row per RoI (and network, with a ``network`` column first when ``predict``
        is a dict): ``roi``, ``voxels``, ``volume_mm3``, ``null_voxels`` (the volume of
        its blobs), ``mae_baseline``, ``mae_occluded``, ``mae_increase``, ``null_mean``,
        ``null_p95``, ``p_value`` (share of random blobs, with the RoI counted in, that
        hurt at least as much), ``above_null``.
    null : pandas.DataFrame
        ``roi``, ``draw``, ``mae_increase`` of the blobs each RoI was compared with (the
        shared draws repeated per RoI), with ``network`` as in ``table``.
    """
    import sys

    from tqdm.auto import tqdm

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
    several = isinstance(predict, dict)
    predictors = predict if several else {None: predict}
    fill = np.asarray(fill, dtype=np.float32)
    voxels = [int(m.sum()) for m in masks]
    for name, n_vox in zip(names, voxels):
        if n_vox == 0:  # an all-zero column of U3 (a dead component): nothing to occlude
            warnings.warn(f"{name} is empty after thresholding; not occluded", stacklevel=2)
    bins = volume_bins(voxels, volume_ratio)
    rng = np.random.default_rng(seed)
    coords = np.argwhere(brain)
    blobs = [[random_blob(brain, size, rng, zooms, _coords=coords) for _ in range(n_random)]
             for size, _ in bins]
    bin_of = {i: b for b, (_, members) in enumerate(bins) for i in members}

    def occluded_mae(predict_one, mask):
        return _mae(predict_one, np.where(mask[None], fill[None], x), y)

    passes = len(predictors) * (1 + sum(v > 0 for v in voxels) + n_random * len(bins))
    bar = tqdm(total=passes, desc="occlusion test", unit="pass", disable=not progress, file=sys.stderr)
    rows, null_rows = [], []
    for network, predict_one in predictors.items():
        lead = {} if network is None else {"network": network}
        base = _mae(predict_one, x, y)
        bar.update()
        nulls = []
        for b in range(len(bins)):
            nulls.append(np.array([occluded_mae(predict_one, blob) - base for blob in blobs[b]]))
            bar.update(n_random)
        for r, (name, mask) in enumerate(zip(names, masks)):
            if voxels[r] == 0:
                rows.append({**lead, "roi": name, "voxels": 0, "volume_mm3": 0.0, "null_voxels": 0,
                             "mae_baseline": base, "mae_occluded": np.nan, "mae_increase": np.nan,
                             "null_mean": np.nan, "null_p95": np.nan, "p_value": np.nan,
                             "above_null": False})
                continue
            increase = occluded_mae(predict_one, mask) - base
            bar.update()
            null = nulls[bin_of[r]]
            p95 = float(np.percentile(null, 95))
            rows.append({
                **lead, "roi": name, "voxels": voxels[r], "volume_mm3": voxels[r] * float(np.prod(zooms)),
                "null_voxels": bins[bin_of[r]][0], "mae_baseline": base, "mae_occluded": base + increase,
                "mae_increase": increase, "null_mean": float(null.mean()), "null_p95": p95,
                "p_value": float((1 + np.sum(null >= increase)) / (1 + null.size)),
                "above_null": bool(increase > p95),
            })
            null_rows += [{**lead, "roi": name, "draw": d, "mae_increase": float(v)} for d, v in enumerate(null)]
    bar.close()
    lead_cols = [] if not several else ["network"]
    return (pd.DataFrame(rows, columns=lead_cols + TABLE_COLUMNS),
            pd.DataFrame(null_rows, columns=lead_cols + NULL_COLUMNS))
