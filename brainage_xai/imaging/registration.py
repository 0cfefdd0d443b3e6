"""Is a map really in MNI space? The registration check of the participant level.

MNI grids differ between sources (TemplateFlow, nilearn, FSL), so grid equality means
nothing: the check works in world coordinates. The map is resampled onto the template's
model grid and compared with the template there:

- the declared space (``space-`` entity) must be MNI152NLin2009cAsym, or another MNI152
  space with ``--allow-resample``;
- the affine must be invertible, with voxel sizes between 0.25 and 10 mm (orientation,
  as axis codes, is reported; any orientation is fine once resampled);
- **Dice** overlap of the map's support (voxels above 20 % of its 99th percentile) with
  the template's reference region (GM > 0.2 for the ``volume`` map, the brain mask for
  ``stiffness``) must be at least :data:`MIN_DICE`;
- Pearson **correlation** of the map with the template reference image (GM probability
  or brain mask) over the grid must be at least :data:`MIN_CORRELATION`;
- the centre of the map's support must lie within :data:`MAX_CENTROID_OFFSET` mm of the
  reference region's centre (overlap measures change slowly for a blob-shaped stiffness
  map; the centre moves by the full shift);
- the map's field of view must cover at least :data:`MIN_COVERAGE` of the template brain.

A shifted, flipped or mislabelled map fails with these numbers in the message; a map
warped by a small residual deformation (the synthetic cohort's imperfect registration)
passes. Measured on template-derived maps at 4 mm: an exact map has Dice > 0.95,
correlation > 0.95 and offset < 1 mm; an 8 mm shift gives offset 8 mm (Dice 0.76/0.91,
correlation 0.71/0.88 for volume/stiffness); an anterior-posterior flip gives offset
8-11 mm, a superior-inferior flip 25-30 mm. A left-right flip of a near-symmetric brain
cannot be detected from the image alone.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError

LOGGER = logging.getLogger("brainage_xai.registration")

MIN_DICE = 0.6
MIN_CORRELATION = 0.5
MIN_COVERAGE = 0.9
MAX_CENTROID_OFFSET = 6.0  # mm
VOXEL_SIZE_RANGE = (0.25, 10.0)
SUPPORT_FRACTION = 0.2  # of the 99th percentile: what counts as "inside the map"
TEMPLATE_SPACE = "MNI152NLin2009cAsym"


def load_map(path) -> object:
    """Load a map as a 3D float32 NIfTI image, refusing unusable files.

    Parameters
    ----------
    path : path-like
        A ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    nibabel.Nifti1Image
        3D, finite, float32.

    Raises
    ------
    DataError
        Truncated or corrupt file, not 3D (a 4D image with one volume is accepted),
        NaN or infinite voxels, or an all-zero map.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as exc:  # nibabel/gzip/zlib raise many kinds for a damaged file
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataError(f"cannot read {path.name}: truncated or corrupt image ({reason})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path.name} must be a 3D map; it has shape {tuple(data.shape)}")
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise DataError(f"{path.name} has {bad} NaN or infinite voxel(s) of {data.size}")
    if not np.any(data):
        raise DataError(f"{path.name} is all zeros")
    out = nib.Nifti1Image(data, img.affine)
    out.header.set_xyzt_units("mm")
    return out


