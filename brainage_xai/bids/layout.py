"""The input dataset through PyBIDS: labels, queries, one map per subject.

Everything that indexes BIDS_DIR goes through here (``participants.tsv``:
:mod:`.targets`; validation: :mod:`.validation`). BIDS_DIR is only ever read: the PyBIDS
index lives in memory, so a read-only mount works.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from ..errors import (
    BIDSValidationError,
    DataError,
    MissingInputError,
    NoMatchError,
    UsageError,
)
from .derivatives import DEFAULT_SPACE, check_label, format_resolution

LOGGER = logging.getLogger("brainage_xai.bids")

#: PyBIDS queries of the ``--map`` presets. ``"*"`` means "any value, but present".
MAP_QUERIES: dict[str, dict] = {
    # Gray-matter probability map (fMRIPrep/CAT12 style), in some template space.
    "volume": {"datatype": "anat", "suffix": "probseg", "label": "GM", "space": "*"},
    # MR elastography shear-stiffness map.
    "stiffness": {"datatype": "anat", "suffix": "mremap", "desc": "stiffness", "space": "*"},
}
NIFTI_EXTENSIONS = [".nii", ".nii.gz"]
_LABEL = re.compile(r"[0-9A-Za-z]+")


def strip_label(label: str) -> str:
    """A participant label without ``sub-``, checked against ``[0-9A-Za-z]+``."""
    label = str(label).strip()
    if label.startswith("sub-"):
        label = label[len("sub-") :]
    return check_label(label)


def check_symlink_cycles(root, exclude=()) -> None:
    """Refuse a folder tree in which a symbolic link leads back to a folder above it.

    The BIDS validator and PyBIDS follow folder links, and such a cycle makes them walk
    without end (or index the same files dozens of levels deep). Every folder is walked
    once, following links; ``exclude`` (OUTPUT_DIR inside ``BIDS_DIR/derivatives``) is
    not walked.

    Raises
    ------
    DataError
        A link whose target is one of the folders that contain it (exit 65).
    """
    import os

    root = Path(root)
    skip = set()
    for path in exclude:
        try:
            st = os.stat(path)
            skip.add((st.st_dev, st.st_ino))
        except OSError:
            continue
    st = os.stat(root)
    seen = {(st.st_dev, st.st_ino)}
    stack = [(root, ((st.st_dev, st.st_ino),))]
    while stack:
        folder, above = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # unreadable folders are the validator's to report
        for entry in entries:
            try:
                if not entry.is_dir(follow_symlinks=True):
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError:
                continue
            ident = (st.st_dev, st.st_ino)
            if ident in skip:
                continue
            if ident in above:
                target = os.readlink(entry.path) if entry.is_symlink() else entry.path
                raise DataError(
                    f"{Path(entry.path).relative_to(root)} in {root} is a symbolic link to a folder "
                    f"that contains it ({target}): a link cycle, which the BIDS validator and "
                    "PyBIDS would follow without end; remove or replace the link"
                )
            if ident in seen:
                continue  # reached again through another link: walked once
            seen.add(ident)
            stack.append((Path(entry.path), (*above, ident)))


# --------------------------------------------------------------------------------------
# PyBIDS


def default_derivatives(bids_dir, exclude=()) -> dict[str, Path]:
    """``BIDS_DIR/derivatives/*`` folders that are BIDS-derivatives datasets, by name.

    Folders in ``exclude`` (OUTPUT_DIR, when it is one of them) are left out.
    """
    root = Path(bids_dir) / "derivatives"
    if not root.is_dir():
        return {}
    skip = {Path(p).resolve() for p in exclude}
    return {
        p.name: p
        for p in sorted(root.iterdir())
        if p.is_dir() and (p / "dataset_description.json").is_file() and p.resolve() not in skip
    }


def build_layout(bids_dir, derivatives: dict | None = None, exclude=()):
    """Index BIDS_DIR and its derivatives with PyBIDS (in memory; nothing is written).

    Parameters
    ----------
    bids_dir : path-like
        The raw dataset (PyBIDS leaves its ``derivatives/`` folder out of the raw index).
    derivatives : dict of str to path, optional
        Derivative datasets by name; default ``BIDS_DIR/derivatives/*``.
    exclude : iterable of path-like
        Folders never indexed as derivatives: the run's own OUTPUT_DIR, which may be
        ``BIDS_DIR/derivatives/<name>``.
    """
    from bids import BIDSLayout
    from bids.exceptions import BIDSValidationError as PyBIDSValidationError

    bids_dir = Path(bids_dir)
    if derivatives is None or len(derivatives) == 0:
        derivatives = default_derivatives(bids_dir, exclude)
    for name, path in derivatives.items():
        if not Path(path, "dataset_description.json").is_file():
            raise MissingInputError(
                f"derivatives {name!r} at {path} has no dataset_description.json; "
                "expected a BIDS-derivatives dataset"
            )
    try:
        layout = BIDSLayout(str(bids_dir), validate=False)
        for path in derivatives.values():
            layout.add_derivatives(str(path), parent_database_path=None, validate=False)
    except PyBIDSValidationError as exc:
        raise BIDSValidationError(f"{bids_dir} is not a BIDS dataset: {exc}") from exc
    except ValueError as exc:
        raise BIDSValidationError(f"cannot index {bids_dir}: {exc}") from exc
    return layout


def map_query(map_name: str, bids_filters: dict | None = None) -> dict:
    """The PyBIDS query of a map preset, overridden by a ``--bids-filter-file``.

    The filter file is either a flat query (``{"desc": "modulated"}``) or keyed by map
    preset (``{"volume": {...}}``, as fMRIPrep keys by data type). ``null`` means "entity
    absent" and ``"*"`` "any value".
    """
    if map_name not in MAP_QUERIES:
        raise UsageError(f"'map' must be one of {sorted(MAP_QUERIES)}. {map_name!r} was provided")
    query = dict(MAP_QUERIES[map_name])
    if bids_filters:
        override = bids_filters.get(map_name, bids_filters)
        if not isinstance(override, dict):
            raise UsageError(f"bids filter for {map_name!r} must be a JSON object; got {override!r}")
        query.update({k: v for k, v in override.items() if k not in MAP_QUERIES})
    query.setdefault("extension", NIFTI_EXTENSIONS)
    return query


def _pybids_query(query: dict) -> dict:
    from bids.layout import Query

    out = {}
    for key, value in query.items():
        if value == "*":
            value = Query.ANY
        elif value is None:
            value = Query.NONE
        out[key] = value
    return out


def layout_subjects(layout) -> list[str]:
    """All subject labels of the dataset and its derivatives."""
    return sorted(set(layout.get_subjects(scope="all")))


def select_subjects(layout, requested: list[str] | None) -> list[str]:
    """The subjects to process: all, or the requested ones checked against the dataset.

    Raises
    ------
    UsageError
        A requested label is not in the dataset (exit 2, as fMRIPrep).
    """
    available = layout_subjects(layout)
    if not requested:
        if not available:
            raise NoMatchError(f"no sub-* folders found in {layout.root} or its derivatives")
        return available
    requested = [strip_label(r) for r in requested]
    unknown = [r for r in requested if r not in available]
    if unknown:
        raise UsageError(
            f"participant label(s) {', '.join(unknown)} not found in {layout.root} "
            f"({len(available)} subjects: {', '.join(available[:8])}{' ...' if len(available) > 8 else ''})"
        )
    return list(dict.fromkeys(requested))


def _space_rank(path_entities: dict) -> int:
    space = path_entities.get("space", "")
    if space == DEFAULT_SPACE:
        return 0
    if str(space).startswith("MNI152"):
        return 1
    return 2


def find_maps(layout, subjects, map_name, bids_filters=None, resolution=None):
    """One map file per subject.

    Parameters
    ----------
    layout : bids.BIDSLayout
    subjects : list of str
        Labels without ``sub-``.
    map_name : {"volume", "stiffness"}
    bids_filters : dict, optional
        The parsed ``--bids-filter-file``.
    resolution : float, optional
        Preferred ``res-`` when a subject has maps at several resolutions.

    Returns
    -------
    found : dict of str to (Path, dict)
        ``subject -> (path, entities)`` for subjects with exactly one best map.
    missing : list of str
        Subjects with no matching file.
    ambiguous : dict of str to DataError
        Subjects with several equally good matches (e.g. two sessions), each with the
        error that names them: that subject fails, the others go on.

    Raises
    ------
    NoMatchError
        The query matched no file for any of the subjects (exit 18).
    """
    query = map_query(map_name, bids_filters)
    pyquery = _pybids_query(query)
    found, missing, ambiguous = {}, [], {}
    for subject in subjects:
        try:
            files = layout.get(subject=subject, return_type="object", scope="all", **pyquery)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"invalid BIDS filter {query}: {exc}") from exc
        files = [f for f in files if f.get_entities().get("desc") != "preproc" or "desc" in query]
        if not files:
            missing.append(subject)
            continue
        ranked = sorted(files, key=lambda f: _rank_key(f, resolution))
        best = [f for f in ranked if _rank_key(f, resolution) == _rank_key(ranked[0], resolution)]
        if len(best) > 1:
            names = ", ".join(Path(f.path).name for f in best)
            ambiguous[subject] = DataError(
                f"sub-{subject} has {len(best)} {map_name} maps ({names}); "
                "choose one with --bids-filter-file"
            )
            continue
        found[subject] = (Path(best[0].path), dict(best[0].get_entities()))
    if not found and not ambiguous:
        raise NoMatchError(
            f"the {map_name} query {json.dumps(query)} matched no files for "
            f"{'sub-' + subjects[0] if len(subjects) == 1 else f'any of {len(subjects)} subjects'} "
            f"in {layout.root} or its derivatives"
        )
    return found, missing, ambiguous


def _rank_key(f, resolution):
    """Sort key: template space first, then the model grid's resolution."""
    ent = f.get_entities()
    res = str(ent.get("res", "")).lstrip("0")
    res_match = resolution is not None and res == format_resolution(resolution)
    return (_space_rank(ent), 0 if res_match else 1)


