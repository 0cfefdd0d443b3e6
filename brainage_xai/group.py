"""The group level: a sequence of stages, each skipped on a re-run when done.

Part 1 (this module's stages): load the preprocessed maps and the targets, split the
subjects (60/20/20, stratified), train the 3D ResNet (or load ``--model``), predict and
write the brain-age gap and metrics, and store the activation tensor for the
decomposition. Later stages are appended to :data:`STAGES`.

A stage is a function ``stage(ctx: GroupContext) -> None``. It computes a key from its
settings and inputs (:meth:`GroupContext.key`), returns early after loading its results
into ``ctx`` when :meth:`GroupContext.is_done` says that the same key produced outputs that
still exist, and otherwise does its work and calls :meth:`GroupContext.mark_done`.
Stamps live in the work directory; the model stage also recognises a trained model by the
key in its own metadata, so deleting the work directory never forces retraining.

Where the outputs go: ``OUTPUT_DIR/group/`` holds one analysis (one map). When it
already holds an analysis of another map (``group/analysis.json``), or a
``group/map-<name>/`` folder exists for this map, the analysis goes to
``group/map-<name>/`` instead, with the same layout; the work directory mirrors this
(``WORK/group[/map-<name>]/``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .errors import DataError, MissingInputError, UsageError
from .utils.io import atomic_path, read_tsv, write_json, write_tsv

LOGGER = logging.getLogger("brainage_xai.group")

DEFAULT_EPOCHS = 20
SPLIT_SIDECAR = {
    "participant_id": {"Description": "Participant label"},
    "split": {
        "Description": "Data split: 60/20/20, stratified by quantile bins of the first target",
        "Levels": {"train": "training", "val": "validation", "test": "test"},
    },
}


def _sha(data) -> str:
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
    group_dir: Path
    work_dir: Path
    device: torch.device
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
    _maps: np.ndarray | None = None

    @property
    def maps(self) -> np.ndarray:
        """All preprocessed maps ``(n, 1, *grid)``, loaded on first use."""
        if self._maps is None:
            from .model.data import load_maps

            self._maps, _ = load_maps(self.paths)
        return self._maps

    @property
    def split_sha(self) -> str:
        return _sha(self.split.to_dict())

    @property
    def targets_sha(self) -> str:
        return _sha(self.targets.to_dict(orient="list") | {"index": list(self.targets.index)})

    def rows(self, split: str) -> np.ndarray:
        """Row indices (in ``subjects`` order) of one split."""
        return np.flatnonzero(self.split.loc[self.subjects].to_numpy() == split)

    # -- skip-if-done -------------------------------------------------------------------
    def key(self, **parts) -> str:
        """A digest of a stage's settings and inputs."""
        return _sha(parts)

    def _stamp(self, stage: str) -> Path:
        return self.work_dir / "stamps" / f"{stage}.json"

    def is_done(self, stage: str, key: str, outputs) -> bool:
        """True when ``stage`` last ran with ``key`` and all ``outputs`` exist."""
        try:
            stamp = json.loads(self._stamp(stage).read_text())
        except (OSError, ValueError):
            return False
        done = stamp.get("key") == key and all(Path(p).exists() for p in outputs)
        if done:
            LOGGER.info("%s: up to date, skipped", stage)
        return done

    def mark_done(self, stage: str, key: str, outputs) -> None:
        """Record that ``stage`` produced ``outputs`` with ``key``."""
        write_json(self._stamp(stage), {"key": key, "outputs": [str(p) for p in outputs]})


Stage = Callable[[GroupContext], None]


# -- stages -----------------------------------------------------------------------------


