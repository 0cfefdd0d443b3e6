"""The BIDS-derivatives layout of OUTPUT_DIR.

One place decides every output name of the participant level, so that the group level
(another module) finds what the participant level wrote by calling the same functions,
and the dataset-level files (``dataset_description.json``, ``.bidsignore``,
``CITATION.md``) that make OUTPUT_DIR a valid BIDS-derivatives dataset.

Several participant jobs may write into one OUTPUT_DIR at once: everything here is
written atomically and with the same content from every job, so the last rename wins
harmlessly.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ._version import __version__
from .errors import DataError, UsageError
from .utils.env import container_info
from .utils.io import write_json, write_text

DEFAULT_SPACE = "MNI152NLin2009cAsym"
CODE_URL = "https://github.com/brainage-xai/brainage-xai"
BIDS_VERSION = "1.9.0"

#: BIDS entities and suffix that name the preprocessed map of each ``--map`` preset.
MAP_OUTPUTS = {
    "volume": {"entities": "label-GM_desc-preproc", "suffix": "probseg"},
    "stiffness": {"entities": "desc-preproc", "suffix": "mremap"},
}

_LABEL = re.compile(r"[0-9A-Za-z]+")

#: Files the BIDS validator does not know; listed in ``.bidsignore``.
BIDSIGNORE = (
    "*.html",
    "logs/",
    "figures/",
    "sub-*/figures/",
    "group/",
    ".work/",
    "CITATION.md",
)


def check_label(label: str, what: str = "participant label") -> str:
    """Return ``label`` if it is a valid BIDS label (``[0-9A-Za-z]+``), else raise.

    Labels from a dataset become parts of file names, so anything else (``..``, ``/``,
    spaces) is refused before it can reach the file system.
    """
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise UsageError(f"{what} must match [0-9A-Za-z]+; {label!r} was provided")
    return label


def _map_output(map_name: str) -> dict:
    try:
        return MAP_OUTPUTS[map_name]
    except KeyError:
        raise UsageError(
            f"'map' must be one of {sorted(MAP_OUTPUTS)}. {map_name!r} was provided"
        ) from None


def format_resolution(resolution: float) -> str:
    """The ``res-`` label of a voxel size in mm (``2`` for 2.0, ``1p5`` for 1.5)."""
    resolution = float(resolution)
    if resolution <= 0:
        raise UsageError(f"resolution must be a positive number of mm; {resolution} was provided")
    if resolution.is_integer():
        return str(int(resolution))
    return f"{resolution:g}".replace(".", "p")


def preproc_path(
    output_dir: str | os.PathLike,
    subject: str,
    map_name: str,
    resolution: float,
    space: str = DEFAULT_SPACE,
) -> Path:
    """Path of a subject's preprocessed map in OUTPUT_DIR.

    Parameters
    ----------
    output_dir : path-like
        The BIDS-derivatives root.
    subject : str
        Subject label without ``sub-``.
    map_name : {"volume", "stiffness"}
        The map preset.
    resolution : float
        Voxel size of the model grid in mm.
    space : str
        Template space label.

    Returns
    -------
    Path
        ``sub-X/anat/sub-X_space-<space>_res-<r>_label-GM_desc-preproc_probseg.nii.gz``
        (volume) or ``sub-X/anat/sub-X_space-<space>_res-<r>_desc-preproc_mremap.nii.gz``
        (stiffness) under ``output_dir``.
    """
    check_label(subject)
    check_label(space, "space label")
    out = _map_output(map_name)
    res = format_resolution(resolution)
    name = f"sub-{subject}_space-{space}_res-{res}_{out['entities']}_{out['suffix']}.nii.gz"
    return Path(output_dir) / f"sub-{subject}" / "anat" / name


def nifti_stem(nifti_path: str | os.PathLike) -> str:
    """The file name of a NIfTI without ``.nii.gz`` or ``.nii``."""
    name = Path(nifti_path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def sidecar_path(nifti_path: str | os.PathLike) -> Path:
    """The JSON sidecar beside a ``.nii.gz`` (or ``.nii``) file."""
    nifti_path = Path(nifti_path)
    return nifti_path.with_name(nifti_stem(nifti_path) + ".json")


def qc_figure_path(
    output_dir: str | os.PathLike,
    subject: str,
    map_name: str,
    resolution: float,
    space: str = DEFAULT_SPACE,
) -> Path:
    """Path of the registration QC figure: ``sub-X/figures/sub-X_..._desc-registration_<suffix>.svg``."""
    check_label(subject)
    out = _map_output(map_name)
    res = format_resolution(resolution)
    label = "label-GM_" if map_name == "volume" else ""
    name = f"sub-{subject}_space-{space}_res-{res}_{label}desc-registration_{out['suffix']}.svg"
    return Path(output_dir) / f"sub-{subject}" / "figures" / name


def report_path(output_dir: str | os.PathLike, subject: str) -> Path:
    """Path of the per-subject HTML report ``sub-X.html`` (at the root, as fMRIPrep)."""
    check_label(subject)
    return Path(output_dir) / f"sub-{subject}.html"


def collect_preprocessed(
    output_dir: str | os.PathLike,
    map_name: str,
    *,
    resolution: float | None = None,
    space: str | None = None,
) -> list[tuple[str, Path]]:
    """Find the preprocessed maps that the participant level wrote.

    Parameters
    ----------
    output_dir : path-like
        The BIDS-derivatives root.
    map_name : {"volume", "stiffness"}
        The map preset.
    resolution : float, optional
        Keep only maps on this grid; needed only when several resolutions were written.
    space : str, optional
        Keep only maps in this space.

    Returns
    -------
    list of (str, Path)
        ``(subject label without "sub-", path)`` sorted by subject label.

    Raises
    ------
    DataError
        When one subject has several matching maps (different spaces or resolutions) and
        no ``resolution``/``space`` was given to choose between them.
    """
    out = _map_output(map_name)
    space_glob = space if space is not None else "*"
    res_glob = format_resolution(resolution) if resolution is not None else "*"
    pattern = f"sub-*_space-{space_glob}_res-{res_glob}_{out['entities']}_{out['suffix']}.nii.gz"
    found: dict[str, list[Path]] = {}
    for path in sorted(Path(output_dir).glob(f"sub-*/anat/{pattern}")):
        subject = path.parent.parent.name[len("sub-") :]
        if not _LABEL.fullmatch(subject) or not path.name.startswith(f"sub-{subject}_"):
            continue
        found.setdefault(subject, []).append(path)
    several = {s: p for s, p in found.items() if len(p) > 1}
    if several:
        subject, paths = next(iter(sorted(several.items())))
        raise DataError(
            f"sub-{subject} has {len(paths)} preprocessed {map_name} maps "
            f"({', '.join(p.name for p in paths)}); choose one with a resolution or space"
        )
    return [(s, p[0]) for s, p in sorted(found.items())]


def write_dataset_description(
    output_dir: str | os.PathLike,
    bids_dir: str | os.PathLike,
    derivatives: dict | None = None,
) -> Path:
    """Write OUTPUT_DIR's ``dataset_description.json`` (a BIDS-derivatives dataset).

    ``GeneratedBy`` carries the name, version, code URL and, when run in one, the
    container; ``SourceDatasets`` points at BIDS_DIR (with its DOI when it declares one);
    ``DatasetLinks`` names BIDS_DIR ``raw`` and each ``--derivatives`` dataset by its
    name, so that the ``bids:<name>:<path>`` URIs in sidecars resolve.
    """
    bids_dir = Path(bids_dir).absolute()
    source = {"URL": bids_dir.as_uri()}
    src_desc = bids_dir / "dataset_description.json"
    name = bids_dir.name
    try:
        with open(src_desc, encoding="utf-8") as fh:
            src = json.load(fh)
        if isinstance(src, dict):
            name = src.get("Name", name)
            if src.get("DatasetDOI"):
                source["DOI"] = src["DatasetDOI"]
            if src.get("BIDSVersion"):
                source["Version"] = src.get("DatasetVersion", src["BIDSVersion"])
    except (OSError, ValueError):
        pass  # the validator (or the query) reports a broken source dataset
    generated = {"Name": "brainage-xai", "Version": __version__, "CodeURL": CODE_URL}
    container = container_info()
    if container:
        generated["Container"] = container
    desc = {
        "Name": f"brainage-xai derivatives of {name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [source],
        "DatasetLinks": {
            "raw": bids_dir.as_uri(),
            **{name: Path(p).absolute().as_uri() for name, p in (derivatives or {}).items()},
        },
        "HowToAcknowledge": "Please cite brainage-xai as described in CITATION.md.",
    }
    return write_json(Path(output_dir) / "dataset_description.json", desc)


def write_bidsignore(output_dir: str | os.PathLike) -> Path:
    """Write ``.bidsignore`` listing outputs the BIDS validator does not know."""
    return write_text(Path(output_dir) / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")


CITATION = """\
# Methods

