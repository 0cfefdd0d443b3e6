"""Atomic writes and BIDS-style tables.

Every output is written to a temporary file in the destination folder and renamed into
place, so that concurrent participant jobs and interrupted runs never leave a
half-written file behind (``os.replace`` is atomic on POSIX within one file system).
The temporary file is removed when the write fails or the run is stopped by a signal
(:class:`~brainage_xai.errors.Interrupted`); one left by a killed process (SIGKILL, a
node that went down) carries that process's id and host in its name, and
:func:`remove_stale_temporaries` removes it on the next run. Files get the permissions
the umask gives, as any other program's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError

#: Marks the hidden temporary files of :func:`atomic_path`:
#: ``.<name>.brainage-xai-tmp.<pid>@<host>.<random><suffix>``.
TEMP_MARK = ".brainage-xai-tmp."
_TEMP_NAME = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(?P<pid>[0-9]+)@(?P<host>[0-9A-Za-z-]*)\.")
#: A temporary file of another host (or of a process whose id was reused) is stale once
#: it has not changed for this long (seconds).
STALE_AFTER = 24 * 3600


def _host() -> str:
    return re.sub(r"[^0-9A-Za-z-]", "", socket.gethostname().split(".")[0])[:32]


def _umask() -> int:
    """The process's umask (read without changing it where ``/proc`` tells)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's process
        return True
    return True


def remove_stale_temporaries(root: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_path` that no running process owns.

    A temporary file is stale when the process named in it is gone (same host) or when it
    has not changed for :data:`STALE_AFTER` seconds (another host sharing the folder, as
    the jobs of a cluster array do). Those of running processes, such as a concurrent
    participant job, are left alone. Symbolic links are not followed.

    Returns
    -------
    list of Path
        The files removed.
    """
    host, now, removed = _host(), time.time(), []
    for folder, _, files in os.walk(root):
        for name in files:
            match = _TEMP_NAME.match(name) if TEMP_MARK in name else None
            if match is None:
                continue
            path = Path(folder, name)
            try:
                old = now - path.lstat().st_mtime > STALE_AFTER
                if old or (match["host"] == host and not _alive(int(match["pid"]))):
                    path.unlink()
                    removed.append(path)
            except OSError:
                continue
    return removed


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
    prefix = f".{path.name}{TEMP_MARK}{os.getpid()}@{_host()}."
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write to {path.parent}: {exc.strerror}") from exc
    tmp = Path(tmp)
    try:
        os.close(fd)
        yield tmp
        # mkstemp makes the file private (0600); the output gets what the umask allows
        os.chmod(tmp, 0o666 & ~_umask())
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


def _npy_damage(path: Path) -> str | None:
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(fh)
        expected = fh.tell() + int(np.prod(shape)) * dtype.itemsize
    return None if path.stat().st_size == expected else "is shorter or longer than its header says"


def _safetensors_damage(path: Path) -> str | None:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    return None if path.stat().st_size == 8 + n + end else "is shorter or longer than its header says"


def _read_all(path: Path) -> None:
    import gzip
    import zipfile

    if path.name.endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    elif path.suffix == ".npz":
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"member {bad} is damaged")


_ENDINGS = {".svg": b"</svg>", ".html": b"</html>", ".png": b"IEND\xaeB`\x82"}


def damage(path: str | os.PathLike) -> str | None:
    """What is wrong with an output file, or ``None`` when it is complete and readable.

    A cheap check by format, enough to tell a truncated or emptied file: JSON and TSV
    files are parsed (a TSV file ends with a line end, as :func:`write_tsv` writes it;
    one cut at a line end is told by its size, which the group level's stamps record), gzip (``.nii.gz``) and ``.npz`` files read through (their checksums
    tested), ``.npy`` and ``.safetensors`` files must be as long as their headers say,
    SVG, HTML and PNG files must end as those formats do; anything else must not be
    empty.
    """
    path = Path(path)
    try:
        if not path.is_file():
            return "is missing"
        if path.stat().st_size == 0:
            return "is empty"
        suffix = path.suffix
        if suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix == ".tsv":
            with open(path, "rb") as fh:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    return "is cut short (no line end at its end)"
            table = read_tsv(path)
            if len(table.columns) == 0:
                return "has no header"
        elif suffix == ".npy":
            return _npy_damage(path)
        elif suffix == ".safetensors":
            return _safetensors_damage(path)
        elif suffix in _ENDINGS:
            with open(path, "rb") as fh:
                fh.seek(max(path.stat().st_size - 64, 0))
                if _ENDINGS[suffix] not in fh.read():
                    return "is cut short"
        else:
            _read_all(path)
    except Exception as exc:  # any reader's error means the file cannot be used
        return f"cannot be read ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    return None
