"""The reference template, the atlas TemplateFlow ships for it, and the model grid.

MNI152NLin2009cAsym is the reference space. Its files come from TemplateFlow, through
TemplateFlow's own client (``TemplateFlowClient.get``, what ``templateflow.api.get``
calls, on ``$TEMPLATEFLOW_HOME``, default ``~/.cache/templateflow``), and only when they
are on disk: the client downloads a missing file on access, and a run never goes online,
so a file is asked for only after the client's index shows it there and non-empty
(TemplateFlow's skeleton and DataLad leave empty placeholders), with automatic updates and
DataLad off. When the template's T1w is not on disk at all, the ICBM 2009 template,
gray-matter map and brain mask that nilearn ships stand in for it; when it is there but
a file the app reads is not, the run stops with the file to fetch.

Each source keeps its own grid. TemplateFlow's is the bounding box of its
``tpl-MNI152NLin2009cAsym`` images (x -96..96, y -132..96, z -78..114 mm): 2 mm gives
its ``res-02`` grid (97 x 115 x 97), the grid fMRIPrep's ``res-2`` outputs are on, and
1 mm its ``res-01`` grid. nilearn's is the box of nilearn's MNI152 images (x -98..98,
y -134..98, z -72..116 mm; 99 x 117 x 95 at 2 mm). Other voxel sizes keep the box of the
source. A trained network is tied to its input grid, and its metadata records it, so a
model trained on one grid is refused on the other (:func:`brainage_xai.model.activations.check_model_grid`);
every output's sidecar says which grid it is on (:attr:`Template.grid`).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MissingInputError, UsageError

LOGGER = logging.getLogger("brainage_xai.templates")

TEMPLATE_NAME = "MNI152NLin2009cAsym"
SOURCES = ("templateflow", "nilearn")
#: World bounding box (mm, voxel centres: origin and extent) of each source's grid.
GRID_BOXES = {
    "templateflow": (np.array([-96.0, -132.0, -78.0]), np.array([192.0, 228.0, 192.0])),
    "nilearn": (np.array([-98.0, -134.0, -72.0]), np.array([196.0, 232.0, 188.0])),
}
#: TemplateFlow's ``res-`` indices the app reads (1 and 2 mm).
TEMPLATEFLOW_RESOLUTIONS = (1, 2)
#: The TemplateFlow files of the template, one query each (with ``resolution``).
TEMPLATE_QUERIES = {
    "t1": {"desc": None, "suffix": "T1w", "extension": ".nii.gz"},
    "mask": {"desc": "brain", "suffix": "mask", "extension": ".nii.gz"},
    "gm": {"label": "GM", "suffix": "probseg", "extension": ".nii.gz"},
}
#: The atlas that names RoIs when present: the Harvard-Oxford subcortical atlas, maximum
#: probability labels of the voxels where it reaches 25 % (FSL's ``thr25``).
ATLAS_NAME = "HOSPA"
ATLAS_QUERY = {"atlas": ATLAS_NAME, "desc": "th25", "suffix": "dseg", "extension": ".nii.gz"}
#: Its label names. TemplateFlow keeps the table only with tpl-MNI152NLin6Asym, the space
#: the atlas was drawn in; the tpl-MNI152NLin2009cAsym images carry the same labels.
ATLAS_LABELS = ("MNI152NLin6Asym", {"atlas": ATLAS_NAME, "suffix": "dseg", "extension": ".tsv"})


def templateflow_queries() -> list[tuple[str, dict]]:
    """Every TemplateFlow file the app can read, as ``(template, query)`` pairs.

    ``docker/fetch_templates.py`` fetches exactly these into an image.
    """
    queries = [
        (TEMPLATE_NAME, {"resolution": res, **query})
        for res in TEMPLATEFLOW_RESOLUTIONS
        for query in (*TEMPLATE_QUERIES.values(), ATLAS_QUERY)
    ]
    return [*queries, (ATLAS_LABELS[0], dict(ATLAS_LABELS[1]))]


@dataclass(frozen=True)
class Template:
    """A template on a model grid.

    Attributes
    ----------
    name : str
        Space label (``MNI152NLin2009cAsym``).
    source : {"templateflow", "nilearn"}
        Where the images came from, and so which grid they are on.
    resolution : float
        Voxel size of the grid in mm.
    t1 : nibabel.Nifti1Image
        T1-weighted template (float32).
    mask : nibabel.Nifti1Image
        Brain mask (uint8, 0/1).
    gm : nibabel.Nifti1Image
        Gray-matter probability map (float32, 0..1).
    description : str
        Human-readable origin, for sidecars and reports.
    """

    name: str
    source: str
    resolution: float
    t1: object
    mask: object
    gm: object
    description: str = ""

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.t1.shape[:3])

    @property
    def affine(self) -> np.ndarray:
        return self.t1.affine.copy()

    @property
    def grid(self) -> str:
        """The grid in words (:func:`grid_description`), for sidecars."""
        return grid_description(self.resolution, self.source)


#: Voxel sizes of the model grid, in whole mm (the ``res-`` label must be alphanumeric).
RESOLUTIONS = range(1, 17)


def check_resolution(resolution) -> int:
    """The one check of a model-grid voxel size (``--resolution``, the simulator, the grid).

    A whole number of mm from 1 to 16: the ``res-`` entity of every output name must be
    alphanumeric, and coarser grids leave no brain to explain.
    """
    try:
        number = float(resolution)
    except (TypeError, ValueError):
        number = None
    if number is None or not number.is_integer() or int(number) not in RESOLUTIONS:
        raise UsageError(
            f"resolution must be a whole number of mm from {RESOLUTIONS.start} to "
            f"{RESOLUTIONS.stop - 1}; {resolution!r} was provided"
        )
    return int(number)


def _check_source(source) -> str:
    if source not in SOURCES:
        raise ValueError(f"'source' must be one of {list(SOURCES)}. {source!r} was provided.")
    return source


def model_grid(resolution, source=None) -> tuple[tuple[int, int, int], np.ndarray]:
    """The model grid at ``resolution`` mm.

    Parameters
    ----------
    resolution : float
        Isotropic voxel size in mm.
    source : {"templateflow", "nilearn"}, optional
        Whose grid; default: that of the template :func:`get_template` finds now.

    Returns
    -------
    shape : tuple of int
        Grid shape; at 2 mm ``(97, 115, 97)`` (TemplateFlow) or ``(99, 117, 95)`` (nilearn).
    affine : ndarray of shape (4, 4)
        RAS affine with origin (-96, -132, -78) (TemplateFlow) or (-98, -134, -72) (nilearn).
    """
    resolution = check_resolution(resolution)
    source = template_source(resolution) if source is None else _check_source(source)
    origin, extent = GRID_BOXES[source]
    shape = tuple(int(n) for n in np.floor(extent / resolution + 1e-6).astype(int) + 1)
    affine = np.diag([resolution, resolution, resolution, 1.0])
    affine[:3, 3] = origin
    return shape, affine


def grid_description(resolution, source) -> str:
    """The grid of ``source`` at ``resolution`` mm in words, saying whose grid it is.

    A ``res-2`` label on nilearn's grid is not TemplateFlow's (fMRIPrep's) ``res-2``; the
    sidecars say so.
    """
    resolution = check_resolution(resolution)
    shape, affine = model_grid(resolution, _check_source(source))
    size = "x".join(str(n) for n in shape)
    origin = ", ".join(f"{v:g}" for v in affine[:3, 3])
    if source == "templateflow":
        whose = (
            f"TemplateFlow's tpl-{TEMPLATE_NAME} res-{resolution:02d} grid"
            if resolution in TEMPLATEFLOW_RESOLUTIONS
            else f"the bounding box of TemplateFlow's tpl-{TEMPLATE_NAME} grids"
        )
    else:
        tf_shape = "x".join(str(n) for n in model_grid(resolution, "templateflow")[0])
        whose = (
            f"nilearn's MNI152 grid, not TemplateFlow's {tf_shape} grid of the same voxel size"
        )
    return f"{resolution} mm isotropic, {size} voxels, origin ({origin}) mm: {whose}"


def templateflow_home() -> Path:
    """TemplateFlow's folder (``$TEMPLATEFLOW_HOME``, default ``~/.cache/templateflow``)."""
    return Path(os.environ.get("TEMPLATEFLOW_HOME", Path.home() / ".cache" / "templateflow"))


def _preferred(resolution: int) -> tuple[int, ...]:
    """TemplateFlow resolutions to read for a grid, the nearest to its voxel size first."""
    return (1, 2) if resolution < 2 else (2, 1)


def _on_disk(pattern: str, home: Path) -> bool:
    """Whether the template folder holds a non-empty file matching ``pattern``.

    Checked before the client is made: the client indexes its whole home (seconds), and
    unpacks TemplateFlow's skeleton into an empty one.
    """
    folder = home / f"tpl-{TEMPLATE_NAME}"
    return folder.is_dir() and any(p.stat().st_size > 0 for p in folder.glob(pattern))


@functools.lru_cache(maxsize=4)
def _client(home: str):
    from templateflow.client import TemplateFlowClient

    # No automatic update of the index and no DataLad: nothing that goes online.
    return TemplateFlowClient(root=home, autoupdate=False, use_datalad=False)


def _local(client, template: str, query: dict) -> Path | None:
    """The one file ``query`` selects, through ``client.get``, when it is on disk.

    The client downloads the files it selects that are missing or empty; asking it only
    for a file that is there and non-empty keeps it offline.
    """
    found = client.ls(template, **query)
    if len(found) != 1 or not found[0].is_file() or found[0].stat().st_size == 0:
        return None
    return Path(client.get(template, **query))


def _entities(res: int, query: dict) -> str:
    """A query in TemplateFlow's file-name words: ``res-02_desc-brain_mask``."""
    parts = [f"res-{res:02d}"] + [f"{k}-{v}" for k, v in query.items() if k in ("atlas", "label", "desc") and v]
    return "_".join([*parts, query["suffix"]])


def _fetch_hint(home: Path) -> str:
    return (
        f"fetch what is missing into TEMPLATEFLOW_HOME={home} (docker/fetch_templates.py lists and fetches "
        "every file the app reads), or point TEMPLATEFLOW_HOME elsewhere"
    )


@functools.lru_cache(maxsize=16)
def _template_files(resolution: int, home: str) -> dict[str, Path] | None:
    """TemplateFlow's files for the grid at ``resolution``, None when TemplateFlow lacks
    the template; :class:`MissingInputError` when only some of them are there."""
    home_path = Path(home)
    if not _on_disk(f"tpl-{TEMPLATE_NAME}_res-*_T1w.nii.gz", home_path):
        return None
    client = _client(home)
    missing = []
    for res in _preferred(resolution):
        files = {key: _local(client, TEMPLATE_NAME, {"resolution": res, **query})
                 for key, query in TEMPLATE_QUERIES.items()}
        if all(files.values()):
            return files
        missing.append(", ".join(_entities(res, TEMPLATE_QUERIES[key]) for key in files if files[key] is None))
    raise MissingInputError(
        f"TemplateFlow's tpl-{TEMPLATE_NAME} is in {home} but incomplete (missing "
        f"{' or '.join(missing)}): {_fetch_hint(home_path)}, to use nilearn's stand-in"
    )


def template_source(resolution=2) -> str:
    """``"templateflow"`` when TemplateFlow's files for the grid are on disk, else ``"nilearn"``."""
    resolution = check_resolution(resolution)
    return "nilearn" if _template_files(resolution, str(templateflow_home())) is None else "templateflow"


def templateflow_atlas(resolution=2) -> tuple[Path, Path] | None:
    """TemplateFlow's Harvard-Oxford subcortical atlas when it is on disk.

    Returns
    -------
    (labels_image, labels_table) : tuple of Path, or None
        The ``atlas-HOSPA_desc-th25_dseg`` image at the TemplateFlow resolution closest to
        ``resolution`` and its ``_dseg.tsv``; None when no such image is on disk.
    """
    resolution = check_resolution(resolution)
    home = templateflow_home()
    pattern = f"tpl-{TEMPLATE_NAME}_res-*_atlas-{ATLAS_NAME}_desc-th25_dseg.nii.gz"
    if not _on_disk(pattern, home):
        return None
    client = _client(str(home))
    image = next((p for res in _preferred(resolution)
                  if (p := _local(client, TEMPLATE_NAME, {"resolution": res, **ATLAS_QUERY}))), None)
    table = _local(client, *ATLAS_LABELS)
    if image is None or table is None:
        what = f"its label table (tpl-{ATLAS_LABELS[0]}_atlas-{ATLAS_NAME}_dseg.tsv)" if table is None else "its image"
        raise MissingInputError(f"TemplateFlow's {ATLAS_NAME} atlas in {home} lacks {what}: {_fetch_hint(home)}")
    return image, table


def _resample(img, shape, affine, interpolation):
    import nibabel as nib
    from nilearn.image import resample_img

    # float input: nilearn warns about (and mishandles) integer masks resampled linearly.
    img = nib.Nifti1Image(np.asarray(img.get_fdata(dtype=np.float32)), img.affine)
    with warnings.catch_warnings():
        # Linear resampling of a 0/1 mask is intended: it is cut at 0.5 afterwards.
        warnings.filterwarnings("ignore", message="Resampling binary images")
        out = resample_img(
            img,
            target_affine=affine,
            target_shape=shape,
            interpolation=interpolation,
            force_resample=True,
            copy_header=True,
        )
    return np.asarray(out.get_fdata(dtype=np.float32))


def _build(t1, mask, gm, resolution, source, description) -> Template:
    import nibabel as nib

    shape, affine = model_grid(resolution, source)
    # Linear interpolation: smooth templates need no spline, and it is several times faster.
    t1_data = _resample(t1, shape, affine, "linear")
    gm_data = np.clip(_resample(gm, shape, affine, "linear"), 0, 1)
    # A mask resampled linearly and cut at 0.5 keeps its volume at any voxel size.
    mask_data = (_resample(mask, shape, affine, "linear") >= 0.5).astype(np.uint8)

    def img(data, dtype):
        out = nib.Nifti1Image(data.astype(dtype), affine)
        out.header.set_xyzt_units("mm")
        return out

    return Template(
        name=TEMPLATE_NAME,
        source=source,
        resolution=resolution,
        t1=img(t1_data, np.float32),
        mask=img(mask_data, np.uint8),
        gm=img(gm_data, np.float32),
        description=description,
    )


@functools.lru_cache(maxsize=8)
def _get_template(resolution: int, home: str, source: str) -> Template:
    import nibabel as nib

    if source == "templateflow":
        files = _template_files(resolution, home)
        try:
            imgs = {k: nib.load(str(p)) for k, p in files.items()}
            for im in imgs.values():
                im.get_fdata(dtype=np.float32)  # a truncated file fails here, not later
        except Exception as exc:
            raise MissingInputError(
                f"TemplateFlow's files in {home} are unreadable ({exc}): {_fetch_hint(Path(home))}"
            ) from exc
        return _build(
            imgs["t1"], imgs["mask"], imgs["gm"], resolution, "templateflow",
            f"TemplateFlow tpl-{TEMPLATE_NAME} ({files['t1'].name}, {files['t1'].parent})",
        )
    from nilearn import datasets

    # resolution=1 loads the shipped 1 mm files as they are (no network).
    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    return _build(
        t1, mask, gm, resolution, "nilearn",
        "ICBM 2009 nonlinear template, T1, gray matter and brain mask as shipped with nilearn",
    )


@functools.lru_cache(maxsize=16)
def _say_fallback(resolution: int, home: str) -> None:
    LOGGER.info(
        "TemplateFlow's tpl-%s is not in %s: the template is nilearn's ICBM 2009 stand-in, on %s",
        TEMPLATE_NAME, home, grid_description(resolution, "nilearn"),
    )


def get_template(resolution=2, source=None) -> Template:
    """The MNI152NLin2009cAsym template on the model grid at ``resolution`` mm.

    Parameters
    ----------
    resolution : float
        Voxel size in mm.
    source : {"templateflow", "nilearn"}, optional
        Default: TemplateFlow's files when they are on disk, else nilearn's stand-in.
        ``"nilearn"`` always takes nilearn's (the simulated cohort is built on it);
        ``"templateflow"`` fails when TemplateFlow's files are not there.

    Returns
    -------
    Template
        T1, brain mask and GM map on :func:`model_grid` ``(resolution, source)``; cached
        per resolution, source and ``TEMPLATEFLOW_HOME``.
    """
    resolution = check_resolution(resolution)
    home = templateflow_home()
    found = template_source(resolution)
    if source is None:
        source = found
        if source == "nilearn":
            _say_fallback(resolution, str(home))
    elif _check_source(source) == "templateflow" and found != "templateflow":
        raise MissingInputError(
            f"TemplateFlow's tpl-{TEMPLATE_NAME} is not in {home}: {_fetch_hint(home)}"
        )
    return _get_template(resolution, str(home), source)