@dataclass
class RegistrationCheck:
    """The measured numbers of one map's registration check.

    Attributes
    ----------
    declared_space : str or None
        The ``space-`` entity of the file.
    orientation : str
        Axis codes of the affine (e.g. ``"RAS"``).
    voxel_size : list of float
        Voxel sizes in mm.
    shape : list of int
        The map's grid shape.
    dice : float
        Overlap of the map's support with the template reference region.
    correlation : float
        Pearson correlation with the template reference image.
    coverage : float
        Fraction of the template brain inside the map's field of view.
    failures : list of str
        Why it failed; empty when it passed.
    """

    declared_space: str | None
    orientation: str
    voxel_size: list[float]
    shape: list[int]
    dice: float = float("nan")
    correlation: float = float("nan")
    coverage: float = float("nan")
    centroid_offset: float = float("nan")
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        """BIDS-style keys for the JSON sidecar."""
        d = asdict(self)
        return {
            "DeclaredSpace": d["declared_space"],
            "Orientation": d["orientation"],
            "VoxelSize": [round(v, 4) for v in d["voxel_size"]],
            "Shape": d["shape"],
            "Dice": round(float(d["dice"]), 4),
            "Correlation": round(float(d["correlation"]), 4),
            "Coverage": round(float(d["coverage"]), 4),
            "CentroidOffsetMM": round(float(d["centroid_offset"]), 2),
            "Thresholds": {
                "Dice": MIN_DICE,
                "Correlation": MIN_CORRELATION,
                "Coverage": MIN_COVERAGE,
                "CentroidOffsetMM": MAX_CENTROID_OFFSET,
            },
            "Passed": self.passed,
        }

    def summary(self) -> str:
        """One line with every measured number."""
        return (
            f"declared space {self.declared_space or 'none'}, orientation {self.orientation}, "
            f"voxel {'x'.join(f'{v:.3g}' for v in self.voxel_size)} mm, "
            f"Dice {self.dice:.2f} (min {MIN_DICE}), correlation {self.correlation:.2f} "
            f"(min {MIN_CORRELATION}), centre offset {self.centroid_offset:.1f} mm "
            f"(max {MAX_CENTROID_OFFSET:g}), coverage {self.coverage:.2f} (min {MIN_COVERAGE})"
        )


def resample_to_template(img, template, interpolation="continuous"):
    """Resample ``img`` onto the template's grid (world coordinates; 0 outside its FOV)."""
    import nibabel as nib
    from nilearn.image import resample_img

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        out = resample_img(
            img,
            target_affine=template.affine,
            target_shape=template.shape,
            interpolation=interpolation,
            fill_value=0,
            force_resample=True,
            copy_header=True,
        )
    return nib.Nifti1Image(np.asarray(out.get_fdata(dtype=np.float32)), template.affine)


def _fov_coverage(img, template) -> float:
    """Fraction of template-brain voxels whose world position lies inside the map's grid."""
    mask = np.asarray(template.mask.dataobj) > 0
    ijk = np.argwhere(mask)
    xyz = ijk @ template.affine[:3, :3].T + template.affine[:3, 3]
    inv = np.linalg.inv(img.affine)
    vox = xyz @ inv[:3, :3].T + inv[:3, 3]
    shape = np.array(img.shape[:3])
    inside = np.all((vox >= -0.5) & (vox <= shape - 0.5), axis=1)
    return float(inside.mean()) if len(inside) else 0.0


