"""Runtime environment for containers and clusters.

Under Docker with ``-u $(id -u)``, under Singularity/Apptainer (read-only image, HOME
bound from the host or missing) and on cluster nodes, the places libraries write their
caches to by default (``~/.cache``, ``~/.config/matplotlib``) are often read-only or do
not exist, and matplotlib, TemplateFlow and torch then fail or warn on their first write
(the ``Read-only file system`` reports that fill fMRIPrep's and MRIQC's issue trackers).
:func:`configure_runtime` points each cache at a writable place before those libraries
are imported, and keeps TemplateFlow offline. :func:`container_info` reads the variables
the image sets (and those Singularity/Apptainer set) for ``GeneratedBy.Container`` in
``dataset_description.json``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

__all__ = ["CACHE_VARIABLES", "available_memory", "configure_runtime", "container_info"]

#: The cache variables :func:`configure_runtime` manages, in the order they are resolved
#: (``XDG_CACHE_HOME`` first: the defaults of the others lie under it).
CACHE_VARIABLES = ("XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCH_HOME", "TEMPLATEFLOW_HOME")

# Where each cache goes under the writable base when its own place is not usable.
_FALLBACK_NAMES = {
    "XDG_CACHE_HOME": "xdg",
    "MPLCONFIGDIR": "matplotlib",
    "TORCH_HOME": "torch",
    "TEMPLATEFLOW_HOME": "templateflow",
}
# Caches whose default location lies under XDG_CACHE_HOME.
_UNDER_XDG_CACHE = ("TORCH_HOME", "TEMPLATEFLOW_HOME")


def _home(environ: Mapping[str, str]) -> Path | None:
    """HOME as the libraries would see it, or ``None`` when there is none.

    With HOME unset, ``os.path.expanduser`` falls back to the password database, which
    has no entry for an arbitrary ``docker run -u 12345`` user.
    """
    home = environ.get("HOME")
    if home:
        return Path(home)
    try:
        import pwd

        return Path(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError):
        return None


def _default_location(name: str, environ: Mapping[str, str]) -> Path | None:
    """Where a library puts the cache ``name`` when its variable is unset."""
    home = _home(environ)
    if name == "MPLCONFIGDIR":
        # matplotlib: $XDG_CONFIG_HOME/matplotlib, else ~/.config/matplotlib (Linux)
        config_home = environ.get("XDG_CONFIG_HOME")
        if config_home:
            return Path(config_home) / "matplotlib"
        return None if home is None else home / ".config" / "matplotlib"
    cache_home = environ.get("XDG_CACHE_HOME")
    if cache_home:
        base = Path(cache_home)
    elif home is not None:
        base = home / ".cache"
    else:
        return None
    return {
        "XDG_CACHE_HOME": base,
        "TORCH_HOME": base / "torch",
        "TEMPLATEFLOW_HOME": base / "templateflow",
    }[name]


def writable(path: Path, create: bool = True) -> bool:
    """True when ``path`` can be created and written to, by actually trying.

    ``os.access`` says yes for root on a read-only bind mount and knows nothing of
    root-squashed NFS, so the only reliable test is a write. With ``create=False`` a
    missing ``path`` is judged by its nearest existing parent and nothing is created,
    so that probing a library's default place does not litter HOME with empty folders.
    """
    probe = path
    if not create:
        while not probe.exists():
            if probe.parent == probe:
                return False
            probe = probe.parent
    try:
        if create:
            probe.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=probe, prefix=".brainage-xai-write-test-"):
            pass
    except OSError:
        return False
    return True


def _populated(path: Path) -> bool:
    """A readable folder with something in it (a prefetched, possibly read-only cache)."""
    try:
        return path.is_dir() and os.access(path, os.R_OK | os.X_OK) and any(path.iterdir())
    except OSError:
        return False


def _usable(name: str, path: Path | None, home: Path | None = None) -> bool:
    if path is None or not path.is_absolute():
        return False
    if home is not None and (path == home or home in path.parents) and not home.is_dir():
        # A missing HOME (HOME=/nonexistent, a user without one) is not judged by its
        # nearest existing parent: writing there would create the missing HOME.
        return False
    if name == "TEMPLATEFLOW_HOME" and _populated(path):
        # The image's /opt/templateflow is read-only on purpose: templates are fetched
        # at build time and only read at run time.
        return True
    return writable(path, create=False)


_TEMP_BASE: Path | None = None


def _temporary_base() -> Path:
    """One private temporary folder per process, removed at exit."""
    global _TEMP_BASE
    if _TEMP_BASE is None or not _TEMP_BASE.is_dir():
        _TEMP_BASE = Path(tempfile.mkdtemp(prefix="brainage-xai-cache-"))
        atexit.register(shutil.rmtree, _TEMP_BASE, ignore_errors=True)
    return _TEMP_BASE


def configure_runtime(
    work_dir: str | os.PathLike | None = None, environ: dict[str, str] | None = None
) -> dict[str, str]:
    """Point the caches of the libraries the app uses at writable places.

    Call it first thing in a run, before matplotlib, TemplateFlow or torch are imported:
    they read these variables once, at import. For each of ``XDG_CACHE_HOME``,
    ``MPLCONFIGDIR``, ``TORCH_HOME`` and ``TEMPLATEFLOW_HOME``, the place it names (or
    the library's default under HOME when it is unset) is kept when it can be written to;
    a TemplateFlow home is also kept when it is a populated read-only folder, such as
    the image's ``/opt/templateflow``. Otherwise the variable is set to a folder under
    ``<work_dir>/cache`` when the work directory is writable, else under a private
    temporary folder that is removed when the process exits. HOME itself is never
    changed or created, and an unset, missing or read-only HOME is fine.

    ``TEMPLATEFLOW_AUTOUPDATE`` is always set to ``0``: the app never goes online.

    Parameters
    ----------
    work_dir : path-like, optional
        The run's work directory (``-w``); caches that need a new home go below it.
    environ : dict, optional
        The environment to read and change; ``os.environ`` by default.

    Returns
    -------
    dict
        The variables that were set, name to value (empty when every cache was fine).
    """
    env = os.environ if environ is None else environ
    original = dict(env)
    changed: dict[str, str] = {}

    def resolve(name: str) -> Path | None:
        value = original.get(name)
        if value:
            try:
                return Path(value).expanduser()
            except RuntimeError:  # "~" with no HOME and no password entry
                return None
        return _default_location(name, original)

    base: Path | None = None
    home = _home(original)
    for name in CACHE_VARIABLES:
        current = resolve(name)
        follows_xdg = name in _UNDER_XDG_CACHE and not original.get(name)
        if _usable(name, current, home):
            if follows_xdg and "XDG_CACHE_HOME" in changed:
                # Its default moves with XDG_CACHE_HOME; pin the usable one (e.g. a
                # prefetched ~/.cache/templateflow under a read-only HOME).
                changed[name] = str(current)
            continue
        if follows_xdg and "XDG_CACHE_HOME" in changed:
            target = Path(changed["XDG_CACHE_HOME"]) / _FALLBACK_NAMES[name]
        else:
            if base is None:
                base = _work_base(work_dir)
            target = base / _FALLBACK_NAMES[name]
        if not writable(target):
            # The work dir passed the first probe but not this one (quota, a race): a
            # private temporary folder is the last resort.
            target = _temporary_base() / _FALLBACK_NAMES[name]
            target.mkdir(parents=True, exist_ok=True)
        changed[name] = str(target)

    changed["TEMPLATEFLOW_AUTOUPDATE"] = "0"
    for name, value in changed.items():
        env[name] = value
    return {k: v for k, v in changed.items() if original.get(k) != v}


def _work_base(work_dir: str | os.PathLike | None) -> Path:
    if work_dir is not None:
        base = Path(work_dir).absolute() / "cache"
        if writable(base):
            return base
    return _temporary_base()


def container_info(environ: Mapping[str, str] | None = None) -> dict | None:
    """The container this process runs in, as BIDS ``GeneratedBy.Container``.

    Singularity/Apptainer set ``APPTAINER_CONTAINER`` / ``SINGULARITY_CONTAINER`` (the
    image file) inside every container, ``--cleanenv`` or not; they are checked first
    because an image built from the Docker image also carries the Docker variables.
    The Docker image sets ``BRAINAGE_XAI_CONTAINER=docker`` and
    ``DOCKER_IMAGE=<name>:<tag>``.

    Parameters
    ----------
    environ : mapping, optional
        The environment to read; ``os.environ`` by default.

    Returns
    -------
    dict or None
        ``{"Type": "singularity", "URI": ..., ["Tag": ...]}``, ``{"Type": "docker",
        "Tag": ...}``, or ``None`` outside a known container.
    """
    env = os.environ if environ is None else environ
    tag = env.get("DOCKER_IMAGE", "").strip()
    for var in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER"):
        uri = env.get(var, "").strip()
        if uri:
            info = {"Type": "singularity", "URI": uri}
            if tag:
                info["Tag"] = tag  # the Docker image the Singularity image was built from
            return info
    kind = env.get("BRAINAGE_XAI_CONTAINER", "").strip().lower()
    if kind:
        info = {"Type": kind}
        if tag:
            info["Tag"] = tag
        return info
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_dirs(proc: Path, cgroup: Path) -> list[Path]:
    """This process's memory-cgroup folders, its own first, then each parent up to the root.

    From ``/proc/self/cgroup``: ``0::/path`` (v2) or ``N:...memory...:/path`` (v1). Under
    SLURM the job's limit sits on a parent of the step's cgroup; in a container with its
    own cgroup namespace the path is ``/`` and the limit is at the mount's root.
    """
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    dirs = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        base = cgroup if parts[0] == "0" and parts[1] == "" else (
            cgroup / "memory" if "memory" in parts[1].split(",") else None)
        if base is None:
            continue
        here = base / parts[2].lstrip("/")
        while True:
            dirs.append(here)
            if here == base or base not in here.parents:
                break
            here = here.parent
    # Without /proc/self/cgroup (or with paths not mounted here): the mount's roots.
    return list(dict.fromkeys(dirs + [cgroup, cgroup / "memory"]))


def available_memory(proc: str | os.PathLike = "/proc", cgroup: str | os.PathLike = "/sys/fs/cgroup") -> int | None:
    """Bytes of memory this process can still take, or None where that cannot be read.

    The kernel's ``MemAvailable``, capped by what every memory cgroup above this process
    still allows (its limit minus its usage): under SLURM, Docker (``--memory``) and
    Kubernetes the job's limit is what the out-of-memory killer enforces, while
    ``/proc/meminfo`` shows the whole node. Both cgroup v2 (``memory.max``,
    ``memory.current``) and v1 (``memory.limit_in_bytes``, ``memory.usage_in_bytes``) are
    read; Linux only.
    """
    proc, cgroup = Path(proc), Path(cgroup)
    available = None
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    for folder in _cgroup_dirs(proc, cgroup):
        for limit_file, usage_file in (("memory.max", "memory.current"),
                                       ("memory.limit_in_bytes", "memory.usage_in_bytes")):
            limit, usage = _read_int(folder / limit_file), _read_int(folder / usage_file)
            if limit is not None and usage is not None and limit < 1 << 60:  # v1's "no limit" is ~2**63
                left = max(limit - usage, 0)
                available = left if available is None else min(available, left)
    return available
