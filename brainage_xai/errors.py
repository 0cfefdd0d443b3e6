"""Exit codes and the exceptions that carry them.

Exit codes follow the BIDS-Apps 2.0 draft (BEP027), as listed in DESIGN.md. Code that
finds bad input raises one of these exceptions with a one-line message; the command line
catches them, prints ``brainage-xai: error: <message>`` and exits with ``exit_code``.
"""

from __future__ import annotations

EX_OK = 0
EX_FAILURE = 1
EX_USAGE = 2  # argparse's own code; 64 is accepted as the BEP027 equivalent
EX_USAGE_BEP027 = 64
EX_BIDS_INVALID = 16
EX_NO_MATCH = 18
EX_DATAERR = 65
EX_NOINPUT = 66
EX_CANTCREAT = 73


class BrainAgeXAIError(Exception):
    """Base class: an error the user can act on, with an exit code."""

    exit_code = EX_FAILURE

    def __init__(self, message: str, *, exit_code: int | None = None):
        # One line only: the CLI prints it as is.
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(BrainAgeXAIError):
    """Wrong call (unknown label, conflicting options)."""

    exit_code = EX_USAGE


class BIDSValidationError(BrainAgeXAIError):
    """The input dataset failed BIDS validation."""

    exit_code = EX_BIDS_INVALID


class NoMatchError(BrainAgeXAIError):
    """Filters matched no files."""

    exit_code = EX_NO_MATCH


class DataError(BrainAgeXAIError):
    """Input data is present but unusable (not in MNI space, NaN, corrupt, 4D, ...)."""

    exit_code = EX_DATAERR


class MissingInputError(BrainAgeXAIError):
    """A required input (map, column, template, model) is missing."""

    exit_code = EX_NOINPUT


class OutputError(BrainAgeXAIError):
    """The output (or work) directory cannot be created or written."""

    exit_code = EX_CANTCREAT


class Interrupted(BaseException):
    """The run was stopped by a signal (SIGTERM from ``scancel``/``docker stop``, SIGINT
    from Ctrl-C); exit code ``128 + signal number`` (143, 130), as a shell reports it.

    A ``BaseException``, as ``KeyboardInterrupt``: no ``except Exception`` of a library
    swallows it, and every ``finally`` on the way out runs (temporary files removed).
    """

    def __init__(self, signum: int):
        import signal

        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        super().__init__(name)


#: The signal that asked the run to stop, once one has (see :func:`raise_if_stopped`).
_STOP_REQUESTED: list[int] = []


def request_stop(signum: int | None) -> None:
    """Record that a signal asked the run to stop (``None``: forget it, for a new run)."""
    _STOP_REQUESTED.clear()
    if signum is not None:
        _STOP_REQUESTED.append(int(signum))


def stop_requested() -> int | None:
    """The signal that asked the run to stop and has not been answered yet, if any."""
    return _STOP_REQUESTED[0] if _STOP_REQUESTED else None


def raise_if_stopped() -> None:
    """Raise :class:`Interrupted` again when a signal asked the run to stop.

    A signal handler's exception is raised wherever the main thread happens to be; when
    that is a finaliser (a weak reference's callback, ``__del__``), Python prints it and
    goes on. The loops of the levels call this between their steps (stages, subjects),
    so that such a stop still ends the run at the next step.
    """
    if _STOP_REQUESTED:
        raise Interrupted(_STOP_REQUESTED[0])