def stage_inputs(ctx: GroupContext) -> None:
    """Find the preprocessed maps and read the targets."""
    from .bids import load_targets
    from .derivatives import collect_preprocessed, format_resolution
    from .model.data import files_sha256

    config = ctx.config
    found = collect_preprocessed(config.output_dir, config.map, resolution=config.resolution)
    if not found:
        other = collect_preprocessed(config.output_dir, config.map)
        hint = (
            f"; found maps of another resolution ({other[0][1].name}): pass the participant level's --resolution"
            if other
            else "; run the participant level first"
        )
        raise MissingInputError(
            f"no preprocessed {config.map} maps at res-{format_resolution(config.resolution)} "
            f"in {config.output_dir}{hint}"
        )
    if config.participant_label:
        wanted = set(config.participant_label)
        found = [(s, p) for s, p in found if s in wanted]
        missing = sorted(wanted - {s for s, _ in found})
        if missing:
            raise MissingInputError(
                f"no preprocessed {config.map} map for {', '.join('sub-' + s for s in missing)}"
            )
    ctx.subjects = [s for s, _ in found]
    ctx.paths = [p for _, p in found]
    ctx.targets = load_targets(config.bids_dir, list(config.target), ctx.subjects)
    ctx.inputs_sha = files_sha256(ctx.paths)
    import nibabel as nib

    first = nib.load(str(ctx.paths[0]))
    ctx.input_shape, ctx.input_affine = tuple(int(s) for s in first.shape[:3]), first.affine
    write_json(
        ctx.group_dir / "analysis.json",
        {"map": config.map, "targets": list(config.target), "resolution": config.resolution,
         "subjects": len(ctx.subjects)},
    )  # fmt: skip
    LOGGER.info("group level: %d subjects, %s map on grid %s", len(ctx.subjects), config.map, ctx.input_shape)


def stage_split(ctx: GroupContext) -> None:
    """Write ``split.tsv`` (60/20/20, stratified by the first target) or reuse it."""
    from .model.training import SPLITS, stratified_split

    path = ctx.group_dir / "split.tsv"
    if path.is_file():
        old = read_tsv(path)
        labels = old["participant_id"].str.replace(r"^sub-", "", regex=True)
        if sorted(labels) == sorted(ctx.subjects) and old["split"].isin(SPLITS).all():
            ctx.split = pd.Series(old["split"].to_numpy(), index=labels.to_numpy())
            LOGGER.info("split: reusing %s", path)
            return
        LOGGER.warning("split: %s lists other subjects than this run; writing a new split", path)
    table = stratified_split(ctx.subjects, ctx.targets.iloc[:, 0].to_numpy(), seed=ctx.config.random_seed)
    ctx.split = pd.Series(table["split"].to_numpy(), index=table["participant_id"].to_numpy())
    table["participant_id"] = "sub-" + table["participant_id"]
    write_tsv(path, table, sidecar=SPLIT_SIDECAR)
    LOGGER.info("split: %s", table["split"].value_counts().to_dict())


def _settings(config):
    from .model.training import TrainSettings

    return TrainSettings(epochs=config.epochs or DEFAULT_EPOCHS, seed=config.random_seed)


def _architecture(config, n_outputs: int) -> dict:
    from .model.network import PAPER_DEPTHS, PAPER_WIDTHS

    return {
        "name": "PreActResNet3d",
        "widths": list(config.widths or PAPER_WIDTHS),
        "depths": list(config.depths or PAPER_DEPTHS),
        "n_outputs": n_outputs,
        "in_channels": 1,
    }


def _use_given_model(ctx: GroupContext) -> None:
    from .activations import check_model_grid
    from .model.io import load_model, model_sha256, weights_path

    source = weights_path(ctx.config.model)
    model, meta = load_model(source, device="cpu")
    check_model_grid(meta, ctx.input_shape, ctx.input_affine, "the preprocessed maps")
    if list(meta.get("targets", [])) != list(ctx.config.target):
        raise DataError(
            f"--model {source} predicts {meta.get('targets')}, but --target asks for {list(ctx.config.target)}"
        )
    sha = model_sha256(source)
    dest = ctx.group_dir / "model.safetensors"
    if source.resolve() != dest.resolve() and (not dest.is_file() or model_sha256(dest) != sha):
        with atomic_path(dest) as tmp:
            shutil.copyfile(source, tmp)
        write_json(dest.with_suffix(".json"), {**meta, "source": str(source)})
    ctx.model, ctx.model_meta, ctx.model_path, ctx.model_sha = model, meta, dest, sha
    LOGGER.info("model: using %s (training skipped)", source)


