"""Regions of interest: spatial factor U3 -> feature-grid volumes -> template space.

Each column of the spatial factor ``U3`` (``v × R1``, ``v`` = feature voxels flattened in
C order, as ``activations.reshape(c, -1)`` flattens a ``(c, x, y, z)`` tensor) is one RoI
on the network's feature grid. To show it on the template it is upsampled (trilinear)
with the network's own stride geometry: feature voxel ``j`` is centred on input voxel
``stride * j + offset``. Stretching the feature grid over the image instead (what
``torch.nn.functional.interpolate`` or a zoom does) misplaces the RoIs by up to half a
stride, which at 6 × 7 × 6 feature grids shifted correlations with planted regions by
0.1-0.15 in a first experiment.

Outputs (written by :func:`write_rois`), all on the template (model input) grid with its
affine:

- ``<prefix>_desc-rois_components.nii.gz``: 4D, one volume per RoI;
- ``<prefix>_desc-rois_dseg.nii.gz`` + ``.tsv``: each voxel labelled with its strongest RoI
  (each RoI scaled to a peak of 1 first, as the factor's column scale is arbitrary);
- ``rois.tsv``: each RoI described by its overlap with an atlas.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import DataError

#: Fraction of its own peak above which a voxel belongs to an RoI (dseg, atlas overlap,
#: occlusion masks).
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class FeatureGeometry:
    """Where the voxels of a feature grid sit on the input grid.

    Feature voxel ``j`` (per axis) is centred on input voxel ``stride * j + offset``.

    Parameters
    ----------
    input_shape, feature_shape : tuple of int
        Spatial shapes of the network input and of the feature map.
    stride, offset : tuple of float
        Per-axis total stride and offset (in input voxels).
    """

    input_shape: tuple[int, int, int]
    feature_shape: tuple[int, int, int]
    stride: tuple[float, float, float]
    offset: tuple[float, float, float]

    def feature_affine(self, input_affine: np.ndarray) -> np.ndarray:
        """The affine of the feature grid, given the affine of the input grid."""
        scale = np.eye(4)
        scale[:3, :3] = np.diag(self.stride)
        scale[:3, 3] = self.offset
        return np.asarray(input_affine, dtype=float) @ scale

    def to_dict(self) -> dict:
        return {
            "InputShape": list(self.input_shape),
            "FeatureShape": list(self.feature_shape),
            "Stride": list(self.stride),
            "Offset": list(self.offset),
        }


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
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        with torch.no_grad():
            model(torch.zeros((1, in_channels, *input_shape), device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
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


def _input_coords(geometry: FeatureGeometry, shape) -> list[np.ndarray]:
    """Feature-grid coordinates of every input voxel, per axis (broadcastable)."""
    coords = []
    for axis in range(3):
        idx = (np.arange(shape[axis]) - geometry.offset[axis]) / geometry.stride[axis]
        view = [1, 1, 1]
        view[axis] = -1
        coords.append(idx.reshape(view))
    return coords


def upsample(feature_maps: np.ndarray, geometry: FeatureGeometry, order: int = 1) -> np.ndarray:
    """Upsample maps on the feature grid to the input grid with the stride geometry.

    Parameters
    ----------
    feature_maps : ndarray, shape (..., fx, fy, fz)
    geometry : FeatureGeometry
    order : int
        Spline order (1: trilinear). Input voxels beyond the outermost feature-voxel
        centres take the edge value: the network saw them through that voxel.

    Returns
    -------
    ndarray, shape (..., X, Y, Z)
    """
    from scipy.ndimage import map_coordinates

    maps = np.asarray(feature_maps, dtype=np.float64)
    if tuple(maps.shape[-3:]) != tuple(geometry.feature_shape):
        raise DataError(
            f"feature maps have spatial shape {maps.shape[-3:]}, expected "
            f"{geometry.feature_shape}"
        )
    shape = geometry.input_shape
    grid = np.meshgrid(*[c.ravel() for c in _input_coords(geometry, shape)], indexing="ij")
    lead = maps.shape[:-3]
    flat = maps.reshape((-1, *maps.shape[-3:]))
    out = np.stack(
        [map_coordinates(vol, grid, order=order, mode="nearest") for vol in flat]
    )
    return out.reshape((*lead, *shape))


def downsample(volume: np.ndarray, geometry: FeatureGeometry) -> np.ndarray:
    """Average an input-grid volume over the footprint of each feature voxel.

    Each input voxel is assigned to the feature voxel whose centre is nearest, which is
    the inverse of :func:`upsample` in the sense used by the resolution ceiling.
    """
    vol = np.asarray(volume, dtype=np.float64)
    if tuple(vol.shape) != tuple(geometry.input_shape):
        raise DataError(f"volume has shape {vol.shape}, expected {geometry.input_shape}")
    idx = []
    for axis, c in enumerate(_input_coords(geometry, vol.shape)):
        j = np.clip(np.rint(c.ravel()), 0, geometry.feature_shape[axis] - 1).astype(int)
        idx.append(j)
    jx, jy, jz = np.meshgrid(*idx, indexing="ij")
    flat = np.ravel_multi_index((jx.ravel(), jy.ravel(), jz.ravel()), geometry.feature_shape)
    n = int(np.prod(geometry.feature_shape))
    sums = np.bincount(flat, weights=vol.ravel(), minlength=n)
    counts = np.bincount(flat, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    return means.reshape(geometry.feature_shape)


def upsampling_operator(geometry: FeatureGeometry, within=None):
    """:func:`upsample` (trilinear) as a sparse matrix from feature voxels to input voxels.

    Parameters
    ----------
    geometry : FeatureGeometry
    within : ndarray of bool, optional
        Keep only the rows of these input voxels.

    Returns
    -------
    scipy.sparse.csr_matrix, shape (input voxels (in ``within``), feature voxels)
        Both sides flattened in C order, so ``B @ f.ravel()`` equals
        ``upsample(f, geometry).ravel()``.
    """
    from scipy import sparse

    factors = []
    for axis, c in enumerate(_input_coords(geometry, geometry.input_shape)):
        n_f = geometry.feature_shape[axis]
        # map_coordinates' "nearest" mode: coordinates beyond the edge centres clamp
        c = np.clip(c.ravel(), 0, n_f - 1)
        lo = np.minimum(np.floor(c).astype(int), max(n_f - 2, 0))
        w = c - lo
        rows = np.arange(c.size)
        hi = np.minimum(lo + 1, n_f - 1)
        factors.append(sparse.csr_matrix(
            (np.concatenate([1 - w, w]), (np.concatenate([rows, rows]), np.concatenate([lo, hi]))),
            shape=(c.size, n_f)))
    op = sparse.kron(sparse.kron(factors[0], factors[1]), factors[2], format="csr")
    if within is not None:
        op = op[np.flatnonzero(np.asarray(within, dtype=bool).ravel())]
    return op


#: Feature voxels up to which the ceiling's NNLS runs on a dense Gram matrix.
_DENSE_CEILING_MAX = 4000


def resolution_ceiling(mask: np.ndarray, geometry: FeatureGeometry, within=None) -> float:
    """The best correlation with ``mask`` that an RoI on this feature grid can reach.

    The mask is taken down to the feature grid by a non-negative least-squares fit of the
    upsampled feature map to it (within ``within``) and back up with :func:`upsample`. A
    plain footprint average (:func:`downsample`) is not the inverse of the trilinear
    upsampling: on a 4 x 4 x 3 grid it gave ceilings 0.1-0.35 below RoIs the
    decomposition actually found.
    """
    from scipy.linalg import cho_factor, solve_triangular
    from scipy.optimize import lsq_linear, nnls

    target = np.asarray(mask, dtype=float)
    sel = np.ones(target.shape, bool) if within is None else np.asarray(within, dtype=bool)
    op = upsampling_operator(geometry, sel)
    if target[sel].min(initial=0.0) >= 0:
        # Only feature voxels whose footprint touches the region can be non-zero: the
        # operator and the target are non-negative, so for any other column j the
        # gradient B_j'(B f - m) = B_j' B f is >= 0 at every f >= 0, and f_j = 0 meets
        # the optimality (KKT) conditions of the full problem. Restricting to the rest is
        # exact and turns block2's 141,600 unknowns at 2 mm into about 2,000 per region.
        touching = np.flatnonzero(op.T @ target[sel] > 0)
        if touching.size == 0:  # the region lies outside `within`: nothing reaches it
            return spatial_correlation(target, np.zeros(target.shape), sel)
        op = op[:, touching]
    if op.shape[1] > _DENSE_CEILING_MAX:
        # large regions on fine grids: a dense Gram matrix would not fit
        fit = lsq_linear(op, target[sel], bounds=(0, np.inf), lsmr_tol="auto", tol=1e-8)
        back = np.zeros(target.shape)
        back[sel] = op @ fit.x
        return spatial_correlation(target, back, sel)
    # NNLS on the Cholesky factor of the small Gram matrix instead of the tall operator:
    # ||B f - m||^2 = ||L' f - L^-1 B' m||^2 + const, with feature voxels, not input
    # voxels, as rows. The ridge keeps feature voxels with no input voxel in `within`
    # (Gram row of zeros) from breaking the factorisation.
    gram = (op.T @ op).toarray()
    gram[np.diag_indices_from(gram)] += 1e-9 * max(gram.diagonal().max(), 1.0)
    chol, _ = cho_factor(gram, lower=True)
    rhs = solve_triangular(chol, op.T @ target[sel], lower=True)
    coef, _ = nnls(np.tril(chol).T, rhs, maxiter=50 * gram.shape[0])
    back = np.zeros(target.shape)
    back[sel] = op @ coef
    return spatial_correlation(target, back, sel)


def spatial_correlation(a: np.ndarray, b: np.ndarray, within=None) -> float:
    """Pearson correlation of two volumes over the voxels in ``within`` (all if None)."""
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if within is not None:
        sel = np.asarray(within, dtype=bool)
        a, b = a[sel], b[sel]
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    denom = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denom) if denom > 0 else 0.0


def columns_to_feature_maps(u3: np.ndarray, feature_shape) -> np.ndarray:
    """Reshape the columns of U3 (``v × R``) into ``(R, fx, fy, fz)`` feature maps."""
    u3 = np.asarray(u3, dtype=float)
    v = int(np.prod(feature_shape))
    if u3.ndim != 2 or u3.shape[0] != v:
        raise DataError(
            f"U3 has shape {u3.shape}, expected ({v}, R) for feature grid {tuple(feature_shape)}"
        )
    return u3.T.reshape((u3.shape[1], *feature_shape))


def roi_maps(u3, geometry: FeatureGeometry, mask=None) -> np.ndarray:
    """The columns of U3 upsampled to the input grid: ``(R, X, Y, Z)``, non-negative.

    ``mask`` (boolean, on the input grid) zeroes the voxels outside it.
    """
    maps = upsample(columns_to_feature_maps(u3, geometry.feature_shape), geometry)
    maps = np.clip(maps, 0, None)  # U3 >= 0; trilinear weights cannot create negatives
    if mask is not None:
        maps = maps * np.asarray(mask, dtype=bool)[None]
    return maps


def roi_components(u3, geometry: FeatureGeometry, template_img, mask=None):
    """The RoIs as a 4D image on the template grid (one volume per column of U3).

    Parameters
    ----------
    u3 : ndarray, shape (v, R)
    geometry : FeatureGeometry
    template_img : nibabel image
        Defines the grid and affine (the model input grid).
    mask : ndarray of bool, optional
        Brain mask on the template grid; voxels outside are set to 0.

    Returns
    -------
    nibabel.Nifti1Image, shape (X, Y, Z, R), float32
    """
    import nibabel as nib

    if tuple(template_img.shape[:3]) != tuple(geometry.input_shape):
        raise DataError(
            f"template grid {template_img.shape[:3]} differs from the network input grid "
            f"{geometry.input_shape}"
        )
    data = np.moveaxis(roi_maps(u3, geometry, mask), 0, -1).astype(np.float32)
    img = nib.Nifti1Image(data, template_img.affine)
    img.header.set_xyzt_units("mm")
    return img


def _normalised(data4d: np.ndarray) -> np.ndarray:
    peaks = data4d.reshape(-1, data4d.shape[-1]).max(axis=0)
    return data4d / np.where(peaks > 0, peaks, 1.0)


def roi_masks(components_img, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Boolean masks ``(R, X, Y, Z)``: voxels at or above ``threshold`` × the RoI's peak."""
    data = _normalised(np.asarray(components_img.dataobj, dtype=float))
    return np.moveaxis(data >= threshold, -1, 0) & np.moveaxis(data > 0, -1, 0)


