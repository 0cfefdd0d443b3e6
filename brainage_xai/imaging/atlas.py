"""The atlases that name regions of interest, and the lobar atlas that ships with the package.

Regions of interest are named by their overlap with an atlas (:func:`naming_atlases`):
TemplateFlow's Harvard-Oxford subcortical atlas (``atlas-HOSPA``) when it is on disk, as
in the container images, and the package's own lobar atlas for the RoIs it does not name
finely (its whole-cortex and white-matter labels) or when it is absent, so that runs name
their RoIs offline too. The lobar atlas has 18 regions
(frontal, parietal, temporal and occipital lobes, insula, cingulate, deep grey matter
(basal ganglia and thalamus), cerebellum and brainstem, each left and right), drawn
from plain rules on MNI152NLin2009cAsym world coordinates (central sulcus, Sylvian
fissure, parieto-occipital line, tentorium, ellipsoids for the deep nuclei) intersected
with the brain mask that nilearn ships. The rules are coarse by design: the atlas names
RoIs whose own resolution is one to two centimetres, and it defines the planted regions
of the synthetic cohort (:mod:`brainage_xai.simulate`), so that ground truth has names.

The label image is generated deterministically by :func:`build_atlas` on nilearn's 1 mm
grid and stored in ``brainage_xai/data/atlas/``; ``python -m brainage_xai.imaging.atlas``
regenerates it, and a test checks that the shipped file equals the rules.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import DataError, MissingInputError

ATLAS_NAME = "Lobes"
ATLAS_FILE = "tpl-MNI152NLin2009cAsym_res-1_atlas-Lobes_dseg.nii.gz"
ATLAS_TABLE = "tpl-MNI152NLin2009cAsym_atlas-Lobes_dseg.tsv"

#: Structures in label order; label ``2 i + 1`` is the left, ``2 i + 2`` the right one.
STRUCTURES = (
    ("frontal", "frontal lobe"),
    ("parietal", "parietal lobe"),
    ("temporal", "temporal lobe"),
    ("occipital", "occipital lobe"),
    ("insula", "insula"),
    ("cingulate", "cingulate gyrus"),
    ("deepgrey", "deep grey matter (basal ganglia and thalamus)"),
    ("cerebellum", "cerebellum"),
    ("brainstem", "brainstem"),
)
HEMISPHERES = (("L", "left"), ("R", "right"))

# Ellipsoids (centre of the right one, radii) in mm for the deep grey nuclei.
_DEEP_NUCLEI = (
    ((13.0, 10.0, 10.0), (5.5, 13.0, 9.0)),  # caudate head and body
    ((23.0, 2.0, 0.0), (7.5, 15.0, 9.5)),  # putamen and pallidum
    ((11.0, -18.0, 7.0), (7.5, 11.5, 8.5)),  # thalamus
)


def atlas_table():
    """The names of the atlas labels.

    Returns
    -------
    pandas.DataFrame
        Columns ``index`` (label value, 1..18), ``name`` (e.g. ``"left frontal lobe"``),
        ``abbreviation`` (e.g. ``"frontal_L"``), ``structure`` and ``hemisphere``
        (``"L"``/``"R"``); the BIDS ``_dseg.tsv`` layout plus two columns.
    """
    import pandas as pd

    rows = []
    for i, (key, long) in enumerate(STRUCTURES):
        for j, (hemi, hemi_long) in enumerate(HEMISPHERES):
            rows.append(
                {
                    "index": 2 * i + 1 + j,
                    "name": f"{hemi_long} {long}",
                    "abbreviation": f"{key}_{hemi}",
                    "structure": key,
                    "hemisphere": hemi,
                }
            )
    return pd.DataFrame(rows)


def label_from_coordinates(xyz: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Apply the atlas rules to world coordinates.

    Parameters
    ----------
    xyz : ndarray of shape (3, ...)
        MNI world coordinates (mm) of voxel centres.
    mask : ndarray of bool, shape (...)
        Brain mask; voxels outside get label 0.

    Returns
    -------
    ndarray of uint8, shape (...)
        Atlas labels (see :func:`atlas_table`).
    """
    x, y, z = (np.asarray(c, dtype=np.float64) for c in xyz)
    ax = np.abs(x)
    right = x >= 0
    structure = np.full(x.shape, -1, dtype=np.int8)  # index into STRUCTURES
    free = np.asarray(mask, dtype=bool).copy()

    def assign(cond, key):
        idx = [k for k, _ in STRUCTURES].index(key)
        hit = free & cond
        structure[hit] = idx
        free[hit] = False

    # Order matters: small, well-delimited structures first, lobes take the rest.
    brainstem = (ax <= 11 - 0.08 * np.clip(-z - 10, 0, None)) & (y >= -44) & (y <= -10) & (z <= -6)
    assign(brainstem & (z >= -62), "brainstem")
    tentorium = -6.0 + 0.35 * (y + 38.0)  # the tentorium slopes down towards the back
    assign((y <= -38) & (z <= tentorium) & (ax <= 58), "cerebellum")
    deep = np.zeros(x.shape, dtype=bool)
    for (cx, cy, cz), (rx, ry, rz) in _DEEP_NUCLEI:
        deep |= ((ax - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((z - cz) / rz) ** 2 <= 1
    assign(deep, "deepgrey")
    assign(((ax - 38.0) / 6.0) ** 2 + ((y + 3.0) / 23.0) ** 2 + ((z - 3.0) / 15.0) ** 2 <= 1, "insula")
    cingulate = (ax <= 10) & (z >= -4) & (((y + 10.0) / 52.0) ** 2 + ((z - 18.0) / 25.0) ** 2 <= 1)
    assign(cingulate, "cingulate")
    assign(y <= -70 - 0.05 * z, "occipital")
    sylvian = -2.0 - 0.35 * y  # the Sylvian fissure rises towards the back
    assign((z <= sylvian) & (y <= 24) & (ax >= 20), "temporal")
    central = -8.0 - 0.45 * np.clip(z - 20.0, 0, None)  # central sulcus leans backwards
    assign(y >= central, "frontal")
    assign(np.ones(x.shape, dtype=bool), "parietal")

    labels = np.where(structure >= 0, 2 * structure.astype(np.int16) + 1 + right, 0)
    return labels.astype(np.uint8)


def build_atlas():
    """Generate the atlas on nilearn's 1 mm MNI152 grid (deterministic, offline).

    Returns
    -------
    nibabel.Nifti1Image
        uint8 label image, 197 x 233 x 189, origin (-98, -134, -72).
    """
    import nibabel as nib
    from nilearn import datasets

    mask_img = datasets.load_mni152_brain_mask(resolution=1)
    mask = np.asarray(mask_img.get_fdata()) > 0.5
    ijk = np.indices(mask.shape, dtype=np.float64)
    aff = mask_img.affine
    xyz = np.tensordot(aff[:3, :3], ijk, axes=1) + aff[:3, 3][:, None, None, None]
    labels = label_from_coordinates(xyz, mask)
    img = nib.Nifti1Image(labels, aff)
    img.header.set_xyzt_units("mm")
    img.header.set_intent("label")
    return img


def _data_dir():
    return resources.files("brainage_xai") / "data" / "atlas"


@functools.lru_cache(maxsize=1)
def _shipped_atlas():
    import nibabel as nib

    path = _data_dir() / ATLAS_FILE
    if not path.is_file():
        raise MissingInputError(
            f"the packaged atlas {ATLAS_FILE} is missing from {_data_dir()}; reinstall the package "
            "or run `python -m brainage_xai.imaging.atlas` to regenerate it"
        )
    with resources.as_file(path) as p:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj).astype(np.uint8)
    return nib.Nifti1Image(data, img.affine)


def _labels_on_grid(src, shape: tuple, affine: np.ndarray):
    """A label image on a grid (nearest neighbour; unchanged when already on it)."""
    import nibabel as nib
    from nilearn.image import resample_img

    if tuple(src.shape[:3]) == tuple(shape) and np.allclose(src.affine, affine):
        return src
    out = resample_img(
        src, target_affine=affine, target_shape=shape, interpolation="nearest",
        force_resample=True, copy_header=True,
    )
    img = nib.Nifti1Image(np.asarray(out.dataobj).astype(np.uint8), affine)
    img.header.set_xyzt_units("mm")
    return img


@functools.lru_cache(maxsize=8)
def _atlas_on_grid(shape: tuple, affine_bytes: bytes):
    affine = np.frombuffer(affine_bytes, dtype=np.float64).reshape(4, 4)
    return _labels_on_grid(_shipped_atlas(), shape, affine)


def _grid_of(target) -> tuple[tuple, np.ndarray]:
    if hasattr(target, "affine") and hasattr(target, "shape"):
        return tuple(int(n) for n in target.shape[:3]), np.asarray(target.affine, dtype=np.float64)
    from .templates import model_grid

    return model_grid(target)


def load_atlas(resolution_or_target_img=2):
    """The atlas on a grid.

    Parameters
    ----------
    resolution_or_target_img : float or nibabel image, default 2
        A voxel size in mm (the model grid of :func:`brainage_xai.imaging.templates.model_grid`,
        nilearn's MNI152 bounding box) or an image whose grid (first three dimensions)
        the atlas is resampled onto (nearest neighbour).

    Returns
    -------
    labels_img : nibabel.Nifti1Image
        uint8 labels on the requested grid.
    names_table : pandas.DataFrame
        See :func:`atlas_table`.
    """
    shape, affine = _grid_of(resolution_or_target_img)
    img = _atlas_on_grid(shape, np.ascontiguousarray(affine, dtype=np.float64).tobytes())
    return img, atlas_table()


@dataclass(frozen=True)
class NamingAtlas:
    """An atlas that names RoIs, on a grid.

    Attributes
    ----------
    name : {"HOSPA", "Lobes"}
        The atlas (the ``atlas`` column of ``rois.tsv``).
    img : nibabel.Nifti1Image
        uint8 labels on the grid asked for.
    labels : dict of int to str
        Label names, lower case (``"left thalamus"``, ``"left frontal lobe"``).
    description : str
        The atlas in words, for sidecars and reports.
    coarse : frozenset of str
        Region names too broad to name an RoI by (and their "..., both sides" forms): an
        RoI whose region is one of them is named by the next atlas
        (:func:`brainage_xai.explain.rois.name_rois`).
    """

    name: str
    img: object
    labels: dict
    description: str
    coarse: frozenset = frozenset()


HOSPA_DESCRIPTION = (
    "Harvard-Oxford subcortical atlas from TemplateFlow (tpl-MNI152NLin2009cAsym "
    "atlas-HOSPA, maximum-probability labels where a structure reaches 25 %)"
)
LOBES_DESCRIPTION = (
    "the package's lobar atlas (lobes, insula, cingulate, deep grey matter, cerebellum and "
    "brainstem of each side, drawn by rules on MNI coordinates)"
)
#: The Harvard-Oxford subcortical atlas's labels that cover a whole hemisphere's cortex,
#: white matter or ventricle: the lobe atlas says more about an RoI there.
HOSPA_COARSE = ("cerebral cortex", "cerebral white matter", "lateral ventric")


def _coarse_names(labels: dict) -> frozenset:
    names = {n for n in labels.values() if any(word in n for word in HOSPA_COARSE)}
    both = {f"{n.split(' ', 1)[1]}, both sides" for n in names if n.startswith(("left ", "right "))}
    return frozenset(names | both)


def naming_atlas_names(resolution=2) -> str:
    """The atlases :func:`naming_atlases` takes at ``resolution`` mm, without loading them:
    ``"HOSPA+Lobes"`` or ``"Lobes"``."""
    from .templates import ATLAS_NAME as TEMPLATEFLOW_ATLAS
    from .templates import templateflow_atlas

    return ATLAS_NAME if templateflow_atlas(resolution) is None else f"{TEMPLATEFLOW_ATLAS}+{ATLAS_NAME}"


def naming_atlases(target) -> list[NamingAtlas]:
    """The atlases that name RoIs on the grid of ``target``, finest first.

    TemplateFlow's Harvard-Oxford subcortical atlas when it is on disk
    (:func:`brainage_xai.imaging.templates.templateflow_atlas`), then the lobe atlas, which
    names the RoIs the former leaves (none there, or only its whole-cortex, white-matter or
    ventricle labels).

    Parameters
    ----------
    target : float or nibabel image
        A voxel size in mm (the model grid) or an image whose grid the labels go onto.
    """
    import nibabel as nib
    import pandas as pd

    from .templates import ATLAS_NAME as TEMPLATEFLOW_ATLAS
    from .templates import check_resolution, templateflow_atlas

    shape, affine = _grid_of(target)
    img, table = load_atlas(target)
    lobes = NamingAtlas(ATLAS_NAME, img, dict(zip(table["index"].astype(int), table["name"].astype(str))),
                        LOBES_DESCRIPTION)
    voxel = float(np.linalg.norm(affine[:3, 0]))
    found = templateflow_atlas(check_resolution(min(max(round(voxel), 1), 16)))
    if found is None:
        return [lobes]
    image_path, table_path = found
    src = nib.load(str(image_path))
    src = nib.Nifti1Image(np.asarray(src.dataobj).astype(np.uint8), src.affine)
    table = pd.read_csv(table_path, sep="\t", dtype={"name": str})
    if not {"index", "name"} <= set(table.columns):
        raise DataError(f"{table_path} has no 'index' and 'name' columns: {list(table.columns)}")
    # TemplateFlow's names carry stray spaces and capitals ("Left Cerebral Cortex ").
    labels = {int(i): " ".join(str(n).split()).lower() for i, n in zip(table["index"], table["name"]) if int(i) > 0}
    hospa = NamingAtlas(TEMPLATEFLOW_ATLAS, _labels_on_grid(src, shape, affine), labels, HOSPA_DESCRIPTION,
                        _coarse_names(labels))
    return [hospa, lobes]


def naming_atlas(target) -> NamingAtlas:
    """The first of :func:`naming_atlases`: TemplateFlow's when on disk, else the lobe atlas."""
    return naming_atlases(target)[0]


def describe_overlap(map_img, *, by="region"):
    """Fraction of a map's mass in each atlas region.

    Parameters
    ----------
    map_img : nibabel image, 3D (or 4D with one volume)
        A non-negative map in MNI space (an RoI, a saliency map, a mask); negative
        values count as zero.
    by : {"region", "structure"}, default "region"
        ``"structure"`` adds left and right together.

    Returns
    -------
    pandas.DataFrame
        One row per region with mass, sorted by ``mass_fraction`` (descending):
        ``index``, ``name``, ``abbreviation``, ``structure``, ``hemisphere``,
        ``mass_fraction`` (share of the map's total mass), ``region_fraction`` (share of
        the region's voxels where the map is non-zero). Mass outside every label is a
        row with ``index`` 0 and ``name`` ``"outside atlas"``. ``by="structure"`` keeps
        ``structure``, ``name``, ``mass_fraction`` and ``region_fraction``.
    """
    import pandas as pd

    if by not in ("region", "structure"):
        raise ValueError(f"'by' must be one of ['region', 'structure']. {by!r} was provided.")
    data = np.asarray(map_img.get_fdata(dtype=np.float32))
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"describe_overlap expects a 3D map; an image of shape {data.shape} arrived")
    data = np.nan_to_num(np.clip(data, 0, None), nan=0.0, posinf=0.0)
    labels_img, table = load_atlas(map_img)
    labels = np.asarray(labels_img.dataobj).astype(np.int64).ravel()
    flat = data.ravel().astype(np.float64)
    total = flat.sum()
    n_labels = int(table["index"].max()) + 1
    mass = np.bincount(labels, weights=flat, minlength=n_labels)
    covered = np.bincount(labels, weights=(flat > 0).astype(np.float64), minlength=n_labels)
    size = np.bincount(labels, minlength=n_labels)
    out = table.copy()
    idx = out["index"].to_numpy()
    out["mass"] = mass[idx]
    out["voxels"] = size[idx]
    out["covered"] = covered[idx]
    outside = {
        "index": 0, "name": "outside atlas", "abbreviation": "outside", "structure": "outside",
        "hemisphere": "n/a", "mass": mass[0], "voxels": size[0], "covered": covered[0],
    }
    out = pd.concat([out, pd.DataFrame([outside])], ignore_index=True)
    if by == "structure":
        out = out.groupby("structure", as_index=False, sort=False).agg(
            mass=("mass", "sum"), voxels=("voxels", "sum"), covered=("covered", "sum")
        )
        names = dict(STRUCTURES) | {"outside": "outside atlas"}
        out.insert(1, "name", out["structure"].map(names))
    out["mass_fraction"] = out["mass"] / total if total > 0 else 0.0
    out["region_fraction"] = out["covered"] / out["voxels"].clip(lower=1)
    out = out[out["mass"] > 0].sort_values("mass_fraction", ascending=False, kind="stable")
    return out.drop(columns=["mass", "voxels", "covered"]).reset_index(drop=True)


def write_atlas(folder=None) -> Path:
    """Write the generated atlas and its table into ``folder`` (default: package data)."""
    from ..utils.io import save_nifti, write_tsv

    folder = Path(folder) if folder is not None else Path(str(_data_dir()))
    save_nifti(build_atlas(), folder / ATLAS_FILE)
    write_tsv(folder / ATLAS_TABLE, atlas_table())
    return folder


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    print(write_atlas(sys.argv[1] if len(sys.argv) > 1 else None))