def stage_model(ctx: GroupContext) -> None:
    """Train the network, or reuse the trained one, or use ``--model``."""
    from .model.data import input_normalisation, standardise_inputs
    from .model.io import load_model, model_sha256, read_metadata, save_model
    from .model.network import build_network
    from .model.training import fit, resolve_precision, tune

    config = ctx.config
    if config.model is not None:
        _use_given_model(ctx)
        return
    settings = _settings(config)
    architecture = _architecture(config, ctx.targets.shape[1])
    key = ctx.key(
        inputs=ctx.inputs_sha, split=ctx.split_sha, targets=ctx.targets_sha,
        settings=settings.to_dict(), architecture=architecture, tune=config.tune,
    )  # fmt: skip
    path = ctx.group_dir / "model.safetensors"
    if path.is_file():
        try:
            if read_metadata(path).get("stage_key") == key:
                ctx.model, ctx.model_meta = load_model(path)
                ctx.model_path, ctx.model_sha = path, model_sha256(path)
                LOGGER.info("model: up to date (%s), training skipped", path)
                return
        except (DataError, MissingInputError) as exc:
            LOGGER.warning("model: cannot reuse %s (%s); training again", path, exc)

    train, val = ctx.rows("train"), ctx.rows("val")
    maps = ctx.maps
    norm = input_normalisation(maps[train])
    y = ctx.targets.to_numpy(np.float64)
    y_mean, y_std = y[train].mean(axis=0), y[train].std(axis=0)
    y_std[y_std == 0] = 1.0
    norm.update(target_mean=y_mean.tolist(), target_std=y_std.tolist())
    x = standardise_inputs(maps, norm)
    y_t = torch.from_numpy(((y - y_mean) / y_std).astype(np.float32))
    tr, va = torch.from_numpy(train), torch.from_numpy(val)

    def build():
        torch.manual_seed(config.random_seed)
        return build_network(architecture)

    run_dir = ctx.work_dir / f"train-{key[:16]}"
    tuning = None
    if config.tune:
        LOGGER.info("tuning: %d TPE trials of %d epochs", config.tune, settings.epochs)
        tuning = tune(
            build, x[tr], y_t[tr], x[va], y_t[va], settings, config.tune,
            storage=run_dir / "tune.db", device=ctx.device, quiet=config.quiet,
        )  # fmt: skip
        settings = dataclasses.replace(settings, **tuning["best_params"])
        LOGGER.info("tuning: best %s", tuning["best_params"])
    model = build()
    LOGGER.info(
        "training: %d/%d subjects, up to %d epochs on %s", len(train), len(val), settings.epochs, ctx.device
    )
    result = fit(
        model, x[tr], y_t[tr], x[va], y_t[va], settings, y_scale=y_std, device=ctx.device,
        checkpoint=run_dir / "checkpoint.safetensors", quiet=config.quiet,
    )  # fmt: skip
    precision = resolve_precision(settings.precision, ctx.device)
    meta = {
        "map": config.map,
        "targets": list(config.target),
        "input_grid": {
            "shape": list(ctx.input_shape),
            "affine": np.asarray(ctx.input_affine).tolist(),
            "voxel_size": np.sqrt((np.asarray(ctx.input_affine)[:3, :3] ** 2).sum(axis=0)).tolist(),
        },
        "normalisation": norm,
        "layers": list(model.layers),
        "default_layer": model.default_layer,
        "seed": config.random_seed,
        "split": {"file": "split.tsv", "counts": ctx.split.value_counts().to_dict(), "sha256": ctx.split_sha},
        "training": {
            "settings": settings.to_dict(),
            "device": str(ctx.device),
            "precision": str(precision).replace("torch.", "") if precision else "float32",
            "best_epoch": result.best_epoch,
            "best_val_mae": result.history[result.best_epoch - 1]["val_mae"] if result.history else None,
            "stopped_early": result.stopped_early,
            "history": result.history,
            "tuning": tuning,
        },
        "inputs_sha256": ctx.inputs_sha,
        "stage_key": key,
    }
    save_model(path, model.cpu(), meta)
    ctx.model, ctx.model_meta = load_model(path)
    ctx.model_path, ctx.model_sha = path, model_sha256(path)
    LOGGER.info("model: best epoch %d, written to %s", result.best_epoch, path)


def _standardised_inputs(ctx: GroupContext) -> torch.Tensor:
    from .model.data import standardise_inputs

    return standardise_inputs(ctx.maps, ctx.model_meta["normalisation"])


