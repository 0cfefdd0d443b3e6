"""The ``brainage-xai`` entry point: wire a parsed configuration to the levels.

No science here. ``main`` sets up writable caches, checks that OUTPUT_DIR can be written,
starts logging (the console through tqdm, so that a message never breaks a progress bar,
and ``OUTPUT_DIR/logs/``), writes the run configuration as TOML, validates BIDS_DIR, and
dispatches to the participant or group level. Errors the user can act on
(:class:`~brainage_xai.errors.BrainAgeXAIError`) become one line on stderr and the
documented exit code.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from pathlib import Path

from ..errors import (
    EX_FAILURE,
    BrainAgeXAIError,
    Interrupted,
    OutputError,
    UsageError,
    request_stop,
    stop_requested,
)
from ..utils.env import writable

LOGGER = logging.getLogger("brainage_xai")
LOGGER.addHandler(logging.NullHandler())


def check_extras(config) -> None:
    """Refuse an option whose optional extra is not installed (exit 2, nothing written)."""
    import importlib

    needs = []
    if config.tune:
        needs.append(("optuna", "tune", f"--tune {config.tune}"))
    if config.dask_scheduler is not None:
        needs.append(("dask.distributed", "dask", "--dask-scheduler"))
    for module, extra, option in needs:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UsageError(
                f"{option} needs the optional package {module.split('.')[0]}, which is not "
                f"installed: pip install 'brainage-xai[{extra}]'"
            ) from None


def check_labels(config) -> None:
    """Refuse a ``--participant-label`` with no ``sub-<label>`` folder in BIDS_DIR or the
    derivatives searched (exit 2), before OUTPUT_DIR or its logs are created.

    The participant level checks the labels against the PyBIDS index again; this check
    only needs the folder names, so a wrong call leaves nothing behind.
    """
    if config.analysis_level != "participant" or not config.participant_label:
        return
    from ..bids.layout import default_derivatives

    roots = [Path(config.bids_dir), *(
        config.derivatives or default_derivatives(config.bids_dir, exclude=[config.output_dir])
    ).values()]
    available = sorted({p.name[len("sub-"):] for root in roots for p in Path(root).glob("sub-*")
                        if p.is_dir()})
    unknown = [label for label in config.participant_label if label not in available]
    if unknown:
        raise UsageError(
            f"participant label(s) {', '.join(unknown)} not found in {config.bids_dir} "
            f"({len(available)} subjects: {', '.join(available[:8])}{' ...' if len(available) > 8 else ''})"
        )


def check_output_dir(path: Path) -> None:
    """Create OUTPUT_DIR (or the work dir) and prove it writable, else exit 73."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {path}: {exc.strerror}") from exc
    if not writable(path):
        raise OutputError(f"output folder {path} is not writable")


class ConsoleFormatter(logging.Formatter):
    """One line per message on the console: no traceback (the log file has it), and a
    Python warning without the source line that ``warnings`` appends."""

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)
        record.exc_info = record.exc_text = record.stack_info = None
        if record.name == "py.warnings":
            record.msg, record.args = record.getMessage().strip().splitlines()[0], None
        return super().format(record)


def _on_console(level: int):
    """The console's filter: records at ``level`` and above, except those logged with
    ``extra={"console": False}`` (what the command line prints itself)."""
    return lambda record: record.levelno >= level and getattr(record, "console", True)


