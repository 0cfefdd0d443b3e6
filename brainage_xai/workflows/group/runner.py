"""The group level's stage runner: the shared state, stage keys and stamps.

A stage is a function ``stage(ctx: GroupContext) -> None`` that does four things only:
compute its key from its settings and inputs (:meth:`GroupContext.key`), return early
after loading its results into ``ctx`` when :meth:`GroupContext.is_done` says that the
same key produced outputs that still exist, otherwise call library functions, write its
outputs (:attr:`GroupContext.out` names every file) and :meth:`GroupContext.mark_done`.
Stamps live in the work directory; the model stage also recognises a trained model by
the key in its own metadata, so deleting the work directory never forces retraining.

Where the outputs go: ``OUTPUT_DIR/group/`` holds one analysis (one map). When it
already holds an analysis of another map (``group/analysis.json``), or a
``group/map-<name>/`` folder exists for this map, the analysis goes to
``group/map-<name>/`` instead, with the same layout; the work directory mirrors this
(``WORK/group[/map-<name>]/``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ...bids.derivatives import GroupOutputs
from ...errors import OutputError, raise_if_stopped
from ...selection.splits import SPLIT_NAMES, Splits
from ...utils.io import damage, write_json

LOGGER = logging.getLogger("brainage_xai.group")


def digest(data) -> str:
    """SHA-256 of ``data`` as canonical JSON."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def analysis_dirs(config) -> tuple[Path, Path]:
    """``(group_dir, work_dir)`` of this run's analysis (see the module docstring)."""
    root = Path(config.output_dir) / "group"
    sub = f"map-{config.map}"
    marker = root / "analysis.json"
    nested = (root / sub).is_dir()
    if not nested and marker.is_file():
        try:
            nested = json.loads(marker.read_text()).get("map") != config.map
        except (OSError, ValueError):
            nested = False
    if nested:
        return root / sub, Path(config.work) / "group" / sub
    return root, Path(config.work) / "group"


