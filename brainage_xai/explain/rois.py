"""Regions of interest: spatial factor U3 -> feature-grid volumes -> template space.

Each column of the spatial factor ``U3`` (``v × R1``, ``v`` = feature voxels flattened in
C order, as ``activations.reshape(c, -1)`` flattens a ``(c, x, y, z)`` tensor) is one RoI
on the network's feature grid. To show it on the template it is upsampled (trilinear)
with the network's own stride geometry (:mod:`brainage_xai.imaging.geometry`).

What the explanations stage writes from here, all on the template (model input) grid:
the RoIs as a 4D image, one volume per RoI (:func:`roi_components`); each voxel labelled
with its strongest RoI (:func:`combined_dseg`, each RoI scaled to a peak of 1 first, as
the factor's column scale is arbitrary); and each RoI described by its overlap with an
atlas (:func:`atlas_overlap`, ``rois.tsv``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..bids.derivatives import roi_names
from ..errors import DataError
from ..imaging.geometry import FeatureGeometry, upsample

#: Fraction of its own peak above which a voxel belongs to an RoI (dseg, atlas overlap,
#: occlusion masks).
DEFAULT_THRESHOLD = 0.5


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
        ``region`` (the region holding most of the RoI; ``"<structure>, both sides"``
        when the other hemisphere's part of it is at least half as large), ``overlap`` (e.g.
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
                row["region"] = _region_name(names, shares)
                row["overlap"] = "; ".join(
                    f"{n} {100 * s:.0f}%" for n, s in zip(names, shares)
                )
        rows.append(row)
    return pd.DataFrame(rows)


def name_rois(components_img, atlases, threshold: float = DEFAULT_THRESHOLD, top: int = 3) -> pd.DataFrame:
    """:func:`atlas_overlap` by several atlases, finest first: each RoI is named by the first
    atlas whose region for it is not one of that atlas's catch-all labels.

    Parameters
    ----------
    components_img : 4D nibabel image (template grid)
    atlases : sequence of :class:`brainage_xai.imaging.atlas.NamingAtlas`
        ``name``, ``img``, ``labels`` and ``coarse`` (region names too broad to name an
        RoI by, such as the Harvard-Oxford subcortical atlas's "left cerebral cortex"); the
        last atlas names whatever the others leave.

    Returns
    -------
    pandas.DataFrame
        :func:`atlas_overlap`'s columns, and ``atlas``: the name of the atlas that named the
        row, after ``fraction_in_atlas``.
    """
    tables = [atlas_overlap(components_img, a.img, a.labels, threshold, top) for a in atlases]
    out = tables[-1].copy()
    out.insert(out.columns.get_loc("fraction_in_atlas") + 1, "atlas", atlases[-1].name)
    named = ["region", "overlap", "fraction_in_atlas"]
    for atlas, table in zip(atlases[-2::-1], tables[-2::-1]):
        fine = (table["region"] != "n/a") & ~table["region"].isin(list(atlas.coarse))
        out.loc[fine, named] = table.loc[fine, named]
        out.loc[fine, "atlas"] = atlas.name
    return out


#: An RoI is named by both sides of a structure when its smaller side holds at least this
#: share of the larger side's voxels (the simulated cohort's regions, and many ageing
#: effects, are bilateral).
BILATERAL_RATIO = 0.5
_SIDES = ("left ", "right ")


def _region_name(names: list, shares) -> str:
    """The region holding most of an RoI: ``"temporal lobe, both sides"`` when the other
    hemisphere's part of the same structure holds at least :data:`BILATERAL_RATIO` of
    it, else the region's own name."""
    first = str(names[0])
    for side, other in (_SIDES, _SIDES[::-1]):
        if first.startswith(side):
            twin = other + first[len(side):]
            share = dict(zip(names, shares))
            if twin in share and share[twin] >= BILATERAL_RATIO * share[first]:
                return f"{first[len(side):]}, both sides"
    return first


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
    "atlas": {"Description": "the atlas that named the row (region, overlap, fraction_in_atlas)",
              "Levels": {"HOSPA": "Harvard-Oxford subcortical atlas from TemplateFlow "
                         "(tpl-MNI152NLin2009cAsym atlas-HOSPA desc-th25), when it is on disk and "
                         "the RoI's region is not one of its whole-cortex, white-matter or "
                         "ventricle labels",
                         "Lobes": "the package's lobar atlas, otherwise"}},
}

#: Columns that the loadings' fits add to ``rois.tsv``.
RELATION_SIDECAR = {
    "cv_r2": {"Description": "share of the RoI's loadings' variance across subjects that the "
              "target predicts (cross-validated; loadings_vs_<target>.tsv)"},
    "target_related": {"Description": "cv_r2 is at least brainage_xai.explain.loadings.RELATED_R2 (0.5): most "
                       "of the component is the target. Otherwise it is a component of other "
                       "variation, which the linear model may still use as a correction"},
}

#: Columns of ``rois.tsv`` when the RoIs are a consensus (:mod:`brainage_xai.explain.consensus`).
CONSENSUS_SIDECAR = {
    "stability": {"Description": "share of the decompositions (networks x resamples of the training "
                  "subjects) that contain the RoI, matched one-to-one by spatial correlation"},
    "spread": {"Description": "median spatial correlation of the matched components with the RoI"},
    "robust": {"Description": "stability is at least brainage_xai.explain.consensus.ROBUST_STABILITY (0.7)"},
    "networks_with_roi": {"Description": "networks with at least one decomposition that contains the RoI"},
    "networks_relying": {"Description": "networks whose test MAE rises above the 95th percentile of "
                         "random blobs of the RoI's volume when the RoI is occluded (occlusion.tsv)"},
    "networks": {"Description": "networks in the consensus"},
}
