"""The participant level: one preprocessed, checked map per subject.

For each selected subject: find the map with PyBIDS, check its MNI registration in world
coordinates, resample it onto the model grid, normalise its intensity, and write it (with
a JSON sidecar), a registration QC figure and ``sub-X.html`` into OUTPUT_DIR. With
``--model`` the subject's activations are written as well.

Subjects are independent: a subject that fails is reported and the others go on; the run
then exits with the failure's code. With ``--n-cpus`` above 1 (by default, the CPUs the job
may use) the subjects run on that many worker processes (:mod:`.pool`), with the same
files, logs and exit codes as one after the other. Every file is written atomically and the sidecar last,
so an interrupted run leaves no half-written map, and a re-run skips subjects whose
sidecar records the same input and settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

from .._version import __version__
from ..bids import derivatives as deriv
from ..errors import BrainAgeXAIError, DataError, MissingInputError, raise_if_stopped
from ..report.methods import boilerplate, preprocessing_methods
from ..report.subject import INTERPOLATION, subject_page
from ..utils.io import damage, save_nifti, write_json, write_text
from . import pool
from .outputs import init_output_dir, write_citation

LOGGER = logging.getLogger("brainage_xai.participant")


def _fingerprint(path: Path, config, template) -> str:
    """Identifies the input file and every setting the output depends on."""
    stat = path.stat()
    key = {
        "file": str(path),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "map": config.map,
        "resolution": config.resolution,
        "allow_resample": config.allow_resample,
        "template": template.source,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _bids_uri(path: Path, config) -> str:
    """``bids:<dataset>:<relative path>`` for a source file (BIDS URIs, as in Sources)."""
    path = Path(path).absolute()
    for name, root in (config.derivatives or {}).items():
        root = Path(root).absolute()
        if root in path.parents:
            return f"bids:{name}:{path.relative_to(root).as_posix()}"
    bids_dir = Path(config.bids_dir).absolute()
    if bids_dir in path.parents:
        return f"bids:raw:{path.relative_to(bids_dir).as_posix()}"
    return path.as_uri()


def _skull_stripped(img, template) -> bool:
    """Whether the map has (almost) nothing outside the template brain (dilated 1 voxel)."""
    import numpy as np
    from scipy import ndimage

    data = np.clip(np.asarray(img.dataobj, dtype=np.float32), 0, None)
    brain = ndimage.binary_dilation(np.asarray(template.mask.dataobj) > 0, iterations=1)
    total = float(data.sum())
    return bool(total > 0 and data[~brain].sum() / total < 0.05)


def _outputs_current(out_path: Path, sidecar: Path, fingerprint: str, extra: list[Path]) -> bool:
    """The subject's outputs are there, complete, and made from the same input and settings."""
    try:
        if json.loads(sidecar.read_text(encoding="utf-8")).get("InputFingerprint") != fingerprint:
            return False
    except (OSError, ValueError):
        return False
    for path in (out_path, *extra):
        problem = damage(path)
        if problem:
            LOGGER.warning("%s %s; writing the subject's outputs again", path.name, problem)
            return False
    return True


