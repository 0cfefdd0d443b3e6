"""``participants.tsv``: the targets of the group level, one row per subject."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError, MissingInputError
from .layout import strip_label


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

    from ..utils.io import read_tsv

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


