"""Atomic writes and BIDS-style tables.

Every output is written to a temporary file in the destination folder and renamed into
place, so that concurrent participant jobs and interrupted runs never leave a
half-written file behind (``os.replace`` is atomic on POSIX within one file system).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary name keeps the final suffix (e.g. ``.nii.gz``) so that libraries that
    choose a format from the name (nibabel, matplotlib) write the right one.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create folder {path.parent}: {exc.strerror}") from exc
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write to {path.parent}: {exc.strerror}") from exc
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (numpy scalars and arrays allowed)."""
    return write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def write_tsv(path: str | os.PathLike, table, sidecar: dict | None = None) -> Path:
    """Write a pandas DataFrame as a BIDS TSV (``n/a`` for missing) with optional sidecar.

    ``sidecar`` maps column names to ``{"Description": ..., "Units": ...}`` and is written
    beside the table as ``<name>.json``.
    """
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
    if sidecar is not None:
        write_json(Path(str(path)[: -len(".tsv")] + ".json"), sidecar)
    return Path(path)


def read_tsv(path: str | os.PathLike):
    """Read a BIDS TSV (``n/a`` as missing) into a DataFrame, keeping ids as strings."""
    import pandas as pd

    return pd.read_csv(
        path, sep="\t", na_values=["n/a"], keep_default_na=False, dtype={"participant_id": str}
    )


def save_nifti(img, path: str | os.PathLike) -> Path:
    """Save a nibabel image atomically."""
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return Path(path)
