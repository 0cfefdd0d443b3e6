"""BIDS validation of BIDS_DIR with the BIDS validator (PyPI ``bids-validator-deno``).

The validator is a dependency of the package: pip installs its entry point next to the
app's own (``sys.prefix/bin``), where it is looked for first, then on the absolute
entries of PATH; never in the current directory. Its JSON report is parsed here; errors
in subjects that the run does not touch do not stop it (as fMRIPrep), every other error
does, with one line naming the first. A validator that crashes, prints something that is
not its report, or runs past :data:`TIMEOUT_S` gives one line too, never its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ..errors import BIDSValidationError, BrainAgeXAIError

LOGGER = logging.getLogger("brainage_xai.bids")

#: The entry point of the PyPI package ``bids-validator-deno``.
VALIDATOR = "bids-validator-deno"
#: Seconds the validator may run before the run stops (a large dataset takes minutes).
TIMEOUT_S = 1800
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SHORT = 160  # characters of a message or a path quoted in the one-line error


def find_validator() -> str | None:
    """The validator's executable: in the app's environment, else on PATH; or ``None``.

    Relative PATH entries (``.``, empty) are skipped, so that a file in the current
    directory is never run.
    """
    scripts = Path(sys.prefix) / ("Scripts" if os.name == "nt" else "bin")
    own = shutil.which(VALIDATOR, path=str(scripts))
    if own:
        return own
    absolute = [p for p in os.environ.get("PATH", "").split(os.pathsep) if os.path.isabs(p)]
    return shutil.which(VALIDATOR, path=os.pathsep.join(absolute)) if absolute else None


def _short(text: str, limit: int = _SHORT) -> str:
    text = " ".join(_ANSI.sub("", str(text)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(text: str) -> str:
    """The first non-empty line of a program's output, without colour codes."""
    for line in _ANSI.sub("", text or "").splitlines():
        if line.strip():
            return _short(line)
    return "no output"


def _locations(issue: dict) -> list[str]:
    where = issue.get("location")
    if isinstance(where, str) and where:
        return [where]
    affects = issue.get("affects")
    return [a for a in affects if isinstance(a, str)] if isinstance(affects, list) else []


def _concerns(issue: dict, wanted: set[str] | None) -> bool:
    """Whether an error stops a run on the subjects ``wanted`` (``None``: all of them).

    An error in a file of another subject does not; one in a dataset-wide file does.
    """
    if wanted is None:
        return True
    locations = _locations(issue)
    if not locations:
        return True
    for location in locations:
        first = location.strip("/").split("/", 1)[0]
        if not first.startswith("sub-") or first in wanted:
            return True
    return False


def _read_report(proc: subprocess.CompletedProcess, bids_dir) -> list[dict]:
    """The issues of the validator's JSON report; a one-line error if there is none."""
    try:
        report = json.loads(proc.stdout)
        issues = report["issues"]["issues"]
        if not isinstance(issues, list):
            raise TypeError("issues is not a list")
        return [i for i in issues if isinstance(i, dict)]
    except (ValueError, KeyError, TypeError):
        detail = _first_line(proc.stderr) if (proc.stderr or "").strip() else _first_line(proc.stdout)
        raise BIDSValidationError(
            f"the BIDS validator could not validate {bids_dir} (exit {proc.returncode}: "
            f"{detail}); use --skip-bids-validation to run anyway"
        ) from None


def validate_dataset(bids_dir, participant_label=None, *, timeout: float = TIMEOUT_S) -> bool:
    """Run the BIDS validator on BIDS_DIR; ``True`` when it passed.

    Parameters
    ----------
    bids_dir : path-like
        The raw dataset (``derivatives/`` inside it is not validated).
    participant_label : list of str, optional
        The subjects of the run (without ``sub-``): errors in other subjects' files are
        logged and ignored.
    timeout : float
        Seconds before the validator is stopped.

    Raises
    ------
    BIDSValidationError
        The validator found errors, crashed, printed no report or did not finish in
        time (exit 16).
    BrainAgeXAIError
        The validator is not installed (exit 1).
    """
    exe = find_validator()
    if exe is None:
        raise BrainAgeXAIError(
            f"the BIDS validator ({VALIDATOR}) is in neither {sys.prefix} nor PATH; "
            "reinstall brainage-xai (it depends on bids-validator-deno) or pass "
            "--skip-bids-validation"
        )
    cmd = [exe, "--format", "json", "--ignoreNiftiHeaders", "--no-color", str(bids_dir)]
    # No colour codes, no check for a newer Deno (the run is offline).
    env = {**os.environ, "NO_COLOR": "1", "DENO_NO_UPDATE_CHECK": "1"}
    LOGGER.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
            check=False, env=env, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise BIDSValidationError(
            f"the BIDS validator did not finish on {bids_dir} within {timeout:g} s; "
            "use --skip-bids-validation to run anyway"
        ) from None
    except OSError as exc:
        raise BrainAgeXAIError(f"the BIDS validator ({exe}) could not start: {exc}") from exc
    issues = _read_report(proc, bids_dir)
    errors = [i for i in issues if i.get("severity") == "error"]
    wanted = {f"sub-{s}" for s in participant_label} if participant_label else None
    stopping = [e for e in errors if _concerns(e, wanted)]
    ignored = len(errors) - len(stopping)
    if ignored:
        LOGGER.info("BIDS validator: %d error(s) in subjects this run does not process, ignored", ignored)
    warnings = sum(1 for i in issues if i.get("severity") == "warning")
    LOGGER.debug("BIDS validator: %d error(s), %d warning(s)", len(errors), warnings)
    if stopping:
        first = stopping[0]
        locations = _locations(first)
        what = _short(first.get("code", "?"), 60)
        detail = first.get("issueMessage") or first.get("subCode")
        if detail:
            what += f" ({_short(detail, 80)})"
        where = f" at {_short(locations[0])}" if locations else ""
        raise BIDSValidationError(
            f"{bids_dir} failed BIDS validation with {len(stopping)} error(s); first: "
            f"{what}{where}; use --skip-bids-validation to run anyway"
        )
    if proc.returncode not in (0, 16):
        # A report without errors but an unexpected exit: say so, do not trust it.
        raise BIDSValidationError(
            f"the BIDS validator exited with {proc.returncode} on {bids_dir} "
            f"({_first_line(proc.stderr)}); use --skip-bids-validation to run anyway"
        )
    return True