def roi_names(n: int) -> list[str]:
    return [f"RoI {r + 1}" for r in range(n)]


def combined_dseg(components_img, threshold: float = 0.2):
    """Label each voxel with its strongest RoI (paper figures 3 and 6).

    RoIs are scaled to a peak of 1 first; voxels where no RoI reaches ``threshold``
    are background (0).

    Returns
    -------
    img : nibabel.Nifti1Image (int16)
    table : pandas.DataFrame
        BIDS ``dseg.tsv`` (``index``, ``name``, ``voxels``, ``volume_mm3``).
    """
    import nibabel as nib

    data = _normalised(np.asarray(components_img.dataobj, dtype=float))
    labels = (np.argmax(data, axis=-1) + 1).astype(np.int16)
    labels[data.max(axis=-1) < threshold] = 0
    img = nib.Nifti1Image(labels, components_img.affine)
    img.header.set_xyzt_units("mm")
    voxel_mm3 = float(abs(np.linalg.det(components_img.affine[:3, :3])))
    counts = np.bincount(labels.ravel(), minlength=data.shape[-1] + 1)
    table = pd.DataFrame(
        {
            "index": np.arange(1, data.shape[-1] + 1),
            "name": roi_names(data.shape[-1]),
            "voxels": counts[1:],
            "volume_mm3": counts[1:] * voxel_mm3,
        }
    )
    return img, table


