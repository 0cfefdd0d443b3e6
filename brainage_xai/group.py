"""The group level: a sequence of stages, each skipped on a re-run when done.

The stages, in order (:data:`STAGES`): load the preprocessed maps and the targets
(``inputs``), split the subjects 60/20/20, stratified (``split``), train the 3D ResNet or
load ``--model`` (``model``), predict and write the brain-age gap and metrics
(``predictions``), store the activation tensor (``activations``), choose the ranks and λ
and fit the final decomposition (``selection``), write the RoIs, loadings against the
target, GradCAM and the occlusion test (``explanations``), and render ``report.html`` and
the group section of every ``sub-X.html`` (``report``).

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
import gc
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
from nibabel.affines import voxel_sizes

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


#: Fewest subjects a group run accepts (a 60/20/20 split and 5-fold fits of the loadings).
MIN_SUBJECTS = 10

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
    selection: dict = field(default_factory=dict)
    explanations: dict = field(default_factory=dict)
    _maps: np.ndarray | None = None
    _template: object = None

    @property
    def template(self):
        """The template on the model grid (:func:`brainage_xai.templates.get_template`)."""
        if self._template is None:
            from .templates import get_template

            self._template = get_template(self.config.resolution)
        return self._template

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
        """A digest of a stage's settings and inputs, and of the package version.

        The version is part of every key: a work directory left by another release is
        not trusted (its code may have computed something else), as fMRIPrep does not
        reuse work directories across versions. ``--model`` reuses a network explicitly.
        """
        from ._version import __version__

        return _sha({**parts, "version": __version__})

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
    if len(found) < MIN_SUBJECTS:
        # A 60/20/20 split and the loadings' cross-validated fits need this many.
        raise DataError(
            f"the group level needs at least {MIN_SUBJECTS} subjects with preprocessed "
            f"{config.map} maps; found {len(found)}"
        )
    ctx.subjects = [s for s, _ in found]
    ctx.paths = [p for _, p in found]
    ctx.targets = load_targets(config.bids_dir, list(config.target), ctx.subjects)
    ctx.inputs_sha = files_sha256(ctx.paths)
    import nibabel as nib

    first = nib.load(str(ctx.paths[0]))
    ctx.input_shape, ctx.input_affine = tuple(int(s) for s in first.shape[:3]), first.affine
    analysis = {"map": config.map, "targets": list(config.target), "resolution": config.resolution,
                "subjects": len(ctx.subjects)}  # fmt: skip
    marker = ctx.group_dir / "analysis.json"
    try:
        same = json.loads(marker.read_text()) == analysis
    except (OSError, ValueError):
        same = False
    if not same:  # a re-run leaves the folder untouched
        write_json(marker, analysis)
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

    architecture = {
        "name": "PreActResNet3d",
        "widths": list(config.widths or PAPER_WIDTHS),
        "depths": list(config.depths or PAPER_DEPTHS),
        "n_outputs": n_outputs,
        "in_channels": 1,
    }
    if config.ensemble > 1:  # absent for one network, so its stage key is unchanged
        architecture["ensemble"] = int(config.ensemble)
    return architecture


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


def _check_ranks_fit(ctx: GroupContext, model) -> None:
    """Refuse ranks the decomposed tensor cannot hold before any training or extraction.

    The tensor has the layer's channels (twice as many for the deviation tensors) along
    mode 2, and R2 cannot exceed them; the sweep would say so only after the network
    had been trained (minutes on a CPU).
    """
    config = ctx.config
    try:
        layer = model.check_layer(config.layer, float(voxel_sizes(ctx.input_affine).max()))
    except ValueError as exc:
        raise UsageError(f"--layer: {exc}") from exc
    channels = model.layer_channels(layer) * (1 if config.tensor == "activations" else 2)
    if config.ranks is not None:
        wanted, option = int(config.ranks[1]), "--ranks"
    elif config.rank_grid:
        wanted, option = max(config.rank_grid), "--rank-grid"
    else:
        return
    if wanted > channels:
        raise UsageError(
            f"{option}: R2 up to {wanted} needs at least that many channels; the {config.tensor} "
            f"tensor of {layer} has {channels}"
        )


def stage_model(ctx: GroupContext) -> None:
    """Train the network, or reuse the trained one, or use ``--model``."""
    from ._version import __version__
    from .model.data import input_normalisation, standardise_inputs
    from .model.io import load_model, model_sha256, read_metadata, save_model
    from .model.network import EnsembleNet, build_network
    from .model.training import fit, resolve_precision, tune

    config = ctx.config
    if config.model is not None:
        _use_given_model(ctx)
        _check_ranks_fit(ctx, ctx.model)
        return
    settings = _settings(config)
    architecture = _architecture(config, ctx.targets.shape[1])
    _check_ranks_fit(ctx, build_network(architecture))
    key = ctx.key(
        inputs=ctx.inputs_sha, split=ctx.split_sha, targets=ctx.targets_sha,
        settings=settings.to_dict(), architecture=architecture, tune=config.tune,
    )  # fmt: skip
    path = ctx.group_dir / "model.safetensors"
    if path.is_file():
        try:
            saved = read_metadata(path)
            if saved.get("stage_key") == key:
                ctx.model, ctx.model_meta = load_model(path)
                ctx.model_path, ctx.model_sha = path, model_sha256(path)
                LOGGER.info("model: up to date (%s), training skipped", path)
                return
            trained_by = saved.get("versions", {}).get("brainage_xai")
            if trained_by and trained_by != __version__:
                LOGGER.info("model: %s was trained by brainage-xai %s (this is %s); training again "
                            "(pass --model %s to reuse it)", path, trained_by, __version__, path)
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

    single = {k: v for k, v in architecture.items() if k != "ensemble"}
    n_members = int(architecture.get("ensemble", 1))

    def build(seed=config.random_seed):
        torch.manual_seed(seed)
        return build_network(single)

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
    LOGGER.info(
        "training: %d/%d subjects, up to %d epochs on %s%s", len(train), len(val), settings.epochs, ctx.device,
        f", {n_members} networks (seeds {config.random_seed}-{config.random_seed + n_members - 1})"
        if n_members > 1 else "",
    )  # fmt: skip
    members, results = [], []
    for i in range(n_members):
        # Member i: its own seed (initialisation and batch order), the same split and
        # settings; each has its own checkpoint, so an interrupted ensemble resumes.
        seed = config.random_seed + i
        member = build(seed)
        result = fit(
            member, x[tr], y_t[tr], x[va], y_t[va], dataclasses.replace(settings, seed=seed),
            y_scale=y_std, device=ctx.device, quiet=config.quiet,
            checkpoint=run_dir / ("checkpoint.safetensors" if i == 0 else f"checkpoint-{i + 1}.safetensors"),
        )  # fmt: skip
        members.append(member.cpu())
        results.append(result)
        if n_members > 1:
            LOGGER.info("training: network %d/%d (seed %d), best epoch %d", i + 1, n_members, seed,
                        result.best_epoch)
    model = members[0] if n_members == 1 else EnsembleNet(members)
    precision = resolve_precision(settings.precision, ctx.device)

    def summary(result, seed=None):
        return {
            **({} if seed is None else {"seed": seed}),
            "best_epoch": result.best_epoch,
            "best_val_mae": result.history[result.best_epoch - 1]["val_mae"] if result.history else None,
            "stopped_early": result.stopped_early,
            "history": result.history,
        }

    training = {
        "settings": settings.to_dict(),
        "device": str(ctx.device),
        "precision": str(precision).replace("torch.", "") if precision else "float32",
        **summary(results[0]),
        "tuning": tuning,
    }
    if n_members > 1:
        # The top-level curve is the first network's; every member's is listed.
        training["members"] = [summary(r, config.random_seed + i) for i, r in enumerate(results)]
    meta = {
        "map": config.map,
        "targets": list(config.target),
        "input_grid": {
            "shape": list(ctx.input_shape),
            "affine": np.asarray(ctx.input_affine).tolist(),
            "voxel_size": voxel_sizes(ctx.input_affine).tolist(),
        },
        "normalisation": norm,
        "layers": list(model.layers),
        "default_layer": model.default_layer,
        "seed": config.random_seed,
        "split": {"file": "split.tsv", "counts": ctx.split.value_counts().to_dict(), "sha256": ctx.split_sha},
        "training": training,
        "inputs_sha256": ctx.inputs_sha,
        "stage_key": key,
    }
    save_model(path, model, meta)
    ctx.model, ctx.model_meta = load_model(path)
    ctx.model_path, ctx.model_sha = path, model_sha256(path)
    LOGGER.info("model: best epoch %s, written to %s", "/".join(str(r.best_epoch) for r in results), path)


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
        layer = ctx.model.check_layer(ctx.config.layer, float(voxel_sizes(ctx.input_affine).max()))
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


# -- selection, explanations, report ------------------------------------------------------

#: Random blobs per RoI in the occlusion test (the test's minimum for a 95th percentile).
N_RANDOM_BLOBS = 20
#: The predictors compared in ``metrics.json`` (issue 5: (a) to (d)).
PREDICTORS = {
    "network": "network",
    "linear_model_on_decomposition": "linear model on the decomposition",
    "network_head_on_reconstruction": "network head on the reconstruction",
    "mean_predictor": "training-mean predictor",
}
SPLITS_HELD_OUT = ("val", "test")


def _target_scale(ctx: GroupContext) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, std)`` of the targets as the network was trained on them."""
    norm = ctx.model_meta["normalisation"]
    return np.asarray(norm["target_mean"], float), np.asarray(norm["target_std"], float)


