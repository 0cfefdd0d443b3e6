"""The input dataset: labels, PyBIDS queries, ``participants.tsv`` and validation.

Everything that reads BIDS_DIR goes through here. BIDS_DIR is only ever read: the PyBIDS
index lives in memory, so a read-only mount works.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

from .derivatives import DEFAULT_SPACE, check_label, format_resolution
from .errors import (
    BIDSValidationError,
    DataError,
    MissingInputError,
    NoMatchError,
    UsageError,
)

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


# --------------------------------------------------------------------------------------
# participants.tsv


def load_targets(bids_dir, targets, subjects=None):
    """Read the target columns of ``participants.tsv``.

    Parameters
    ----------
    bids_dir : path-like
        The BIDS dataset root.
    targets : str or list of str
        Column names (e.g. ``["age"]``).
    subjects : list of str, optional
        Subject labels (with or without ``sub-``) to keep, in this order; all rows when
        omitted.

    Returns
    -------
    pandas.DataFrame
        Index ``participant_id`` (labels without ``sub-``), one float column per target.

    Raises
    ------
    MissingInputError
        ``participants.tsv`` or a target column is missing.
    DataError
        A selected subject is absent from the table, listed twice, or has ``n/a`` or a
        non-numeric value in a target column.
    """
    import pandas as pd

    from .utils.io import read_tsv

    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    path = Path(bids_dir) / "participants.tsv"
    if not path.is_file():
        raise MissingInputError(f"{path} not found; it must list participant_id and {', '.join(targets)}")
    try:
        table = read_tsv(path)
    except Exception as exc:  # pandas raises several parser errors
        raise DataError(f"cannot read {path}: {exc}") from exc
    if "participant_id" not in table.columns:
        raise MissingInputError(f"{path} has no participant_id column (columns: {', '.join(table.columns)})")
    missing = [t for t in targets if t not in table.columns]
    if missing:
        raise MissingInputError(
            f"participants.tsv has no column {', '.join(repr(m) for m in missing)} "
            f"(columns: {', '.join(table.columns)})"
        )
    ids = table["participant_id"].astype(str).str.strip()
    table.index = [i[len("sub-") :] if i.startswith("sub-") else i for i in ids]
    table.index.name = "participant_id"
    duplicated = sorted(set(table.index[table.index.duplicated()]))
    if duplicated:
        raise DataError(f"participants.tsv lists {', '.join('sub-' + d for d in duplicated)} more than once")
    if subjects is None:
        selected = list(table.index)
    else:
        selected = [strip_label(s) for s in subjects]
        absent = [s for s in selected if s not in table.index]
        if absent:
            raise DataError(f"participants.tsv has no row for {', '.join('sub-' + s for s in absent)}")
    out = pd.DataFrame(index=pd.Index(selected, name="participant_id"))
    for target in targets:
        values = pd.to_numeric(table.loc[selected, target], errors="coerce")
        bad = [s for s, v in zip(selected, values) if pd.isna(v) or v in (float("inf"), float("-inf"))]
        if bad:
            shown = ", ".join("sub-" + b for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
            raise DataError(
                f"participants.tsv column {target!r} has n/a or non-numeric values for "
                f"{len(bad)} subject(s): {shown}"
            )
        out[target] = values.astype(float).to_numpy()
    return out


# --------------------------------------------------------------------------------------
# PyBIDS


def default_derivatives(bids_dir) -> dict[str, Path]:
    """``BIDS_DIR/derivatives/*`` folders that are BIDS-derivatives datasets, by name."""
    root = Path(bids_dir) / "derivatives"
    if not root.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(root.iterdir())
        if p.is_dir() and (p / "dataset_description.json").is_file()
    }


def build_layout(bids_dir, derivatives: dict | None = None):
    """Index BIDS_DIR and its derivatives with PyBIDS (in memory; nothing is written).

    Parameters
    ----------
    bids_dir : path-like
        The raw dataset.
    derivatives : dict of str to path, optional
        Derivative datasets by name; default ``BIDS_DIR/derivatives/*``.
    """
    from bids import BIDSLayout
    from bids.exceptions import BIDSValidationError as PyBIDSValidationError

    bids_dir = Path(bids_dir)
    if derivatives is None or len(derivatives) == 0:
        derivatives = default_derivatives(bids_dir)
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

    Raises
    ------
    NoMatchError
        The query matched no file for any of the subjects (exit 18).
    DataError
        A subject has several equally good matches (e.g. two sessions).
    """
    query = map_query(map_name, bids_filters)
    pyquery = _pybids_query(query)
    found, missing = {}, []
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
            raise DataError(
                f"sub-{subject} has {len(best)} {map_name} maps ({names}); "
                "choose one with --bids-filter-file"
            )
        found[subject] = (Path(best[0].path), dict(best[0].get_entities()))
    if not found:
        raise NoMatchError(
            f"the {map_name} query {json.dumps(query)} matched no files for "
            f"{'sub-' + subjects[0] if len(subjects) == 1 else f'any of {len(subjects)} subjects'} "
            f"in {layout.root} or its derivatives"
        )
    return found, missing


def _rank_key(f, resolution):
    """Sort key: template space first, then the model grid's resolution."""
    ent = f.get_entities()
    res = str(ent.get("res", "")).lstrip("0")
    res_match = resolution is not None and res == format_resolution(resolution)
    return (_space_rank(ent), 0 if res_match else 1)


# --------------------------------------------------------------------------------------
# Validation


def find_validator() -> str | None:
    """The npm ``bids-validator`` executable: on PATH, or in ``.tools/`` (``make tools``)."""
    exe = shutil.which("bids-validator")
    if exe:
        return exe
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = root / ".tools" / "node_modules" / ".bin" / "bids-validator"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def validate_dataset(bids_dir, participant_label=None) -> bool:
    """Run the BIDS validator on BIDS_DIR.

    Returns ``False`` (with a warning) when the validator is not installed, ``True`` when
    the dataset passed.

    Raises
    ------
    BIDSValidationError
        The validator found errors (exit 16).
    """
    exe = find_validator()
    if exe is None:
        LOGGER.warning(
            "bids-validator not found (install it with `make tools` or npm); "
            "skipping BIDS validation"
        )
        return False
    cmd = [exe, "--json", "--ignoreNiftiHeaders", str(bids_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        LOGGER.warning("bids-validator could not run (%s); skipping BIDS validation", exc)
        return False
    try:
        result = json.loads(proc.stdout)
        errors = result.get("issues", {}).get("errors", [])
    except ValueError:
        if proc.returncode == 0:
            return True
        raise BIDSValidationError(
            f"bids-validator failed on {bids_dir}: {(proc.stderr or proc.stdout).strip()[:300]}"
        ) from None
    if participant_label:
        # As fMRIPrep: errors in subjects this run does not touch do not stop it.
        wanted = {f"/sub-{s}/" for s in participant_label}
        errors = [
            e for e in errors
            if not e.get("files")
            or any(
                any(w in ((f.get("file") or {}).get("relativePath") or "/") for w in wanted)
                or "/sub-" not in ((f.get("file") or {}).get("relativePath") or "/")
                for f in e["files"]
            )
        ]
    if errors:
        first = errors[0]
        files = [
            (f.get("file") or {}).get("relativePath") for f in first.get("files", []) if f.get("file")
        ]
        where = f" (e.g. {files[0]})" if files else ""
        raise BIDSValidationError(
            f"{bids_dir} failed BIDS validation with {len(errors)} error(s); first: "
            f"{first.get('key', '?')}: {first.get('reason', '')}{where}; "
            "use --skip-bids-validation to run anyway"
        )
    return True