def atlas_overlap(components_img, atlas_img=None, atlas_labels=None,
                  threshold: float = DEFAULT_THRESHOLD, top: int = 3) -> pd.DataFrame:
    """Describe each RoI by its peak and its overlap with the labels of an atlas.

    Parameters
    ----------
    components_img : 4D nibabel image (template grid)
    atlas_img : 3D integer label image, optional
        Resampled (nearest neighbour) onto the template grid if its grid differs.
    atlas_labels : dict of int to str, optional
        Label names; labels missing here are called ``label-<n>``.
    threshold : float
        The RoI is its voxels at or above this fraction of its peak.
    top : int
        How many atlas regions to name per RoI.

    Returns
    -------
    pandas.DataFrame
        One row per RoI: ``index``, ``name``, ``peak_x/y/z`` (mm), ``volume_mm3``,
        ``region`` (the region holding most of the RoI), ``overlap`` (e.g.
        ``"frontal 62%; parietal 30%"``), ``fraction_in_atlas``.
    """
    data = np.asarray(components_img.dataobj, dtype=float)
    masks = roi_masks(components_img, threshold)
    affine = components_img.affine
    voxel_mm3 = float(abs(np.linalg.det(affine[:3, :3])))
    atlas = None
    if atlas_img is not None:
        atlas = _atlas_on_grid(atlas_img, components_img)
    rows = []
    for r, mask in enumerate(masks):
        vol = data[..., r]
        peak = np.unravel_index(int(np.argmax(vol)), vol.shape)
        xyz = (affine @ np.array([*peak, 1.0]))[:3]
        row = {
            "index": r + 1,
            "name": roi_names(len(masks))[r],
            "peak_x": round(float(xyz[0]), 1),
            "peak_y": round(float(xyz[1]), 1),
            "peak_z": round(float(xyz[2]), 1),
            "volume_mm3": float(mask.sum() * voxel_mm3),
            "region": "n/a",
            "overlap": "n/a",
            "fraction_in_atlas": np.nan,
        }
        if atlas is not None and mask.any():
            labels = atlas[mask]
            inside = labels[labels > 0]
            row["fraction_in_atlas"] = round(float(inside.size / labels.size), 3)
            if inside.size:
                values, counts = np.unique(inside, return_counts=True)
                order = np.argsort(counts)[::-1][:top]
                names = [
                    (atlas_labels or {}).get(int(values[i]), f"label-{int(values[i])}")
                    for i in order
                ]
                shares = counts[order] / inside.size
                row["region"] = names[0]
                row["overlap"] = "; ".join(
                    f"{n} {100 * s:.0f}%" for n, s in zip(names, shares)
                )
        rows.append(row)
    return pd.DataFrame(rows)