def _split_rows(ctx: GroupContext) -> dict[str, np.ndarray]:
    return {s: ctx.activations.rows(s) for s in ("train", "val", "test")}


def _selection_key(ctx: GroupContext) -> str:
    c = ctx.config
    return ctx.key(
        model=ctx.model_sha, layer=ctx.activations.layer, inputs=ctx.inputs_sha,
        split=ctx.split_sha, targets=ctx.targets_sha, tensor=c.tensor, ranks=c.ranks, l1=c.l1,
        rank_grid=c.rank_grid, lambda_grid=c.lambda_grid, seed=c.random_seed,
    )  # fmt: skip


def _load_selection(group: Path) -> dict:
    """The chosen ranks and λ and the final factors, from the selection's outputs."""
    with np.load(group / "decomposition.npz") as npz:
        arrays = {k: npz[k] for k in ("U1", "U1_val", "U1_test", "U2", "D", "U3", "roi_coefficients")}
    choice = json.loads((group / "selection.json").read_text())
    return {
        "U1": {"train": arrays["U1"], "val": arrays["U1_val"], "test": arrays["U1_test"]},
        "U2": arrays["U2"],
        "D": arrays["D"],
        "U3": arrays["U3"],
        "roi_coefficients": arrays["roi_coefficients"],
        "ranks": (int(choice["ranks"]["R1"]), int(choice["ranks"]["R2"])),
        "rank_rule": choice["ranks"].get("rule"),
        "lambda": float(choice["lambda"]["lambda"]),
        "lambda_rule": choice["lambda"].get("rule"),
    }


