"""The reference template and the model grid.

MNI152NLin2009cAsym is the reference space. TemplateFlow's files are used only when they
are already on disk (``$TEMPLATEFLOW_HOME``, default ``~/.cache/templateflow``): the
TemplateFlow client downloads missing files on access, and a run must never touch the
network, so this module reads the files with nibabel after checking that they are real
files (DataLad leaves empty placeholders). Otherwise the ICBM 2009 template, gray-matter
map and brain mask that nilearn ships stand in for it.

Whatever the source, every image is resampled onto one model grid per resolution: the
bounding box of nilearn's MNI152 grid (x -98..98, y -134..98, z -72..116 mm) at the
requested voxel size, so 2 mm gives nilearn's 99 x 117 x 95 grid. A trained network is
tied to its input grid, so the grid must not depend on which template happened to be
installed.
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
#: World bounding box (mm, voxel centres) of the model grid: nilearn's MNI152 grid.
GRID_ORIGIN = np.array([-98.0, -134.0, -72.0])
GRID_EXTENT = np.array([196.0, 232.0, 188.0])


@dataclass(frozen=True)
class Template:
    """A template on a model grid.

    Attributes
    ----------
    name : str
        Space label (``MNI152NLin2009cAsym``).
    source : {"templateflow", "nilearn"}
        Where the images came from.
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


def model_grid(resolution) -> tuple[tuple[int, int, int], np.ndarray]:
    """The model grid at ``resolution`` mm.

    Parameters
    ----------
    resolution : float
        Isotropic voxel size in mm.

    Returns
    -------
    shape : tuple of int
        Grid shape; ``(99, 117, 95)`` at 2 mm.
    affine : ndarray of shape (4, 4)
        RAS affine with origin (-98, -134, -72).
    """
    resolution = check_resolution(resolution)
    shape = tuple(int(n) for n in np.floor(GRID_EXTENT / resolution + 1e-6).astype(int) + 1)
    affine = np.diag([resolution, resolution, resolution, 1.0])
    affine[:3, 3] = GRID_ORIGIN
    return shape, affine


def templateflow_home() -> Path:
    """TemplateFlow's folder, without importing the client (which may go online)."""
    return Path(os.environ.get("TEMPLATEFLOW_HOME", Path.home() / ".cache" / "templateflow"))


def _templateflow_files(resolution: float) -> dict[str, Path] | None:
    """Local TemplateFlow files at the finest stored resolution that suits, if complete."""
    folder = templateflow_home() / f"tpl-{TEMPLATE_NAME}"
    prefer = ("01", "02") if resolution < 2 else ("02", "01")
    for res in prefer:
        files = {
            "t1": folder / f"tpl-{TEMPLATE_NAME}_res-{res}_T1w.nii.gz",
            "mask": folder / f"tpl-{TEMPLATE_NAME}_res-{res}_desc-brain_mask.nii.gz",
            "gm": folder / f"tpl-{TEMPLATE_NAME}_res-{res}_label-GM_probseg.nii.gz",
        }
        # Empty files are DataLad/TemplateFlow placeholders: using them would need a download.
        if all(p.is_file() and p.stat().st_size > 0 for p in files.values()):
            return files
    return None


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

    shape, affine = model_grid(resolution)
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
def _get_template(resolution: float, home: str) -> Template:
    import nibabel as nib

    files = _templateflow_files(resolution)
    if files is not None:
        try:
            imgs = {k: nib.load(str(p)) for k, p in files.items()}
            for im in imgs.values():
                im.get_fdata(dtype=np.float32)  # a truncated file fails here, not later
            return _build(
                imgs["t1"], imgs["mask"], imgs["gm"], resolution, "templateflow",
                f"TemplateFlow tpl-{TEMPLATE_NAME} ({files['t1'].parent})",
            )
        except Exception as exc:  # corrupt local copy: fall back rather than fail the run
            LOGGER.warning("TemplateFlow files in %s unusable (%s); using nilearn's template", home, exc)
    try:
        from nilearn import datasets
    except ImportError as exc:  # pragma: no cover - nilearn is a dependency
        raise MissingInputError("no MNI152 template: TemplateFlow files absent and nilearn missing") from exc
    # resolution=1 loads the shipped 1 mm files as they are (no network).
    t1 = datasets.load_mni152_template(resolution=1)
    gm = datasets.load_mni152_gm_template(resolution=1)
    mask = datasets.load_mni152_brain_mask(resolution=1)
    return _build(
        t1, mask, gm, resolution, "nilearn",
        "ICBM 2009 nonlinear template, T1, gray matter and brain mask as shipped with nilearn",
    )


def get_template(resolution=2) -> Template:
    """The MNI152NLin2009cAsym template on the model grid at ``resolution`` mm.

    Parameters
    ----------
    resolution : float
        Voxel size in mm.

    Returns
    -------
    Template
        T1, brain mask and GM map on :func:`model_grid` ``(resolution)``; cached per
        resolution and ``TEMPLATEFLOW_HOME``.
    """
    resolution = check_resolution(resolution)
    return _get_template(resolution, str(templateflow_home()))