def setup_logging(config) -> Path:
    """Console and file logging; returns the log file path.

    ``--quiet`` leaves warnings only, ``-v`` adds debug messages; the file in
    ``OUTPUT_DIR/logs/`` always has everything. The console handler is a plain stream
    handler whose level is also a filter, so that :func:`console` can hand it to tqdm
    (filters travel, levels do not).
    """
    level = logging.WARNING if config.quiet else (logging.DEBUG if config.verbose else logging.INFO)
    LOGGER.setLevel(logging.DEBUG)
    LOGGER.propagate = False
    for handler in list(LOGGER.handlers):
        LOGGER.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(ConsoleFormatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    console.setLevel(level)
    console.addFilter(_on_console(level))
    LOGGER.addHandler(console)

    from ..bids.derivatives import run_log_path

    config.log_dir.mkdir(parents=True, exist_ok=True)
    log_file = run_log_path(config.output_dir, config.analysis_level, config.run_uuid)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    LOGGER.addHandler(handler)
    # Python warnings (e.g. an RoI left empty by thresholding) go to the same console
    # and log file, formatted like the rest, instead of bare to stderr.
    logging.captureWarnings(True)
    py_warnings = logging.getLogger("py.warnings")
    py_warnings.propagate = False
    for h in list(py_warnings.handlers):
        py_warnings.removeHandler(h)
    py_warnings.addHandler(console)
    py_warnings.addHandler(handler)
    return log_file


def console():
    """The console messages written through tqdm while it runs, so that a log line is
    printed above the progress bars instead of into one."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm(loggers=[LOGGER, logging.getLogger("py.warnings")])


def _close_logging() -> None:
    py_warnings = logging.getLogger("py.warnings")
    for h in list(py_warnings.handlers):
        py_warnings.removeHandler(h)
    logging.captureWarnings(False)
    for handler in list(LOGGER.handlers):
        LOGGER.removeHandler(handler)
        handler.close()
    # Messages logged after the run's handlers are gone (an error the command line prints
    # itself) go nowhere, rather than to Python's last-resort handler on stderr.
    LOGGER.addHandler(logging.NullHandler())


def run(config, command: list[str] | None = None) -> int:
    """Run one level with a parsed configuration; returns the exit code.

    ``command``, the command line that gave ``config``, is written to the run's
    configuration in ``logs/`` (the group report shows it).
    """
    from ..utils.env import configure_runtime

    check_extras(config)
    check_labels(config)
    check_output_dir(config.output_dir)
    if config.work_dir is not None:
        check_output_dir(config.work_dir)
    # Before matplotlib, TemplateFlow or torch are imported: they read these at import.
    configure_runtime(config.work)
    log_file = setup_logging(config)
    with console():
        return _run_level(config, log_file, command)


def _run_level(config, log_file: Path, command: list[str] | None = None) -> int:
    from ..utils.io import remove_stale_temporaries

    for folder in dict.fromkeys([config.output_dir, config.work]):
        stale = remove_stale_temporaries(folder)
        if stale:
            LOGGER.info("removed %d temporary file(s) left by an interrupted run in %s", len(stale), folder)
    try:
        config.write_toml(command)
    except OSError as exc:
        raise OutputError(f"cannot write the run configuration to {config.log_dir}: {exc}") from exc
    LOGGER.info("brainage-xai %s level on %s -> %s", config.analysis_level, config.bids_dir, config.output_dir)
    LOGGER.debug("log file: %s", log_file)
    from ..bids.layout import check_symlink_cycles

    for folder in dict.fromkeys([config.bids_dir, *(config.derivatives or {}).values()]):
        check_symlink_cycles(folder, exclude=[config.output_dir, config.work])

    if config.skip_bids_validation:
        LOGGER.info("BIDS validation skipped (--skip-bids-validation)")
    else:
        from ..bids import validate_dataset

        if validate_dataset(config.bids_dir, config.participant_label):
            LOGGER.info("BIDS validation passed")

    if config.analysis_level == "participant":
        from ..workflows.participant import run as run_participant

        return int(run_participant(config) or 0)
    from ..workflows.group import run as run_group

    return int(run_group(config) or 0)


#: The signals that stop a run cleanly (:class:`~brainage_xai.errors.Interrupted`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and SIGINT raise :class:`~brainage_xai.errors.Interrupted` in the main
    thread, once: a second signal while the run unwinds (removing its temporary files)
    is ignored. The previous handlers come back on exit. Outside the main thread (where
    Python cannot install handlers) nothing changes."""
    previous, stopping = {}, []

    def handler(signum, frame):
        if stopping:
            return
        stopping.append(signum)
        request_stop(signum)
        raise Interrupted(signum)

    def unraisable(info):
        # The handler's exception raised inside a finaliser: Python would print it and
        # go on; the run stops at its next step instead (raise_if_stopped), quietly.
        if isinstance(info.exc_value, Interrupted):
            LOGGER.debug("stop request raised in %r; the run stops at its next step", info.object)
            return
        default_hook(info)

    request_stop(None)
    default_hook = sys.unraisablehook
    try:
        for sig in STOP_SIGNALS:
            previous[sig] = signal.signal(sig, handler)
        sys.unraisablehook = unraisable
    except ValueError:  # not the main thread
        pass
    try:
        yield
        if stop_requested() is not None:  # swallowed and never reached a step boundary
            raise Interrupted(stop_requested())
    finally:
        request_stop(None)
        sys.unraisablehook = default_hook
        for sig, old in previous.items():
            signal.signal(sig, old)


def _interrupted(exc: Interrupted) -> int:
    request_stop(None)  # answered
    message = f"brainage-xai: stopped by {exc}; temporary files removed, a rerun resumes"
    LOGGER.error(message, extra={"console": False})
    print(message, file=sys.stderr)
    return exc.exit_code


def main(argv=None) -> int:
    """``brainage-xai BIDS_DIR OUTPUT_DIR {participant,group} [options]``.

    Returns the exit code (0 ok; see ``--help`` for the others) instead of exiting, so
    that the demo and tests can call it.
    """
    from .parser import parse_args

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        with stop_on_signals():
            try:
                return run(config, command=["brainage-xai", *argv])
            except Interrupted as exc:
                return _interrupted(exc)
            except KeyboardInterrupt:  # SIGINT outside the main thread's handler
                return _interrupted(Interrupted(signal.SIGINT))
            except BrainAgeXAIError as exc:
                LOGGER.error("%s", exc, extra={"console": False})
                LOGGER.debug("details", exc_info=True, extra={"console": False})
                print(f"brainage-xai: error: {exc}", file=sys.stderr)
                return exc.exit_code
            except Exception as exc:
                LOGGER.error("unexpected failure", exc_info=True, extra={"console": False})
                print(
                    f"brainage-xai: error: unexpected {type(exc).__name__}: {' '.join(str(exc).split())} "
                    f"(the traceback is in the log file in {config.log_dir})",
                    file=sys.stderr,
                )
                return EX_FAILURE
    except Interrupted as exc:  # a signal between two handlers above
        return _interrupted(exc)
    finally:
        _close_logging()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