def _decomposition_metrics(final, y_true: dict, mean, std, targets, key: str) -> dict:
    """Metrics (a)-(d) per target and held-out split, in the target's own units."""
    out: dict = {}
    for j, target in enumerate(targets):
        out[target] = {}
        for split in SPLITS_HELD_OUT:
            true = y_true[split][:, j]
            out[target][split] = {}
            for name in PREDICTORS:
                if name not in final.predictions[split]:
                    continue
                pred = np.asarray(final.predictions[split][name])[:, j] * std[j] + mean[j]
                err = pred - true
                out[target][split][name] = {"mae": float(np.mean(np.abs(err))), "mse": float(np.mean(err**2))}
    return {
        "Description": "Test and validation MAE/MSE, in the target's units, of (a) the network, (b) the "
        "linear model on the decomposition (voxel-averaged reconstruction), (c) the network's head "
        "applied to the voxel-averaged reconstruction (only when the decomposed layer is the last "
        "one, which the head reads), (d) the training-mean predictor. 'standardised' holds the same "
        "from the selection stage, on the standardised target the network was trained on.",
        "rank": list(final.rank),
        "l1": final.l1,
        "metrics": out,
        "reconstruction_error": final.errors,
        "stage_key": key,
    }


def _merge_metrics(ctx: GroupContext, decomposition: dict, fresh: bool = False) -> None:
    """Put the decomposition's metrics into ``metrics.json`` beside the network's.

    The network's metrics (written by the predictions stage) stay at the top level and the
    decomposition's go under ``decomposition``. After the selection ran (``fresh``) the
    file is always rewritten; when it was skipped, only if its decomposition part is from
    another run, so a re-run leaves it untouched.
    """
    path = ctx.group_dir / "metrics.json"
    try:
        current = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    base = {k: v for k, v in ctx.metrics.items() if k != "decomposition"}
    merged = {**base, "decomposition": decomposition}
    stale = current.get("decomposition", {}).get("stage_key") != decomposition["stage_key"]
    if fresh or stale or "metrics" not in current or "bias_correction" not in current:
        write_json(path, merged)
    ctx.metrics = merged


