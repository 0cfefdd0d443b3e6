"""The BIDS-derivatives layout of OUTPUT_DIR: every output name is decided here.

One place decides every output name, of the participant level (functions of a subject)
and of the group level (:class:`GroupOutputs`), so that the group level finds what the
participant level wrote by calling the same functions, the report finds what the stages
wrote, and no library function spells a file name of its own; and the dataset-level files (``dataset_description.json``, ``.bidsignore``,
``logs/CITATION.md``) that make OUTPUT_DIR a valid BIDS-derivatives dataset.

Several participant jobs may write into one OUTPUT_DIR at once: everything here is
written atomically and with the same content from every job, so the last rename wins
harmlessly.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .._version import __version__
from ..errors import DataError, UsageError
from ..utils.env import container_info
from ..utils.io import write_json, write_text

DEFAULT_SPACE = "MNI152NLin2009cAsym"
CODE_URL = "https://github.com/brainage-xai/brainage-xai"
BIDS_VERSION = "1.9.0"

#: BIDS entities and suffix that name the preprocessed map of each ``--map`` preset.
MAP_OUTPUTS = {
    "volume": {"entities": "label-GM_desc-preproc", "suffix": "probseg"},
    "stiffness": {"entities": "desc-preproc", "suffix": "mremap"},
}

_LABEL = re.compile(r"[0-9A-Za-z]+")

#: Files the BIDS validator does not know; listed in ``.bidsignore``. Folders without a
#: trailing slash: ``bids-validator-deno`` does not match ``sub-*/figures/`` to a folder.
BIDSIGNORE = (
    "*.html",
    "logs",
    "figures",
    "sub-*/figures",
    "group",
    ".work",
    "CITATION.*",
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


def participant_activations_path(preproc: str | os.PathLike, layer: str) -> Path:
    """``sub-X_..._desc-<layer>_activations.nii.gz`` beside the preprocessed map.

    The entities before ``desc-`` (space, res, label) are kept, so the activations of
    different maps of one subject do not collide.
    """
    preproc = Path(preproc)
    stem = nifti_stem(preproc).rsplit("_", 1)[0]  # drop the suffix (probseg, ...)
    parts = [p for p in stem.split("_") if not p.startswith("desc-")]
    return preproc.with_name("_".join(parts) + f"_desc-{layer}_activations.nii.gz")


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
        ``(subject label without "sub-", path)`` sorted by subject label. A map without
        its JSON sidecar (which the participant level writes last, as its completion
        mark) is not complete and is left out with a warning.

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
        if not sidecar_path(path).is_file():
            logging.getLogger("brainage_xai.group").warning(
                "sub-%s: %s has no JSON sidecar (its participant run did not finish); left out",
                subject, path.name)
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


def roi_names(n: int) -> list[str]:
    """The names of ``n`` RoIs (``RoI 1`` ...): rows of ``rois.tsv``, columns of ``loadings.tsv``."""
    return [f"RoI {r + 1}" for r in range(int(n))]


def prediction_columns(target: str) -> dict:
    """Column names of ``target`` in ``predictions.tsv`` (``age`` gets brain-age names)."""
    gap = "brain_age_gap" if target == "age" else f"{target}_gap"
    return {
        "true": target,
        "predicted": f"predicted_{target}",
        "gap": gap,
        "gap_corrected": f"{gap}_corrected",
        "predicted_corrected": f"predicted_{target}_corrected",
    }


class _File:
    """A file of :class:`GroupOutputs`: its name under ``group_dir`` (or ``work_dir``)."""

    def __init__(self, name: str, *, work: bool = False, image: tuple[str, str] | None = None):
        self.name, self.work, self.image = name, work, image

    def __get__(self, outputs, owner=None) -> Path:
        if outputs is None:
            return self
        if self.image is not None:  # an image on the model grid: space and res entities
            desc, suffix = self.image
            return Path(outputs.group_dir) / f"{outputs.prefix}_desc-{desc}_{suffix}{self.name}"
        return Path(outputs.work_dir if self.work else outputs.group_dir) / self.name


@dataclass(frozen=True)
class GroupOutputs:
    """Every file of one group analysis: ``group_dir`` (OUTPUT_DIR/group[/map-<name>]) and
    its work folder ``work_dir``.

    Parameters
    ----------
    group_dir, work_dir : Path
    space : str
        Template space label of the model grid.
    resolution : float
        Voxel size of the model grid in mm.
    """

    group_dir: Path
    work_dir: Path
    space: str = DEFAULT_SPACE
    resolution: float = 2

    @property
    def prefix(self) -> str:
        """``space-<label>_res-<r>``: the entities of every image on the model grid."""
        return f"space-{check_label(self.space, 'space label')}_res-{format_resolution(self.resolution)}"

    # inputs, split, model, predictions
    analysis = _File("analysis.json")
    split = _File("split.tsv")
    model = _File("model.safetensors")
    model_json = _File("model.json")
    predictions = _File("predictions.tsv")
    metrics = _File("metrics.json")
    # selection
    scree = _File("scree.tsv")
    rank_sweep = _File("rank_sweep.tsv")
    lambda_sweep = _File("lambda_sweep.tsv")
    selection = _File("selection.json")
    decomposition = _File("decomposition.npz")
    decomposition_json = _File("decomposition.json")
    loadings = _File("loadings.tsv")
    # explanations
    components = _File(".nii.gz", image=("rois", "components"))
    dseg = _File(".nii.gz", image=("rois", "dseg"))
    dseg_tsv = _File(".tsv", image=("rois", "dseg"))
    rois = _File("rois.tsv")
    gradcam = _File(".nii.gz", image=("gradcam", "map"))
    backprojected = _File(".nii.gz", image=("backprojected", "components"))
    occlusion = _File("occlusion.tsv")
    occlusion_null = _File("occlusion_null.tsv")
    # the layer choice and the consensus
    layer_choice = _File("layer_choice.tsv")
    consensus = _File("consensus.npz")
    consensus_json = _File("consensus.json")
    consensus_fits = _File("consensus_fits.tsv")
    consensus_loadings = _File("consensus_loadings.tsv")
    # figures and the report
    figures = _File("figures")
    scree_figure = _File("figures/scree.png")
    rank_sweep_figure = _File("figures/rank_sweep.png")
    lambda_sweep_figure = _File("figures/lambda_sweep.png")
    occlusion_figure = _File("figures/desc-occlusion_plot.svg")
    consensus_figure = _File("figures/desc-consensus_plot.png")
    report = _File("report.html")
    # the work folder
    stamps = _File("stamps", work=True)
    selection_work = _File("selection", work=True)
    tensor_parameters = _File("selection/tensor_parameters.npz", work=True)
    selection_metrics = _File("selection/metrics.json", work=True)
    rank_sweep_cache = _File("selection/rank_sweep", work=True)

    def training_dir(self, key: str) -> Path:
        """The work folder of one training run (checkpoints, tuning database)."""
        return Path(self.work_dir) / f"train-{key[:16]}"

    def activations(self, layer: str) -> tuple[Path, Path]:
        """The ``.npy`` and ``.json`` of the activation tensor of ``layer``."""
        base = Path(self.work_dir) / "activations" / f"layer-{layer}_activations"
        return base.with_suffix(".npy"), base.with_suffix(".json")

    def predictions_figure(self, target: str) -> Path:
        return self.figures / f"target-{target}_desc-predictions_scatter.svg"

    def loading_fits(self, target: str) -> Path:
        return Path(self.group_dir) / f"loadings_vs_{target}.tsv"

    def loadings_figure(self, target: str) -> Path:
        return self.figures / f"target-{target}_desc-loadings_scatter.svg"


def _description(root: Path) -> dict:
    """A dataset's ``dataset_description.json`` (``{}`` when it cannot be read)."""
    try:
        with open(root / "dataset_description.json", encoding="utf-8") as fh:
            desc = json.load(fh)
    except (OSError, ValueError):
        return {}  # the validator (or the query) reports a broken source dataset
    return desc if isinstance(desc, dict) else {}