def process_subject(config, subject: str, source: Path, entities: dict, template) -> Path:
    """Check, resample, normalise and write one subject's map.

    Parameters
    ----------
    config : brainage_xai.config.Config
    subject : str
        Label without ``sub-``.
    source : Path
        The map found by PyBIDS.
    entities : dict
        Its BIDS entities (``space`` is the declared space).
    template : brainage_xai.imaging.templates.Template
        The template on the model grid.

    Returns
    -------
    Path
        The preprocessed map.

    Raises
    ------
    DataError
        The file is unreadable, not 3D, has NaN/Inf voxels or fails the registration
        check (the message carries the measured numbers).
    """
    from ..imaging.registration import check_registration, load_map, normalise_intensity
    from ..report.qc import registration_figure

    deriv.check_label(subject)
    out_dir = config.output_dir
    out_path = deriv.preproc_path(out_dir, subject, config.map, config.resolution, template.name)
    sidecar = deriv.sidecar_path(out_path)
    figure = deriv.qc_figure_path(out_dir, subject, config.map, config.resolution, template.name)
    report = deriv.report_path(out_dir, subject)
    fingerprint = _fingerprint(source, config, template)

    if _outputs_current(out_path, sidecar, fingerprint, [figure, report]):
        LOGGER.info("sub-%s: outputs up to date, skipped", subject)
    else:
        try:
            img = load_map(source)
        except DataError as exc:
            raise DataError(f"sub-{subject}: {exc}") from exc
        check, resampled = check_registration(
            img,
            template,
            declared_space=entities.get("space"),
            map_name=config.map,
            allow_other_mni=config.allow_resample,
        )
        if not check.passed:
            raise DataError(
                f"sub-{subject}: {source.name} fails the MNI registration check "
                f"({'; '.join(check.failures)}): {check.summary()}"
            )
        LOGGER.info("sub-%s: registration check passed (%s)", subject, check.summary())
        normalised, norm_info = normalise_intensity(resampled, template, config.map)
        qc = check.to_dict()
        meta = {
            "Sources": [_bids_uri(source, config)],
            "SpatialReference": {"Template": template.name, "TemplateSource": template.description},
            "Resolution": template.grid,
            "SkullStripped": _skull_stripped(resampled, template),
            "Interpolation": INTERPOLATION,
            "IntensityNormalization": norm_info,
            "RegistrationQC": qc,
            "InputFingerprint": fingerprint,
            "GeneratedBy": {"Name": "brainage-xai", "Version": __version__},
        }
        if config.map == "volume":
            meta["Description"] = "Gray-matter probability map, resampled and intensity-normalised"
        else:
            meta["Description"] = "MR elastography stiffness map, resampled; values relative to the brain mean"
            meta["Units"] = "arbitrary (brain mean = 1)"

        # Everything that can fail on the data is done before the first write.
        html = subject_page(config, subject, template, meta)
        save_nifti(normalised, out_path)
        registration_figure(
            resampled, template, figure, title=f"sub-{subject} {config.map} on {template.name}"
        )
        write_text(report, html)
        # The sidecar is the completion mark: written last, checked by the skip above.
        write_json(sidecar, meta)
        LOGGER.info("sub-%s: wrote %s", subject, out_path.relative_to(out_dir))

    if config.model is not None:
        from ..model.activations import write_participant_activations

        write_participant_activations(config, subject, out_path)
    return out_path


def _process_in_worker(config, subject: str, source: Path, entities: dict) -> Path:
    """:func:`process_subject` in a worker process, with the template loaded (and cached)
    there rather than sent with every subject."""
    from ..imaging.templates import get_template

    return process_subject(config, subject, source, entities, get_template(config.resolution))


def _serial(config, todo, template, bar):
    """Subjects one after the other in this process: ``(subject, map or error)`` each."""
    for subject, (source, entities) in todo:
        raise_if_stopped()
        bar.set_postfix_str(f"sub-{subject}")
        try:
            yield subject, process_subject(config, subject, source, entities, template)
        except BrainAgeXAIError as exc:
            yield subject, exc


def _combined_error(failures: dict[str, BrainAgeXAIError], total: int) -> BrainAgeXAIError:
    """One exception (class and exit code of the first failure) that says how many of the
    subjects failed and names every failure."""
    first = next(iter(failures.values()))
    detail = "; ".join(f"{exc}" for exc in failures.values())
    err = type(first)(f"{len(failures)} of {total} subject(s) failed: {detail}")
    err.exit_code = first.exit_code
    return err


def check_participants_table(bids_dir, subjects) -> None:
    """Warn about ``participants.tsv`` rows without a subject folder and subject folders
    without a row (the group level needs a row for every subject it analyses)."""
    from ..utils.io import read_tsv

    path = Path(bids_dir) / "participants.tsv"
    try:
        ids = read_tsv(path)["participant_id"].astype(str)
    except (OSError, ValueError, KeyError):
        return  # load_targets reports an unreadable table where the targets are needed
    rows = {i[len("sub-"):] if i.startswith("sub-") else i for i in ids}
    folders = set(subjects)
    for what, labels in (("participants.tsv rows without a subject folder", rows - folders),
                         ("subject folders without a participants.tsv row", folders - rows)):
        if labels:
            shown = ", ".join("sub-" + s for s in sorted(labels)[:8])
            LOGGER.warning("%d %s: %s%s", len(labels), what, shown, " ..." if len(labels) > 8 else "")