def stage_predictions(ctx: GroupContext) -> None:
    """Predict every subject; write ``predictions.tsv``, ``metrics.json`` and plots."""
    from .model.training import predict_batches
    from .prediction import figure_path, write_predictions

    group = ctx.group_dir
    key = ctx.key(model=ctx.model_sha, inputs=ctx.inputs_sha, split=ctx.split_sha, targets=ctx.targets_sha)
    outputs = [group / "predictions.tsv", group / "predictions.json", group / "metrics.json"]
    outputs += [figure_path(group, t) for t in ctx.targets.columns]
    if ctx.is_done("predictions", key, outputs):
        ctx.predictions = read_tsv(outputs[0])
        ctx.metrics = json.loads(outputs[2].read_text())
        return
    norm = ctx.model_meta["normalisation"]
    raw = predict_batches(ctx.model, _standardised_inputs(ctx), device=ctx.device)
    predicted = raw * np.asarray(norm["target_std"]) + np.asarray(norm["target_mean"])
    result = write_predictions(group, ctx.split, ctx.targets, predicted)
    ctx.predictions, ctx.metrics = result["table"], result["metrics"]
    # model.json also carries the metrics of this dataset (the weights' header keeps
    # the training-time metadata only).
    write_json(ctx.model_path.with_suffix(".json"), {**ctx.model_meta, "metrics": ctx.metrics["metrics"]})
    ctx.mark_done("predictions", key, outputs)


def stage_activations(ctx: GroupContext) -> None:
    """Store the activation tensor ``A`` (reusing participant-level NIfTIs when present)."""
    from .activations import (
        iter_activations,
        load_activation_tensor,
        read_participant_activations,
        tensor_paths,
        write_activation_tensor,
    )

    try:
        layer = ctx.model.check_layer(ctx.config.layer)
    except ValueError as exc:
        raise UsageError(f"--layer: {exc}") from exc
    folder = ctx.work_dir / "activations"
    key = ctx.key(model=ctx.model_sha, layer=layer, inputs=ctx.inputs_sha, split=ctx.split_sha)
    outputs = list(tensor_paths(folder, layer))
    if not ctx.is_done("activations", key, outputs):
        x = _standardised_inputs(ctx)
        batch = 8
        reused = 0

        def batches():
            nonlocal reused
            for start in range(0, len(ctx.subjects), batch):
                stop = min(start + batch, len(ctx.subjects))
                stored = [read_participant_activations(ctx.paths[i], layer, ctx.model_sha) for i in range(start, stop)]
                if all(s is not None for s in stored):
                    reused += len(stored)
                    yield np.stack(stored)
                else:
                    yield from iter_activations(ctx.model, x[start:stop], layer, batch_size=batch, device=ctx.device)

        write_activation_tensor(
            folder, batches(), subjects=ctx.subjects, split=list(ctx.split.loc[ctx.subjects]),
            model=ctx.model, layer=layer, input_shape=ctx.input_shape,
            input_affine=ctx.input_affine, model_sha=ctx.model_sha,
        )  # fmt: skip
        LOGGER.info("activations: %s (%d subjects from participant-level files)", outputs[0], reused)
        ctx.mark_done("activations", key, outputs)
    ctx.activations = load_activation_tensor(outputs[1])


#: The stages of the group level, in order; later parts append theirs.
STAGES: list[tuple[str, Stage]] = [
    ("inputs", stage_inputs),
    ("split", stage_split),
    ("model", stage_model),
    ("predictions", stage_predictions),
    ("activations", stage_activations),
]


def make_context(config) -> GroupContext:
    """A fresh :class:`GroupContext` for ``config`` (threads and device set up)."""
    from .model.training import resolve_device

    if config.n_cpus:
        torch.set_num_threads(int(config.n_cpus))
    group_dir, work_dir = analysis_dirs(config)
    return GroupContext(config=config, group_dir=group_dir, work_dir=work_dir, device=resolve_device(config.device))


def run(config, stages: list[tuple[str, Stage]] | None = None) -> int:
    """Run the group level; returns the exit code (0).

    Parameters
    ----------
    config : brainage_xai.config.Config
    stages : list of (name, function), optional
        Defaults to :data:`STAGES`.
    """
    ctx = make_context(config)
    for name, stage in stages if stages is not None else STAGES:
        LOGGER.debug("stage %s", name)
        stage(ctx)
    return 0