#: Peak memory of the selection over the size of the tensor it decomposes, all splits
#: (float32): 3.58 GB for 1.81 GB on the demo (docs/selection.md, "Memory").
SELECTION_MEMORY_FACTOR = 2.0


def _check_selection_memory(shape, tensor: str, layer: str) -> None:
    """Log what the selection will hold in memory; warn when it exceeds what is available.

    A warning, not an error: the estimate is a measured ratio, not a bound, and a run
    that is killed by the out-of-memory killer resumes from its stamps.
    """
    from .selection import decomposed_nbytes
    from .utils.env import available_memory

    size = decomposed_nbytes(shape, tensor)
    need = SELECTION_MEMORY_FACTOR * size
    free = available_memory()
    LOGGER.info("selection: the %s tensor takes %.1f GB; the selection needs about %.1f GB (%s available)",
                tensor, size / 1e9, need / 1e9, "unknown" if free is None else f"{free / 1e9:.1f} GB")
    if free is not None and need > free:
        LOGGER.warning(
            "the selection needs about %.1f GB of memory but %.1f GB is available (layer %s, "
            "%d subjects): give the job more memory, or choose a coarser --layer",
            need / 1e9, free / 1e9, layer, shape[0],
        )


def _gradient_rms(ctx: GroupContext, train_rows) -> np.ndarray:
    """The training subjects' output gradient at the decomposed layer, ``(c, v)`` (``--tensor relevance``)."""
    from .activations import gradient_rms

    x = _standardised_inputs(ctx)[np.asarray(train_rows)]
    # The first target's output: the one the report explains.
    LOGGER.info("selection: output gradient (%s) at %s over %d training subjects",
                ctx.targets.columns[0], ctx.activations.layer, len(x))
    g = gradient_rms(ctx.model, x, ctx.activations.layer, device=ctx.device, target=0)
    return g.reshape(g.shape[0], -1)


def _tensor_parameters_path(ctx: GroupContext) -> Path:
    return ctx.work_dir / "selection" / "tensor_parameters.npz"


