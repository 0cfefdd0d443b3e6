"""The one configuration object of a run.

The command line fills a :class:`Config`; every stage reads its settings from it, and
the run writes it to ``OUTPUT_DIR/logs/`` as TOML at start so that a run can be repeated
exactly (as fMRIPrep's ``config.toml``): ``--config-file`` reads it back
(:func:`read_toml`). Nothing here does any science.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

MAP_PRESETS = ("volume", "stiffness")
#: What the group level explains: the consensus over networks and resamples (the default,
#: beyond the paper), or the paper's method on one network.
METHODS = ("consensus", "paper")
TENSORS = ("activations", "deviations", "relevance")
CONSTRAINTS = ("nonneg", "paper")
DEVICES_HELP = "auto (CUDA when present), cpu, cuda or cuda:N"


@dataclass
class Config:
    """Settings of one run; paths are absolute ``Path`` objects."""

    bids_dir: Path
    output_dir: Path
    analysis_level: str  # "participant" or "group"
    participant_label: list[str] | None = None  # without "sub-"
    derivatives: dict[str, Path] = field(default_factory=dict)
    bids_filter_file: Path | None = None
    bids_filters: dict | None = None  # the parsed filter file
    map: str = "volume"
    target: list[str] = field(default_factory=lambda: ["age"])
    resolution: int = 2  # model grid voxel size in mm
    work_dir: Path | None = None
    n_cpus: int | None = None
    device: str = "auto"
    random_seed: int = 0
    skip_bids_validation: bool = False
    allow_resample: bool = False  # resample maps whose grid is MNI but not the model's
    model: Path | None = None
    method: str = "consensus"  # or "paper": one network, as the method's paper did
    layer: str | None = None  # None: chosen on validation subjects (consensus); the last (paper)
    tensor: str | None = None  # "activations", "deviations", "relevance"; None: as the method says
    constraints: str | None = None  # "nonneg" or "paper"; None: as the method says
    ranks: tuple[int, int] | None = None
    l1: float | None = None  # --lambda
    rank_grid: list[int] | None = None
    lambda_grid: list[float] | None = None
    dask_scheduler: str | None = None  # address of a Dask scheduler for the sweeps
    tune: int = 0
    epochs: int | None = None
    ensemble: int | None = None  # networks (seeds random_seed, +1, ...); None: sized to the device
    resamples: int = 4  # fits per network in the consensus: all training subjects, then bootstraps
    backprojection: bool = True  # back-project each RoI's loading to the input (--no-backprojection)
    # Network widths/depths per block; None: the paper's (8..128 channels, 3-4-6-4-3 units).
    widths: list[int] | None = None
    depths: list[int] | None = None
    verbose: int = 0
    quiet: bool = False
    run_uuid: str = field(
        default_factory=lambda: f"{_dt.datetime.now():%Y%m%d-%H%M%S}_{uuid.uuid4().hex[:8]}"
    )

    @property
    def log_dir(self) -> Path:
        from .bids.derivatives import log_dir

        return log_dir(self.output_dir)

    @property
    def work(self) -> Path:
        """The work directory (``-w``); by default the hidden ``OUTPUT_DIR/.work``."""
        return self.work_dir if self.work_dir is not None else self.output_dir / ".work"

    def to_dict(self) -> dict:
        """A TOML-serialisable dict (paths as strings, ``None`` left out).

        The filter query is kept as JSON text: its ``null`` ("entity absent") has no TOML
        equivalent.
        """
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.name == "bids_filters":
                value = json.dumps(value, sort_keys=True)
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, dict):
                value = {k: str(v) if isinstance(v, Path) else v for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def write_toml(self, command: list[str] | None = None) -> Path:
        """Write the configuration to ``logs/config-<run_uuid>.toml`` and return its path.

        ``command``, the command line as given (program name first), is kept in the
        ``[invocation]`` table, with the working folder it was given in; ``--config-file``
        reads only ``[run]``.
        """
        import tomli_w

        from .bids.derivatives import run_config_path
        from .utils.io import write_text

        env = {
            k: os.environ[k]
            for k in ("SINGULARITY_NAME", "APPTAINER_NAME", "DOCKER_IMAGE", "BRAINAGE_XAI_CONTAINER")
            if k in os.environ
        }
        doc = {"run": self.to_dict(), "environment": env}
        if command is not None:
            doc["invocation"] = {"command": [str(a) for a in command], "cwd": os.getcwd()}
        return write_text(run_config_path(self.output_dir, self.run_uuid), tomli_w.dumps(doc))


def read_toml(path) -> dict:
    """The settings (the ``[run]`` table) of a file written by :meth:`Config.write_toml`,
    the filter query decoded.

    Raises
    ------
    OSError
        The file cannot be read.
    ValueError
        It is not TOML, or has no ``[run]`` table.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    with open(path, "rb") as fh:
        doc = tomllib.load(fh)
    run = doc.get("run")
    if not isinstance(run, dict):
        raise ValueError("no [run] table (not a brainage-xai run configuration)")
    if isinstance(run.get("bids_filters"), str):
        run["bids_filters"] = json.loads(run["bids_filters"])
    return run