def run(config) -> int:
    """Run the participant level.

    Parameters
    ----------
    config : brainage_xai.config.Config

    Returns
    -------
    int
        0 when every selected subject was written.

    Raises
    ------
    UsageError
        A requested participant label is not in the dataset (exit 2).
    NoMatchError
        The map query matched no file for any selected subject (exit 18).
    BrainAgeXAIError
        After all subjects ran, when some failed: the first failure's kind and code
        (``MissingInputError`` 66 for a subject without a map, ``DataError`` 65 for a
        bad map), with every failure named in the message.
    """
    from tqdm.auto import tqdm

    from ..bids import build_layout, default_derivatives, find_maps, load_targets, select_subjects
    from ..bids.layout import layout_subjects
    from ..imaging.templates import get_template

    # The datasets searched for maps: the given ones, or those in BIDS_DIR/derivatives/.
    inputs = config.derivatives or default_derivatives(config.bids_dir, exclude=[config.output_dir])
    layout = build_layout(config.bids_dir, inputs, exclude=[config.output_dir])
    subjects = select_subjects(layout, config.participant_label)
    if config.model is None:
        # The group level will need the targets: a missing column or an n/a fails here,
        # before a cluster spends hours on the subjects. With --model (applying a trained
        # network to new subjects) the targets may be unknown.
        load_targets(config.bids_dir, list(config.target), subjects)
    found, missing, ambiguous = find_maps(
        layout, subjects, config.map, config.bids_filters, resolution=config.resolution
    )
    check_participants_table(config.bids_dir, layout_subjects(layout))
    LOGGER.info("%d subject(s) with a %s map; %d without", len(found), config.map, len(missing))
    template = get_template(config.resolution)
    LOGGER.info("template: %s (%s)", template.name, template.description)
    init_output_dir(config.output_dir, config.bids_dir, derivatives=inputs)
    # The boilerplate of this level; the group level writes its own (both levels) over it.
    write_citation(config.output_dir, boilerplate(preprocessing_methods(config, template)))

    failures: dict[str, BrainAgeXAIError] = {}
    for subject in missing:
        failures[subject] = MissingInputError(
            f"sub-{subject} has no {config.map} map matching the query "
            f"(looked in {config.bids_dir} and its derivatives)"
        )
        # INFO, not ERROR: the run ends with one error line naming every failure.
        LOGGER.info("failed: %s", failures[subject])
    for subject, exc in ambiguous.items():
        failures[subject] = exc
        LOGGER.info("failed: %s", exc)
    todo = sorted(found.items())
    n_workers = min(config.n_cpus or pool.available_cpus(), len(todo))
    bar = tqdm(total=len(todo), desc="participants", unit="subject", disable=config.quiet, file=sys.stderr)
    if n_workers > 1:
        LOGGER.info("%d subjects on %d worker processes", len(todo), n_workers)
        tasks = [(subject, (config, subject, source, entities)) for subject, (source, entities) in todo]
        threads = max(1, (config.n_cpus or pool.available_cpus()) // n_workers)
        results = pool.run_pool(_process_in_worker, tasks, n_workers, threads=threads,
                           torch_threads=config.model is not None)
    else:
        results = _serial(config, todo, template, bar)
    try:
        for subject, result in results:
            if isinstance(result, str) and result == pool.STOPPED:
                result = BrainAgeXAIError(
                    f"sub-{subject}: its worker process was stopped by a signal before it finished"
                )
            if isinstance(result, BrainAgeXAIError):
                failures[subject] = result
                LOGGER.info("failed: %s", result)
            bar.set_postfix_str(f"sub-{subject}")
            bar.update()
    finally:
        bar.close()  # before the command line's last line, also when the run is stopped
    if failures:
        raise _combined_error(dict(sorted(failures.items())), len(subjects))
    return 0