def _save_tensor_parameters(ctx: GroupContext, centre, scale, weight=None) -> None:
    """The training centre, channel scale (and relevance weight) of the decomposed tensor.

    Kept in the work directory so that the back-projection (explanations stage) builds the
    same tensor without reading the training activations or taking the gradient again.
    """
    path = _tensor_parameters_path(ctx)
    arrays = {"centre": centre, "scale": scale} | ({} if weight is None else {"weight": weight})
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def stage_selection(ctx: GroupContext) -> None:
    """Scree, rank sweep, λ sweep and the final decomposition (:func:`run_selection`)."""
    from .prediction import columns
    from .selection import (
        deviation_head,
        deviation_splits,
        head_from_torch,
        relevance_weight,
        run_selection,
    )

    config, act, group = ctx.config, ctx.activations, ctx.group_dir
    key = _selection_key(ctx)
    names = ("scree.tsv", "selection.json", "decomposition.npz", "decomposition.json", "loadings.tsv")
    saved = ctx.work_dir / "selection" / "metrics.json"
    outputs = [group / n for n in names] + [saved]
    if config.tensor != "activations":
        outputs.append(_tensor_parameters_path(ctx))
    if ctx.is_done("selection", key, outputs):
        ctx.selection = _load_selection(group)
        _merge_metrics(ctx, json.loads(saved.read_text()))
        return
    if list(act.subjects) != list(ctx.subjects):
        raise DataError("the activation tensor lists other subjects than the preprocessed maps; remove the work directory")
    mean, std = _target_scale(ctx)
    true = ctx.targets.loc[act.subjects].to_numpy(np.float64)
    ids = ["sub-" + s for s in act.subjects]
    by_id = ctx.predictions.set_index("participant_id").loc[ids]
    network = by_id[[columns(t)["predicted"] for t in ctx.targets.columns]].to_numpy(np.float64)
    rows = _split_rows(ctx)
    # Standardised as the network's training target, so that the network's head and the
    # linear model speak the same units; metrics.json converts back.
    y = {s: (true[r] - mean) / std for s, r in rows.items()}
    # The head reads the pooled output of the last layer; an earlier layer's channels are not its input.
    head = head_from_torch(ctx.model.head.cpu()) if act.layer == ctx.model.default_layer else None
    _check_selection_memory(act.array.shape, config.tensor, act.layer)
    if config.tensor == "deviations":
        A, centre, scale = deviation_splits(act.array, rows)
        _save_tensor_parameters(ctx, centre, scale)
        if head is not None:
            head = deviation_head(head, centre.mean(axis=1), scale)
    elif config.tensor == "relevance":
        g = _gradient_rms(ctx, rows["train"])
        A, centre, scale = deviation_splits(act.array, rows, gradient_rms=g)
        _save_tensor_parameters(ctx, centre, scale, relevance_weight(g, scale))
        if head is not None:
            # The weight varies over voxels, so the voxel average of the reconstruction
            # no longer gives the head's input: that comparison is left out.
            LOGGER.info("selection: --tensor relevance: the network head on the reconstruction is not computed")
            head = None
    else:
        A = {s: np.asarray(act.array[r]) for s, r in rows.items()}
    LOGGER.info("selection: %s tensor %s per split %s", config.tensor, A["train"].shape[1:],
                {s: len(r) for s, r in rows.items()})
    result = run_selection(
        A["train"], A["val"], A["test"], y["train"], y["val"], y["test"], group,
        ranks=config.ranks, l1=config.l1, rank_grid=config.rank_grid, lambda_grid=config.lambda_grid,
        head=head, network_pred={s: (network[r] - mean) / std for s, r in rows.items()},
        participant_ids={s: [ids[i] for i in r] for s, r in rows.items()},
        target_names=list(ctx.targets.columns), n_jobs=config.n_cpus or -1,
        dask_scheduler=config.dask_scheduler, work_dir=ctx.work_dir / "selection",
        random_state=config.random_seed, quiet=config.quiet,
        device=ctx.device if ctx.device.type == "cuda" else None,
    )  # fmt: skip
    # The tensors (1.8 GB at the demo's block1) can sit in reference cycles left by the
    # sweeps' parallel machinery until the cyclic collector happens to run; the next
    # stage needs that memory, so release it now.
    del A
    gc.collect()
    standardised = json.loads((group / "decomposition.json").read_text())["metrics"]
    decomposition = _decomposition_metrics(
        result["final"], {s: true[r] for s, r in rows.items()}, mean, std, list(ctx.targets.columns), key
    )
    decomposition["standardised"] = standardised
    decomposition["tensor"] = config.tensor
    write_json(saved, decomposition)
    _merge_metrics(ctx, decomposition, fresh=True)
    ctx.selection = _load_selection(group)
    test = decomposition["metrics"][ctx.targets.columns[0]]["test"]
    LOGGER.info(
        "selection: ranks %s, lambda %g; test MAE %s",
        ctx.selection["ranks"], ctx.selection["lambda"], {k: round(v["mae"], 3) for k, v in test.items()},
    )  # fmt: skip
    ctx.mark_done("selection", key, outputs)


def _template_grid(ctx: GroupContext):
    """``(template_img, mask, background)`` on the model grid.

    The template of the participant level when it is on the maps' grid; otherwise (maps
    made elsewhere) an empty image on the maps' grid, no brain mask and no background.
    """
    import nibabel as nib

    tpl = ctx.template
    if tuple(tpl.shape) == tuple(ctx.input_shape) and np.allclose(tpl.affine, ctx.input_affine, atol=1e-3):
        return tpl.t1, np.asarray(tpl.mask.dataobj) > 0, tpl.t1
    LOGGER.warning("explanations: the maps' grid differs from the template's; RoIs are not masked")
    return nib.Nifti1Image(np.zeros(ctx.input_shape, np.float32), ctx.input_affine), None, None


def _roi_loadings(ctx: GroupContext) -> pd.DataFrame:
    """``participant_id``, ``split``, the first target and one ``RoI r`` column per RoI (U1)."""
    from .rois import roi_names

    target = ctx.targets.columns[0]
    rows = _split_rows(ctx)
    u1 = np.zeros((len(ctx.activations.subjects), ctx.selection["ranks"][0]))
    for split, r in rows.items():
        u1[r] = ctx.selection["U1"][split]
    table = ctx.predictions.set_index("participant_id").loc[["sub-" + s for s in ctx.activations.subjects]]
    out = pd.DataFrame({
        "participant_id": table.index.to_numpy(), "split": table["split"].to_numpy(),
        target: table[target].to_numpy(float),
    })  # fmt: skip
    for r, name in enumerate(roi_names(u1.shape[1])):
        out[name] = u1[:, r]
    return out