def _source_entry(name: str, desc: dict) -> dict:
    """The ``SourceDatasets`` entry of an input: its BIDS URI (resolved by
    ``DatasetLinks``), and the DOI and version it declares."""
    entry = {"URL": f"bids:{name}:"}
    doi = str(desc.get("DatasetDOI") or "").strip()
    if doi:
        entry["DOI"] = doi if ":" in doi else f"doi:{doi}"  # bare DOIs are deprecated
    if desc.get("DatasetVersion"):
        entry["Version"] = str(desc["DatasetVersion"])
    return entry


def _license(descriptions: dict[str, dict]) -> str:
    """The derivatives' licence: the inputs' when they agree, else what each declares."""
    declared = {name: str(d.get("License") or "").strip() for name, d in descriptions.items()}
    values = set(declared.values())
    if len(values) == 1 and "" not in values:
        return values.pop()
    terms = "; ".join(f"{name}: {lic or 'no licence declared'}" for name, lic in declared.items())
    return f"The terms of the source datasets apply ({terms})"


def write_dataset_description(
    output_dir: str | os.PathLike,
    bids_dir: str | os.PathLike,
    derivatives: dict | None = None,
) -> Path:
    """Write OUTPUT_DIR's ``dataset_description.json`` (a BIDS-derivatives dataset).

    Parameters
    ----------
    output_dir, bids_dir : path-like
    derivatives : dict of str to path, optional
        The derivative datasets the maps were searched in, by name.

    ``GeneratedBy`` carries the name, version, description, code URL and, when run in
    one, the container. ``SourceDatasets`` lists every input, BIDS_DIR (``raw``) and each
    derivative dataset, by its ``bids:<name>:`` URI with the DOI and version it declares;
    ``DatasetLinks`` maps those names to their folders, so that the URIs (and the
    ``bids:<name>:<path>`` URIs of the sidecars) resolve. ``License`` is the inputs'
    licence when they agree, otherwise each one's terms.
    """
    bids_dir = Path(bids_dir).absolute()
    inputs = {"raw": bids_dir, **{n: Path(p).absolute() for n, p in (derivatives or {}).items()}}
    descriptions = {name: _description(root) for name, root in inputs.items()}
    generated = {
        "Name": "brainage-xai",
        "Version": __version__,
        "Description": (
            "Brain-age prediction from MNI-space brain maps with a 3D ResNet, explained at "
            "dataset level by a constrained non-negative Tucker decomposition of its "
            "activations"
        ),
        "CodeURL": CODE_URL,
    }
    container = container_info()
    if container:
        generated["Container"] = container
    desc = {
        "Name": f"brainage-xai derivatives of {descriptions['raw'].get('Name', bids_dir.name)}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated],
        "SourceDatasets": [_source_entry(name, d) for name, d in descriptions.items()],
        "DatasetLinks": {name: root.as_uri() for name, root in inputs.items()},
        "License": _license(descriptions),
        "HowToAcknowledge": (
            "Cite brainage-xai and the methods it implements as logs/CITATION.md describes "
            "(the methods text of the run, with its references), and acknowledge each source "
            "dataset as it asks."
        ),
    }
    return write_json(Path(output_dir) / "dataset_description.json", desc)


