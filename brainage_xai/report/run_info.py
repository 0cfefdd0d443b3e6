"""The report's "About this run": the command line, the configuration and what the run
logged at WARNING level or above, from the files of ``OUTPUT_DIR/logs``.

The command line and configuration are those of ``logs/config-<run>.toml``
(:meth:`brainage_xai.config.Config.write_toml`); the messages those of the run's log
file (``brainage-xai_<level>_<run>.log``, in the format of
:func:`brainage_xai.cli.run.setup_logging`).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from ..bids.derivatives import run_config_path, run_log_path

#: A record of the log file: time, logger, level, message (the message's further lines follow).
_RECORD = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),\d+ (\S+) (DEBUG|INFO|WARNING|ERROR|CRITICAL) (.*)$")
#: Lines of one message kept (a traceback is cut to its last lines).
MAX_LINES = 12


def log_messages(path, min_level: str = "WARNING") -> list[dict]:
    """The records of a log file at ``min_level`` or above, repeated ones counted once:
    ``{"time", "level", "logger", "text", "count"}`` in the order they first came."""
    order = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    keep = set(order[order.index(min_level):])
    records: list[dict] = []
    current = None
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        match = _RECORD.match(line)
        if match:
            time, logger, level, text = match.groups()
            current = {"time": time, "logger": logger, "level": level, "lines": [text]} if level in keep else None
            if current is not None:
                records.append(current)
        elif current is not None:
            current["lines"].append(line)
    out: dict[tuple, dict] = {}
    for rec in records:
        lines = rec.pop("lines")
        if len(lines) > MAX_LINES:
            lines = [*lines[:2], "…", *lines[-(MAX_LINES - 3):]]
        rec["text"] = "\n".join(lines).rstrip()
        key = (rec["level"], rec["text"])
        if key in out:
            out[key]["count"] += 1
        else:
            out[key] = {**rec, "count": 1}
    return list(out.values())


def _setting(value) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) if value else "(none)"
    if isinstance(value, dict):
        return "; ".join(f"{k} = {v}" for k, v in value.items()) if value else "(none)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def about_run(output_dir, run_uuid: str | None, level: str = "group") -> dict | None:
    """What the report says about one run (``None`` when it left no configuration).

    Returns
    -------
    dict
        ``command`` (the command line as given, or ``None`` when the run was started from
        Python), ``cwd``, ``repeat`` (a command line that repeats the run from its
        configuration file), ``settings`` (``(name, value)`` rows of its ``[run]`` table),
        ``environment`` (rows), ``config_file`` and ``config_text`` (the file as written),
        ``log_file`` and ``messages`` (:func:`log_messages`; ``None`` without a log file).
    """
    if run_uuid is None:
        return None
    config_file = run_config_path(output_dir, run_uuid)
    if not config_file.is_file():
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    text = config_file.read_text(encoding="utf-8")
    doc = tomllib.loads(text)
    run = doc.get("run", {})
    invocation = doc.get("invocation") or {}
    command = invocation.get("command")
    log_file = run_log_path(output_dir, level, run_uuid)
    return {
        "command": shlex.join(command) if command else None,
        "cwd": invocation.get("cwd"),
        "repeat": shlex.join(["brainage-xai", str(run.get("bids_dir", "BIDS_DIR")),
                              str(run.get("output_dir", "OUTPUT_DIR")), level,
                              "--config-file", str(config_file)]),
        "settings": [(k, _setting(v)) for k, v in run.items()],
        "environment": [(k, _setting(v)) for k, v in (doc.get("environment") or {}).items()],
        "config_file": f"logs/{config_file.name}",
        "config_text": text,
        "log_file": f"logs/{log_file.name}",
        "messages": log_messages(log_file) if log_file.is_file() else None,
    }