def _explanation_paths(ctx: GroupContext) -> tuple[str, dict[str, Path]]:
    from .derivatives import format_resolution

    prefix = f"space-{ctx.template.name}_res-{format_resolution(ctx.config.resolution)}"
    g = ctx.group_dir
    return prefix, {
        "components": g / f"{prefix}_desc-rois_components.nii.gz",
        "dseg": g / f"{prefix}_desc-rois_dseg.nii.gz",
        "dseg_tsv": g / f"{prefix}_desc-rois_dseg.tsv",
        "rois_tsv": g / "rois.tsv",
        "loading_fits": g / f"loadings_vs_{ctx.targets.columns[0]}.tsv",
        "gradcam": g / f"{prefix}_desc-gradcam_map.nii.gz",
        "occlusion": g / "occlusion.tsv",
        "occlusion_null": g / "occlusion_null.tsv",
    } | ({"backprojected": g / f"{prefix}_desc-backprojected_components.nii.gz"}
         if ctx.config.backprojection else {})


def _backprojection(ctx: GroupContext, template_img, mask, rois_img, prefix: str):
    """Back-project each RoI's loading to the input (:mod:`brainage_xai.backprojection`)."""
    from .atlas import load_atlas
    from .backprojection import back_project, write_backprojection
    from .model.training import resolve_precision

    rows = _split_rows(ctx)["train"]
    tensor = ctx.config.tensor
    parts = {}
    if tensor != "activations":  # what the selection built the tensor with
        with np.load(_tensor_parameters_path(ctx)) as npz:
            parts = {k: npz[k] for k in npz.files}
    U2, D, U3 = (ctx.selection[k] for k in ("U2", "D", "U3"))
    LOGGER.info("explanations: back-projecting %d RoIs over %d training subjects", U3.shape[1], len(rows))
    bp = back_project(ctx.model, _standardised_inputs(ctx)[rows], ctx.activations.layer, U2, D, U3,
                      tensor=tensor, centre=parts.get("centre"), scale=parts.get("scale"),
                      weight=parts.get("weight"), device=ctx.device, progress=not ctx.config.quiet,
                      # the training's precision, as the occlusion test: bf16 is 2.8 times
                      # faster on CPUs with AMX and gives the same maps (correlation >= 0.998)
                      dtype=resolve_precision("auto", ctx.device))
    atlas_img, names = load_atlas(template_img)
    labels = dict(zip(names["index"].astype(int), names["name"].astype(str)))
    return write_backprojection(ctx.group_dir, bp.maps, template_img, rois_img, prefix=prefix,
                                mask=mask, atlas_img=atlas_img, atlas_labels=labels)


#: Raised when the explanations' outputs change, so that an earlier run redoes them (and
#: the report) on its next run. 2: cv_r2 and target_related in rois.tsv (stop 16).
EXPLANATIONS_OUTPUTS = 2


def _explanations_key(ctx: GroupContext) -> str:
    return ctx.key(selection=_selection_key(ctx), template=ctx.template.source, blobs=N_RANDOM_BLOBS,
                   backprojection=int(ctx.config.backprojection), outputs=EXPLANATIONS_OUTPUTS)