def write_bidsignore(output_dir: str | os.PathLike) -> Path:
    """Write ``.bidsignore`` listing outputs the BIDS validator does not know."""
    return write_text(Path(output_dir) / ".bidsignore", "\n".join(BIDSIGNORE) + "\n")


def log_dir(output_dir: str | os.PathLike) -> Path:
    """``OUTPUT_DIR/logs``: every run's configuration, log and citation boilerplate."""
    return Path(output_dir) / "logs"


def citation_path(output_dir: str | os.PathLike, ext: str = "md") -> Path:
    """``logs/CITATION.<ext>`` (``md``, ``html``, ``bib``): the methods boilerplate of the
    last level that ran, with its references, to copy into a paper."""
    if ext not in ("md", "html", "bib"):
        raise ValueError(f"CITATION.{ext}: the boilerplate is md, html or bib")
    return log_dir(output_dir) / f"CITATION.{ext}"


def run_config_path(output_dir: str | os.PathLike, run_uuid: str) -> Path:
    """``logs/config-<run>.toml``: one run's configuration (``--config-file`` repeats it)."""
    return log_dir(output_dir) / f"config-{run_uuid}.toml"


def run_log_path(output_dir: str | os.PathLike, level: str, run_uuid: str) -> Path:
    """``logs/brainage-xai_<level>_<run>.log``: one run's full log."""
    return log_dir(output_dir) / f"brainage-xai_{level}_{run_uuid}.log"