def _atlas_on_grid(atlas_img, ref_img) -> np.ndarray:
    ref_shape = ref_img.shape[:3]
    if tuple(atlas_img.shape[:3]) == tuple(ref_shape) and np.allclose(
        atlas_img.affine, ref_img.affine, atol=1e-3
    ):
        return np.asarray(atlas_img.dataobj).astype(int)
    from nilearn.image import resample_img

    res = resample_img(
        atlas_img,
        target_affine=ref_img.affine,
        target_shape=ref_shape,
        interpolation="nearest",
        force_resample=True,
        copy_header=True,
    )
    return np.asarray(res.dataobj).astype(int)


ROIS_SIDECAR = {
    "index": {"Description": "RoI number: column of U3 (1-based), volume of the 4D RoI image"},
    "name": {"Description": "RoI name used in the report"},
    "peak_x": {"Description": "x of the RoI's peak voxel", "Units": "mm"},
    "peak_y": {"Description": "y of the RoI's peak voxel", "Units": "mm"},
    "peak_z": {"Description": "z of the RoI's peak voxel", "Units": "mm"},
    "volume_mm3": {
        "Description": "volume of the RoI thresholded at its threshold fraction of its peak",
        "Units": "mm^3",
    },
    "region": {"Description": "atlas region holding most of the thresholded RoI"},
    "overlap": {"Description": "largest atlas regions and their share of the thresholded RoI"},
    "fraction_in_atlas": {"Description": "share of the thresholded RoI inside any atlas label"},
}

