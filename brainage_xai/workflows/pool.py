"""Subjects in parallel: the participant level's process pool (``--n-cpus``).

Each worker is a fresh (spawned) Python process that runs
:func:`~brainage_xai.workflows.participant.process_subject` for one subject at a time, so
a subject's files are written by one process, atomically and sidecar last, exactly as in a
serial run. The workers' log records travel through a queue to the run's own handlers (the
console above the progress bar and the log file in ``logs/``). A stop signal to the run
stops the workers too: subjects not started are cancelled, a running subject is
interrupted the way a serial run's is (its temporary files removed, no sidecar written),
and the run waits for every worker before it reports the stop.

Spawned rather than forked workers: a fork of a process that has started BLAS or torch
threads can hang in the child.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

from ..errors import BrainAgeXAIError, Interrupted, raise_if_stopped

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: What a worker returns for a subject that the stop request cancelled or interrupted.
STOPPED = "stopped"

#: The worker's state: the run's stop event, whether a subject is running, signals taken.
_WORKER: dict = {"stop": None, "running": False, "signalled": []}


def available_cpus() -> int:
    """The CPUs this process may run on (a job's allocation, as ``taskset`` or a SLURM
    cgroup restricts it), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _PicklableRecords(logging.handlers.QueueHandler):
    """Sends a record with its message formatted and its traceback as text (exception
    objects and arguments need not pickle); the run's handlers format the rest."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = logging.makeLogRecord(record.__dict__)
        record.msg, record.args = record.getMessage(), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
        return record


class _ToRunLoggers(logging.Handler):
    """In the run's process: hand a worker's record to the logger of its name, whose
    handlers (reached through the hierarchy) filter and write it as their own."""

    def handle(self, record: logging.LogRecord) -> bool:
        logging.getLogger(record.name).handle(record)
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() does it
        logging.getLogger(record.name).handle(record)


def _on_signal(signum, frame) -> None:
    """A worker's SIGTERM/SIGINT (its own, or sent by :func:`_watch` when the run is
    stopped): interrupt the running subject, once; between subjects, nothing to do."""
    if _WORKER["running"] and not _WORKER["signalled"]:
        _WORKER["signalled"].append(signum)
        raise Interrupted(signum)


def _unraisable(info) -> None:
    # The handler's exception raised inside a finaliser (a weak reference's callback):
    # Python would print it and go on; the subject then runs to its end, written whole.
    if not isinstance(info.exc_value, Interrupted):
        sys.__unraisablehook__(info)


def _watch(stop) -> None:
    stop.wait()
    if _WORKER["running"]:
        os.kill(os.getpid(), signal.SIGTERM)


def _init_worker(log_queue, stop, threads: int, torch_threads: bool) -> None:
    root = logging.getLogger("brainage_xai")
    for name in ("brainage_xai", "py.warnings"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.addHandler(_PicklableRecords(log_queue))
        logger.propagate = False
    root.setLevel(logging.DEBUG)  # the run's handlers choose what they show
    logging.captureWarnings(True)
    # The job's CPUs are shared out between the workers: no BLAS (or torch) thread pool
    # of one worker may take them all. The variables hold for libraries loaded later,
    # threadpoolctl for those already loaded.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import numpy  # noqa: F401  (its BLAS, loaded now under the limit)
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)
    if torch_threads:
        import torch

        torch.set_num_threads(threads)
    _WORKER["stop"] = stop
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    sys.unraisablehook = _unraisable
    threading.Thread(target=_watch, args=(stop,), daemon=True).start()
    # Blocked since the run started this process (a Ctrl-C to the process group while it
    # was starting waited here, and is now ignored: no subject runs yet).
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _attempt(function, args):
    _WORKER["running"] = True
    try:
        if _WORKER["stop"].is_set():
            return STOPPED
        return function(*args)
    except BrainAgeXAIError as exc:
        return exc
    finally:
        _WORKER["running"] = False


def _run_task(function, args):
    """One subject in a worker: the function's result, the :class:`BrainAgeXAIError` it
    raised (as a value, as the serial loop catches it), or :data:`STOPPED`."""
    try:
        return _attempt(function, args)
    except Interrupted:
        _WORKER["running"] = False
        return STOPPED


def run_pool(function, tasks: Iterable[tuple[str, tuple]], n_workers: int, threads: int = 1,
             torch_threads: bool = False) -> Iterator[tuple[str, object]]:
    """Run ``function(*args)`` for every ``(name, args)`` of ``tasks`` on ``n_workers``
    processes; yield ``(name, result)`` as each finishes, in the order they finish.

    A result is the function's return value, the :class:`BrainAgeXAIError` it raised, or
    :data:`STOPPED` when a signal sent to its worker alone (not to the run) stopped it.
    Any other exception of a task is raised here after the other tasks are stopped, as a
    serial loop would raise it. ``function`` must be importable by name (a module-level
    function) and its arguments picklable.

    Raises
    ------
    Interrupted
        A signal asked the run to stop; raised once every worker has stopped.
    """
    context = multiprocessing.get_context("spawn")
    log_queue, stop = context.Queue(), context.Event()
    listener = logging.handlers.QueueListener(log_queue, _ToRunLoggers())
    listener.start()
    executor = None
    try:
        # The workers start with the stop signals blocked (a mask survives fork and exec)
        # until their handlers are in place; this process still gets them (its other
        # threads take them, and the main thread runs the handler).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            executor = ProcessPoolExecutor(
                n_workers, mp_context=context, initializer=_init_worker,
                initargs=(log_queue, stop, threads, torch_threads),
            )
            names = {executor.submit(_run_task, function, args): name for name, args in tasks}
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        pending = set(names)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            raise_if_stopped()
            for future in sorted(done, key=names.get):
                result = future.result()
                if isinstance(result, str) and result == STOPPED:
                    raise_if_stopped()  # else a signal stopped that worker alone
                yield names[future], result
    except BaseException:
        stop.set()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
        listener.stop()
        log_queue.close()
        log_queue.join_thread()