@dataclass
class GroupContext:
    """State shared by the stages of one group run."""

    config: object
    out: GroupOutputs
    device: torch.device
    method: str = "consensus"
    n_networks: int = 1
    constraints: str = "nonneg"
    layer: str | None = None  # resolved by the layer stage
    tensor: str | None = None
    subjects: list = field(default_factory=list)
    paths: list = field(default_factory=list)
    targets: pd.DataFrame | None = None
    inputs_sha: str = ""
    input_shape: tuple = ()
    input_affine: np.ndarray | None = None
    split: pd.Series | None = None
    model: object = None
    model_meta: dict = field(default_factory=dict)
    model_path: Path | None = None
    model_sha: str = ""
    predictions: pd.DataFrame | None = None
    metrics: dict = field(default_factory=dict)
    activations: object = None
    selection: dict = field(default_factory=dict)
    consensus: dict = field(default_factory=dict)
    layer_key: str = ""
    selection_key: str = ""
    consensus_key: str = ""
    explanations_key: str = ""
    _maps: np.ndarray | None = None
    _template: object = None

    @property
    def group_dir(self) -> Path:
        return Path(self.out.group_dir)

    @property
    def work_dir(self) -> Path:
        return Path(self.out.work_dir)

    @property
    def template(self):
        """The template on the model grid (:func:`brainage_xai.imaging.templates.get_template`)."""
        if self._template is None:
            from ...imaging.templates import get_template

            self._template = get_template(self.config.resolution)
        return self._template

    @property
    def maps(self) -> np.ndarray:
        """All preprocessed maps ``(n, 1, *grid)``, loaded on first use."""
        if self._maps is None:
            from ...model.data import load_maps

            self._maps, _ = load_maps(self.paths)
        return self._maps

    def map_dataset(self, standardised: bool = True, workers: int | None = None):
        """The maps on disk, read one batch at a time by a DataLoader
        (:class:`~brainage_xai.model.data.MapDataset`; loader processes from ``--n-cpus``
        unless ``workers`` is given): the same inputs as :meth:`standardised_inputs` (or
        :attr:`maps`) without holding the cohort."""
        from ...model.data import MapDataset, loader_workers

        norm = self.model_meta["normalisation"] if standardised else None
        if workers is None:
            workers = loader_workers(self.config.n_cpus, self.device)
        return MapDataset(self.paths, norm, workers=workers)

    def standardised_inputs(self) -> torch.Tensor:
        """The maps as the network sees them (its input normalisation)."""
        from ...model.data import standardise_inputs

        return standardise_inputs(self.maps, self.model_meta["normalisation"])

    @property
    def split_sha(self) -> str:
        return digest(self.split.to_dict())

    @property
    def targets_sha(self) -> str:
        return digest(self.targets.to_dict(orient="list") | {"index": list(self.targets.index)})

    def rows(self, split: str) -> np.ndarray:
        """Row indices (in ``subjects`` order) of one split."""
        return np.flatnonzero(self.split.loc[self.subjects].to_numpy() == split)

    def split_rows(self) -> Splits:
        """Row indices of each split in the activation tensor's subject order."""
        return Splits(*(self.activations.rows(s) for s in SPLIT_NAMES))

    def target_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` of the targets as the network was trained on them."""
        norm = self.model_meta["normalisation"]
        return np.asarray(norm["target_mean"], float), np.asarray(norm["target_std"], float)

    # -- skip-if-done -------------------------------------------------------------------
    def key(self, **parts) -> str:
        """A digest of a stage's settings and inputs, and of the package version.

        The version is part of every key: a work directory left by another release is
        not trusted (its code may have computed something else), as fMRIPrep does not
        reuse work directories across versions. ``--model`` reuses a network explicitly.
        """
        from ..._version import __version__

        return digest({**parts, "version": __version__})

    def _stamp(self, stage: str) -> Path:
        return self.out.stamps / f"{stage}.json"

    def is_done(self, stage: str, key: str, outputs) -> bool:
        """True when ``stage`` last ran with ``key`` and all its outputs are complete.

        The outputs checked are ``outputs`` and those the stamp records (paths relative
        to the analysis folder, with their sizes): one that is missing, unreadable
        (:func:`~brainage_xai.utils.io.damage`) or of another size than when it was
        written makes the stage run again, with a log line that says which file. JSON
        files are checked by parsing only (a cut JSON file does not parse), so that a
        later stage may add to one (``metrics.json``).
        """
        try:
            stamp = json.loads(self._stamp(stage).read_text())
        except (OSError, ValueError):
            return False
        if not isinstance(stamp, dict) or stamp.get("key") != key:
            return False
        recorded = stamp.get("outputs", {})
        if not isinstance(recorded, dict):  # a stamp without sizes
            recorded = dict.fromkeys(recorded)
        sizes = {os.path.normpath(self.group_dir / name): size for name, size in recorded.items()}
        for path in dict.fromkeys([*(os.path.normpath(p) for p in outputs), *sizes]):
            problem = damage(path)
            if problem is None and sizes.get(path) is not None and Path(path).stat().st_size != sizes[path]:
                problem = f"has changed size since it was written ({Path(path).stat().st_size} bytes, not {sizes[path]})"
            if problem:
                LOGGER.warning("%s: %s %s; running the stage again", stage, self._shown(Path(path)), problem)
                return False
        LOGGER.info("%s: up to date, skipped", stage)
        return True

    def _shown(self, path: Path) -> str:
        """``path`` as a user finds it: relative to OUTPUT_DIR where it lies inside."""
        try:
            return str(Path(path).relative_to(self.config.output_dir))
        except ValueError:
            return str(path)

    def mark_done(self, stage: str, key: str, outputs) -> None:
        """Record that ``stage`` produced ``outputs`` with ``key``, once every one of them
        is complete and readable (:func:`~brainage_xai.utils.io.damage`)."""
        outputs = [Path(p) for p in outputs]
        for path in outputs:
            problem = damage(path)
            if problem:
                raise OutputError(f"{stage}: {path} {problem} right after it was written "
                                  "(full disk or quota?)")
        sizes = {os.path.relpath(p, self.group_dir): None if p.suffix == ".json" else p.stat().st_size
                 for p in outputs}
        write_json(self._stamp(stage), {"key": key, "outputs": sizes})


Stage = Callable[[GroupContext], None]


def default_tensor(ctx: GroupContext) -> str:
    """The tensor decomposed when ``--tensor`` is not given and the layer is."""
    return "activations" if ctx.method == "paper" else "deviations"


#: Networks of the consensus unless ``--ensemble`` says otherwise, by device.
NETWORKS = {"cpu": 3, "cuda": 5}


def make_context(config) -> GroupContext:
    """A fresh :class:`GroupContext` for ``config`` (threads, device and method set up)."""
    from ...imaging.templates import TEMPLATE_NAME
    from ...model.training import resolve_device

    if config.n_cpus:
        torch.set_num_threads(int(config.n_cpus))
    group_dir, work_dir = analysis_dirs(config)
    out = GroupOutputs(group_dir, work_dir, space=TEMPLATE_NAME, resolution=config.resolution)
    device = resolve_device(config.device)
    paper = config.method == "paper"
    networks = config.ensemble or (1 if paper else NETWORKS.get(device.type, NETWORKS["cpu"]))
    return GroupContext(config=config, out=out, device=device, method=config.method,
                        n_networks=int(networks),
                        constraints=config.constraints or ("paper" if paper else "nonneg"))


def run_stages(ctx: GroupContext, stages) -> int:
    """Run ``stages`` (``(name, function)`` pairs) in order; returns the exit code (0)."""
    for name, stage in stages:
        raise_if_stopped()
        LOGGER.debug("stage %s", name)
        stage(ctx)
    return 0