#: Columns that :func:`write_explanations` adds to ``rois.tsv`` from the loadings' fits.
RELATION_SIDECAR = {
    "cv_r2": {"Description": "share of the RoI's loadings' variance across subjects that the "
              "target predicts (cross-validated; loadings_vs_<target>.tsv)"},
    "target_related": {"Description": "cv_r2 is at least brainage_xai.loadings.RELATED_R2 (0.5): most "
                       "of the component is the target. Otherwise it is a component of other "
                       "variation, which the linear model may still use as a correction"},
}


def write_rois(out_dir, u3, geometry: FeatureGeometry, template_img, *,
               prefix: str = "space-MNI152NLin2009cAsym_res-2",
               mask=None, atlas_img=None, atlas_labels=None,
               threshold: float = DEFAULT_THRESHOLD,
               layer: str | None = None) -> dict[str, Path]:
    """Write the RoI images and tables into ``out_dir`` (the ``group/`` folder).

    ``layer`` (the decomposed layer's name) goes into the components' JSON sidecar beside
    the feature geometry, so that the RoIs can be evaluated later without the run's log.

    Returns
    -------
    dict
        ``components``, ``dseg``, ``dseg_tsv``, ``rois_tsv`` paths and the in-memory
        ``components_img``, ``dseg_img`` and ``rois_table``.
    """
    from .utils.io import save_nifti, write_json, write_tsv

    out_dir = Path(out_dir)
    comps = roi_components(u3, geometry, template_img, mask=mask)
    dseg_img, dseg_table = combined_dseg(comps)
    table = atlas_overlap(comps, atlas_img, atlas_labels, threshold=threshold)
    paths = {
        "components": out_dir / f"{prefix}_desc-rois_components.nii.gz",
        "dseg": out_dir / f"{prefix}_desc-rois_dseg.nii.gz",
        "dseg_tsv": out_dir / f"{prefix}_desc-rois_dseg.tsv",
        "rois_tsv": out_dir / "rois.tsv",
    }
    save_nifti(comps, paths["components"])
    write_json(
        paths["components"].with_name(paths["components"].name.replace(".nii.gz", ".json")),
        {
            "Description": "RoIs: columns of the spatial factor U3 upsampled (trilinear) "
            "from the feature grid with the network's stride geometry; one volume per RoI",
            "FeatureGeometry": geometry.to_dict(),
            **({"Layer": layer} if layer is not None else {}),
        },
    )
    save_nifti(dseg_img, paths["dseg"])
    write_tsv(paths["dseg_tsv"], dseg_table)
    write_tsv(paths["rois_tsv"], table, sidecar=ROIS_SIDECAR)
    return {
        **paths,
        "components_img": comps,
        "dseg_img": dseg_img,
        "dseg_table": dseg_table,
        "rois_table": table,
    }