Results included in this manuscript come from brainage-xai {version} ({url}).

## Participant level

Each participant's brain map (gray-matter probability map for the `volume` preset, MR
elastography stiffness map for the `stiffness` preset), already in MNI152 space, was
checked for registration to the {space} template in world coordinates (declared space,
orientation, voxel size, overlap with the template brain mask (Dice) and correlation with
the template), resampled with nilearn onto the model grid ({resolution} mm isotropic,
the template's bounding box), and intensity-normalised by proportional scaling: the map
was divided by its mean within the template brain mask, which removes global (for
example site-related) intensity differences while preserving regional contrasts.

## Group level

A 3D pre-activation ResNet was trained to predict age from the preprocessed maps, and
its last convolutional layer's activations over all participants were explained with a
constrained non-negative Tucker decomposition (see the group report).

## References

- He K, Zhang X, Ren S, Sun J (2016). Identity mappings in deep residual networks. ECCV.
- Gorgolewski KJ et al. (2017). BIDS apps. PLoS Comput Biol 13(3):e1005209.
- Abraham A et al. (2014). Machine learning for neuroimaging with scikit-learn (nilearn).
  Front Neuroinform 8:14.
"""


def write_citation(output_dir: str | os.PathLike, resolution: float = 2, space: str = DEFAULT_SPACE) -> Path:
    """Write ``CITATION.md``: a methods text to copy into a paper."""
    text = CITATION.format(
        version=__version__, url=CODE_URL, space=space, resolution=format_resolution(resolution)
    )
    return write_text(Path(output_dir) / "CITATION.md", text)


def init_output_dir(
    output_dir: str | os.PathLike,
    bids_dir: str | os.PathLike,
    resolution: float = 2,
    space: str = DEFAULT_SPACE,
    derivatives: dict | None = None,
) -> None:
    """Write the dataset-level files of OUTPUT_DIR (description, .bidsignore, citation)."""
    write_dataset_description(output_dir, bids_dir, derivatives)
    write_bidsignore(output_dir)
    write_citation(output_dir, resolution, space)