def stage_explanations(ctx: GroupContext) -> None:
    """RoI maps, loadings against the target, GradCAM and the occlusion test."""
    import nibabel as nib

    from .backprojection import BACKPROJECTION_SIDECAR
    from .model.training import resolve_precision
    from .rois import RELATION_SIDECAR, ROIS_SIDECAR, write_explanations

    prefix, paths = _explanation_paths(ctx)
    template_img, mask, _ = _template_grid(ctx)
    key = _explanations_key(ctx)
    if ctx.is_done("explanations", key, list(paths.values())):
        ctx.explanations = {
            "rois_img": nib.load(str(paths["components"])),
            "backprojected_img": nib.load(str(paths["backprojected"])) if "backprojected" in paths else None,
            "dseg_img": nib.load(str(paths["dseg"])),
            "rois_table": read_tsv(paths["rois_tsv"]),
            "loadings": _roi_loadings(ctx),
            "loading_fits": read_tsv(paths["loading_fits"]),
            "gradcam_img": nib.load(str(paths["gradcam"])),
            "occlusion": (read_tsv(paths["occlusion"]), read_tsv(paths["occlusion_null"])),
            "mask_img": None if mask is None else nib.Nifti1Image(mask.astype(np.uint8), template_img.affine),
        }
        return
    mean, std = _target_scale(ctx)
    loadings = _roi_loadings(ctx)
    target = ctx.targets.columns[0]
    roi_cols = [c for c in loadings.columns if c.startswith("RoI ")]
    parts = write_explanations(
        ctx.group_dir, model=ctx.model, layer=ctx.activations.layer,
        u3=ctx.selection["U3"], u1=loadings[roi_cols].to_numpy(),
        inputs=_standardised_inputs(ctx).numpy(), table=loadings, template_img=template_img,
        mask=mask, target=target, prefix=prefix,
        # per-RoI coefficients in target units per unit loading (the selection's are on
        # the standardised target)
        coefficients=ctx.selection["roi_coefficients"][:, 0] * std[0],
        scale=float(std[0]), shift=float(mean[0]), n_random=N_RANDOM_BLOBS,
        seed=ctx.config.random_seed, device=ctx.device, batch_size=4, predict_batch_size=16,
        loadings_file=None, progress=not ctx.config.quiet,
        # the training's precision: bf16 is many times faster on CPUs with AMX and on GPUs
        dtype=resolve_precision("auto", ctx.device),
    )  # fmt: skip
    bp_img = None
    if not ctx.config.backprojection:
        # an earlier run's maps would no longer match these RoIs
        stale = ctx.group_dir / f"{prefix}_desc-backprojected_components.nii.gz"
        for path in (stale, stale.with_name(stale.name.replace(".nii.gz", ".json"))):
            path.unlink(missing_ok=True)
    else:
        bp_img, _, bp_table = _backprojection(ctx, template_img, mask, parts["rois_img"], prefix)
        # rois.tsv: each RoI with where its loading comes from in the input beside it
        parts["rois_table"] = parts["rois_table"].merge(bp_table, on="name", how="left")
        write_tsv(paths["rois_tsv"], parts["rois_table"],
                  sidecar={**ROIS_SIDECAR, **RELATION_SIDECAR, **BACKPROJECTION_SIDECAR})
    ctx.model.cpu()
    ctx.explanations = {k: v for k, v in parts.items() if k not in ("paths", "geometry")}
    ctx.explanations["backprojected_img"] = bp_img
    if mask is None:
        ctx.explanations["mask_img"] = None
    LOGGER.info("explanations: %d RoIs, GradCAM and occlusion test in %s", len(roi_cols), ctx.group_dir)
    ctx.mark_done("explanations", key, list(paths.values()))


def _summary(ctx: GroupContext) -> dict:
    config, act, sel = ctx.config, ctx.activations, ctx.selection
    counts = ctx.split.loc[ctx.subjects].value_counts()
    training = ctx.model_meta.get("training") or {}
    n_members = int(ctx.model_meta.get("architecture", {}).get("ensemble", 1))
    if config.model is not None:
        model = f"given (--model {config.model})"
    elif n_members > 1:
        model = (f"trained here: best epochs "
                 f"{', '.join(str(m.get('best_epoch')) for m in training.get('members', []))} "
                 f"of {len(training.get('history') or [])}")
    else:
        model = f"trained here: best epoch {training.get('best_epoch')} of {len(training.get('history') or [])}"
    if n_members > 1:
        model = f"ensemble of {n_members}, {model}"
    test = ctx.metrics["decomposition"]["metrics"][ctx.targets.columns[0]]["test"]
    return {
        "Dataset": str(config.bids_dir),
        "Map": config.map,
        "Target": ", ".join(ctx.targets.columns),
        "Subjects": f"{len(ctx.subjects)} (train {counts.get('train', 0)}, validation "
        f"{counts.get('val', 0)}, test {counts.get('test', 0)})",
        "Model grid": f"{ctx.template.name}, {config.resolution} mm, {' × '.join(map(str, ctx.input_shape))} voxels",
        "Network": f"{ctx.model_meta.get('architecture', {}).get('name', 'network')}, {model}",
        "Decomposed layer": f"{act.layer}: {act.array.shape[1]} channels × {' × '.join(map(str, act.grid_shape))} voxels",
        "Decomposed tensor": (
            "the activations (as in the paper)" if config.tensor == "activations" else
            "deviations from the training mean activation, positive and negative parts "
            f"({2 * act.array.shape[1]} channels)"
            + (", weighted by the network's output gradient" if config.tensor == "relevance" else "")),
        "Ranks": f"R1 = {sel['ranks'][0]}, R2 = {sel['ranks'][1]} ({sel['rank_rule']})",
        "l1 penalty (lambda)": f"{sel['lambda']:.4g} ({sel['lambda_rule']})",
        "Test MAE": "; ".join(f"{PREDICTORS[k]} {v['mae']:.2f}" for k, v in test.items()),
    }