def write_explanations(group_dir, *, model, layer, u3, u1, inputs, table: pd.DataFrame,
                       template_img, mask=None, target: str = "age",
                       prefix: str = "space-MNI152NLin2009cAsym_res-2",
                       coefficients=None, scale: float = 1.0, shift: float = 0.0,
                       n_random: int = 20, seed: int = 0, device="cpu",
                       batch_size: int = 4, predict_batch_size: int | None = None,
                       loadings_file: str | None = "loadings.tsv",
                       progress: bool = False, dtype=None) -> dict:
    """Write every dataset-level explanation into ``group_dir`` and return the report parts.

    The one entry point for the group workflow: RoI images and tables, loadings against
    the target, the GradCAM baseline and the occlusion test.

    Parameters
    ----------
    group_dir : path
        The ``group/`` folder.
    model : torch.nn.Module
        The trained network (``PreActResNet3d`` or any 3D regressor).
    layer : str or torch.nn.Module
        The decomposed activation: a layer name of ``PreActResNet3d`` (``"block5"``), a
        module name of ``model``, or the module.
    u3 : ndarray, shape (v, R)
        Spatial factor of the final decomposition.
    u1 : ndarray, shape (n, R)
        Subject loadings, rows in the order of ``table`` and ``inputs``.
    inputs : ndarray, shape (n, X, Y, Z)
        The network's inputs (as it sees them: normalised), all subjects.
    table : DataFrame
        ``participant_id``, ``split`` (train/validation/test) and ``target``, one row per
        subject.
    template_img : nibabel image
        The model grid (affine of every output image).
    mask : ndarray of bool, optional
        Brain mask on the model grid (RoIs are zeroed outside; random blobs stay inside).
    scale, shift : float
        Network output to target units.
    coefficients : array-like, optional
        The linear model's per-RoI coefficients.
    batch_size : int
        Subjects per GradCAM pass (forward and backward, so memory grows fast with it).
    predict_batch_size : int, optional
        Subjects per forward pass of the occlusion test (default ``batch_size``); larger
        batches are faster on CPU and need no gradients.
    loadings_file : str or None
        Where the loadings table goes in ``group_dir``; None writes none (the group
        workflow keeps the selection stage's ``loadings.tsv``, which has the held-out
        loadings and the linear model's predictions too).
    progress : bool
        Progress bar over the occlusion test, the slowest part.
    dtype : torch.dtype, optional
        Autocast precision of the occlusion test's forward passes
        (:func:`brainage_xai.occlusion.torch_predictor`).

    Returns
    -------
    dict
        Report context entries: ``rois_img``, ``dseg_img``, ``rois_table``, ``loadings``,
        ``loading_fits``, ``gradcam_img``, ``occlusion`` (table, null), ``mask_img``,
        ``geometry``, and ``paths`` of the files written.
    """
    import nibabel as nib

    from . import gradcam as _gradcam
    from . import loadings as _loadings
    from . import occlusion as _occlusion
    from .utils.io import save_nifti, write_tsv

    group_dir = Path(group_dir)
    module = modules = layer
    if isinstance(layer, str) and hasattr(model, "activation_module") and layer in getattr(
        model, "layers", ()
    ):
        from .activations import layer_modules

        module = model.activation_module(layer)  # an ensemble: member 0's, for the grid
        modules = layer_modules(model, layer)
    x = np.asarray(inputs, dtype=np.float32)
    if x.ndim == 5:
        x = x[:, 0]
    if len(table) != x.shape[0] or np.asarray(u1).shape[0] != x.shape[0]:
        raise DataError(
            f"table has {len(table)} rows, inputs {x.shape[0]} and U1 "
            f"{np.asarray(u1).shape[0]}; expected one row per subject in each"
        )
    geometry = feature_geometry(model, module, x.shape[1:])
    if mask is None:
        mask = np.ones(x.shape[1:], dtype=bool)
    mask = np.asarray(mask, dtype=bool)
    from .atlas import load_atlas

    # The package ships its atlas, so RoIs are always named, offline too.
    atlas_img, names = load_atlas(template_img)
    atlas_labels = dict(zip(names["index"].astype(int), names["name"].astype(str)))
    out = write_rois(group_dir, u3, geometry, template_img, prefix=prefix, mask=mask,
                     atlas_img=atlas_img, atlas_labels=atlas_labels,
                     layer=layer if isinstance(layer, str) else None)
    paths = {k: v for k, v in out.items() if isinstance(v, Path)}

    names_r = roi_names(np.asarray(u1).shape[1])
    load = table[["participant_id", "split", target]].reset_index(drop=True).copy()
    for r, name in enumerate(names_r):
        load[name] = np.asarray(u1)[:, r]
    fits = _loadings.describe_loadings(load, load[target], roi_columns=names_r,
                                       coefficients=coefficients, target=target, seed=seed)
    if loadings_file is not None:
        paths["loadings"] = write_tsv(group_dir / loadings_file, load)
    paths["loading_fits"] = write_tsv(group_dir / f"loadings_vs_{target}.tsv", fits,
                                      sidecar=_loadings.FITS_SIDECAR)
    # rois.tsv: how much of each RoI is the target, beside where it is
    rois_table = out["rois_table"]
    rois_table["cv_r2"] = fits["cv_r2"].to_numpy()
    rois_table["target_related"] = fits["cv_r2"].to_numpy() >= _loadings.RELATED_R2
    write_tsv(out["rois_tsv"], rois_table, sidecar={**ROIS_SIDECAR, **RELATION_SIDECAR})

    cam_img, _ = _gradcam.average_gradcam(model, modules, list(x), geometry, template_img,
                                          mask=mask, batch_size=batch_size, device=device)
    paths["gradcam"] = save_nifti(cam_img, group_dir / f"{prefix}_desc-gradcam_map.nii.gz")

    split = table["split"].to_numpy()
    test = split == "test"
    train = split == "train"
    if not test.any() or not train.any():
        raise DataError("the occlusion test needs subjects in the 'train' and 'test' splits")
    predict = _occlusion.torch_predictor(model, device=device,
                                         batch_size=predict_batch_size or batch_size,
                                         scale=scale, shift=shift, dtype=dtype)
    zooms = tuple(float(z) for z in template_img.header.get_zooms()[:3])
    occ_table, null = _occlusion.occlusion_test(
        predict, x[test], table[target].to_numpy()[test], roi_masks(out["components_img"]),
        x[train].mean(axis=0), mask, n_random=n_random, seed=seed, zooms=zooms,
        progress=progress,
    )
    paths["occlusion"] = write_tsv(group_dir / "occlusion.tsv", occ_table)
    paths["occlusion_null"] = write_tsv(group_dir / "occlusion_null.tsv", null)
    return {
        "rois_img": out["components_img"],
        "dseg_img": out["dseg_img"],
        "rois_table": out["rois_table"],
        "loadings": load,
        "loading_fits": fits,
        "gradcam_img": cam_img,
        "occlusion": (occ_table, null),
        "mask_img": nib.Nifti1Image(mask.astype(np.uint8), template_img.affine),
        "geometry": geometry,
        "paths": paths,
    }