def check_registration(img, template, *, declared_space, map_name="volume", allow_other_mni=False):
    """Measure how well ``img`` sits in the template's space.

    Parameters
    ----------
    img : nibabel.Nifti1Image
        A map from :func:`load_map`.
    template : brainage_xai.imaging.templates.Template
        The template on the model grid.
    declared_space : str or None
        The file's ``space-`` entity.
    map_name : {"volume", "stiffness"}
        Chooses the reference: template GM for ``volume``, brain mask for ``stiffness``.
    allow_other_mni : bool
        Accept a declared MNI152 space other than MNI152NLin2009cAsym.

    Returns
    -------
    check : RegistrationCheck
        The numbers and, when it failed, why.
    resampled : nibabel.Nifti1Image or None
        The map on the template grid (``None`` when the affine is unusable).
    """
    import nibabel as nib

    affine = np.asarray(img.affine, dtype=float)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    try:
        orientation = "".join(nib.aff2axcodes(affine))
    except Exception:  # degenerate affine
        orientation = "???"
    check = RegistrationCheck(
        declared_space=declared_space,
        orientation=orientation,
        voxel_size=[float(z) for z in zooms],
        shape=[int(s) for s in img.shape[:3]],
    )
    if declared_space != TEMPLATE_SPACE:
        if not declared_space:
            check.failures.append("no declared space (space- entity)")
        elif not str(declared_space).startswith("MNI152"):
            check.failures.append(f"declared space {declared_space} is not an MNI152 space")
        elif not allow_other_mni:
            check.failures.append(
                f"declared space {declared_space} is not {TEMPLATE_SPACE} (--allow-resample accepts it)"
            )
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 or "?" in orientation:
        check.failures.append("affine is not invertible")
        return check, None
    lo, hi = VOXEL_SIZE_RANGE
    if np.any(zooms < lo) or np.any(zooms > hi):
        check.failures.append(f"voxel size outside {lo}-{hi} mm")

    resampled = resample_to_template(img, template)
    data = np.asarray(resampled.dataobj, dtype=np.float32)
    brain = np.asarray(template.mask.dataobj) > 0
    gm = np.asarray(template.gm.dataobj, dtype=np.float32)
    if map_name == "volume":
        reference, region = gm, gm > 0.2
    else:
        reference, region = brain.astype(np.float32), brain
    positive = data[data > 0]
    threshold = SUPPORT_FRACTION * float(np.percentile(positive, 99)) if positive.size else np.inf
    support = data > threshold
    denom = support.sum() + region.sum()
    check.dice = float(2 * np.logical_and(support, region).sum() / denom) if denom else 0.0
    if data.std() > 0:
        check.correlation = float(np.corrcoef(data.ravel(), reference.ravel())[0, 1])
    else:
        check.correlation = 0.0
    check.coverage = _fov_coverage(img, template)
    if support.any():
        # Centre of the map's support against that of the reference region, in mm:
        # a shifted or flipped map moves it even when overlap measures stay high.
        to_mm = template.affine[:3, :3]
        offset = to_mm @ (np.argwhere(support).mean(axis=0) - np.argwhere(region).mean(axis=0))
        check.centroid_offset = float(np.linalg.norm(offset))

    if check.coverage < MIN_COVERAGE:
        check.failures.append(f"field of view covers {check.coverage:.0%} of the template brain")
    if check.dice < MIN_DICE:
        check.failures.append(f"Dice {check.dice:.2f} < {MIN_DICE}")
    if not check.correlation >= MIN_CORRELATION:
        check.failures.append(f"correlation {check.correlation:.2f} < {MIN_CORRELATION}")
    if not check.centroid_offset <= MAX_CENTROID_OFFSET:
        check.failures.append(f"centre offset {check.centroid_offset:.1f} mm > {MAX_CENTROID_OFFSET:g} mm")
    return check, resampled


def normalise_intensity(resampled, template, map_name="volume"):
    """Proportional scaling: divide by the mean inside the template brain.

    Site and scanner differences in global intensity are multiplicative, so one factor per
    map removes them while keeping regional contrast. The ``volume`` map is scaled so that
    its brain mean equals the template GM's (values stay probability-like and >= 0); the
    ``stiffness`` map to a brain mean of 1 (relative stiffness).

    Parameters
    ----------
    resampled : nibabel.Nifti1Image
        The map on the template grid.
    template : brainage_xai.imaging.templates.Template
    map_name : {"volume", "stiffness"}

    Returns
    -------
    image : nibabel.Nifti1Image
        The normalised map (float32, >= 0).
    info : dict
        ``Method``, ``Description``, ``Factor`` (the multiplier applied),
        ``ReferenceMean`` and ``OriginalMean``: for the JSON sidecar.
    """
    import nibabel as nib

    data = np.clip(np.asarray(resampled.dataobj, dtype=np.float32), 0, None)
    brain = np.asarray(template.mask.dataobj) > 0
    mean = float(data[brain].mean()) if brain.any() else 0.0
    if not mean > 0:
        raise DataError("map is zero everywhere inside the template brain mask")
    if map_name == "volume":
        reference = float(np.asarray(template.gm.dataobj, dtype=np.float32)[brain].mean())
    else:
        reference = 1.0
    factor = reference / mean
    out = nib.Nifti1Image((data * factor).astype(np.float32), resampled.affine)
    out.header.set_xyzt_units("mm")
    info = {
        "Method": "proportional scaling",
        "Description": (
            "resampled map (negative interpolation overshoot clipped to 0) multiplied by "
            "Factor so that its mean inside the template brain mask equals ReferenceMean"
        ),
        "Factor": factor,
        "OriginalMean": mean,
        "ReferenceMean": reference,
    }
    return out, info