def _metrics_table(ctx: GroupContext) -> pd.DataFrame:
    rows = []
    for target, splits in ctx.metrics["decomposition"]["metrics"].items():
        for split in ("test", "val"):
            for name, m in splits.get(split, {}).items():
                rows.append({"predictor": PREDICTORS[name], "target": target, "split": split,
                             "MAE": m["mae"], "MSE": m["mse"]})  # fmt: skip
    return pd.DataFrame(rows)


def stage_report(ctx: GroupContext) -> None:
    """``report.html`` and the group section of every ``sub-X.html``."""
    import os

    from .derivatives import report_path, sidecar_path
    from .participant import subject_page
    from .prediction import figure_path
    from .reports.group import (
        BACKPROJECTION_METHODS,
        DEFAULT_METHODS,
        DEVIATIONS_METHODS,
        ENSEMBLE_METHODS,
        RELEVANCE_METHODS,
        render_group_report,
        subject_rois,
    )
    from .utils.io import write_text

    config, group = ctx.config, ctx.group_dir
    target = ctx.targets.columns[0]
    out = group / "report.html"
    pages = {s: report_path(config.output_dir, s) for s in ctx.subjects}
    # the explanations' key: a report shows the explanations it was made from
    key = ctx.key(explanations=_explanations_key(ctx), prefix=_explanation_paths(ctx)[0])
    # A participant re-run writes sub-X.html without the group section: redo the pages then.
    if ctx.is_done("report", key, [out, *pages.values()]) and all(
        'id="subject-rois"' in p.read_text(encoding="utf-8") for p in pages.values()
    ):
        return
    _, _, background = _template_grid(ctx)
    figures = group / "figures"
    sel = ctx.selection
    n_members = int(ctx.model_meta.get("architecture", {}).get("ensemble", 1))
    context = {
        **ctx.explanations,
        "title": f"brainage-xai group report: {config.map} map, {', '.join(ctx.targets.columns)}",
        "summary": _summary(ctx),
        "methods": DEFAULT_METHODS.format(target=target)
        + (DEVIATIONS_METHODS if config.tensor in ("deviations", "relevance") else "")
        + (RELEVANCE_METHODS if config.tensor == "relevance" else "")
        + (ENSEMBLE_METHODS.format(k=n_members) if n_members > 1 else "")
        + (BACKPROJECTION_METHODS if config.backprojection else ""),
        "metrics": _metrics_table(ctx),
        "predictions": ctx.predictions,
        "target": target,
        "target_unit": "years" if target == "age" else f"{target} units",
        "figures": {
            "predictions": figure_path(group, target),
            "scree": figures / "scree.png",
            "rank_sweep": figures / "rank_sweep.png" if config.ranks is None else None,
            "lambda_sweep": figures / "lambda_sweep.png" if config.l1 is None else None,
        },
        "ranks": sel["ranks"],
        "rank_reason": f"Rule: {sel['rank_rule']}.",
        "lambda": sel["lambda"],
        "lambda_reason": f"Rule: {sel['lambda_rule']}.",
        "background_img": background,
        "subjects": [
            {"label": f"sub-{s}", "href": os.path.relpath(p, group)} for s, p in pages.items()
        ],
    }
    render_group_report(context, out)
    loadings = ctx.explanations["loadings"]
    for subject, page in pages.items():
        meta = json.loads(sidecar_path(ctx.paths[ctx.subjects.index(subject)]).read_text())
        section = subject_rois(f"sub-{subject}", ctx.predictions, loadings, target)
        write_text(page, subject_page(config, subject, ctx.template, meta, group=section))
    LOGGER.info("report: %s and %d subject pages", out, len(pages))
    ctx.mark_done("report", key, [out, *pages.values()])


#: The stages of the group level, in order.
STAGES: list[tuple[str, Stage]] = [
    ("inputs", stage_inputs),
    ("split", stage_split),
    ("model", stage_model),
    ("predictions", stage_predictions),
    ("activations", stage_activations),
    ("selection", stage_selection),
    ("explanations", stage_explanations),
    ("report", stage_report),
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
