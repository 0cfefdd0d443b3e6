"""BIDS validation of BIDS_DIR with the bids-validator."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import BIDSValidationError

LOGGER = logging.getLogger("brainage_xai.bids")


def find_validator() -> str | None:
    """The npm ``bids-validator`` executable: on PATH, or in ``.tools/`` (``make tools``)."""
    exe = shutil.which("bids-validator")
    if exe:
        return exe
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
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
