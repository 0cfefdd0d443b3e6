"""Stages ``model`` (train the network, reuse it, or take ``--model``) and ``predictions``."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
from nibabel.affines import voxel_sizes

from ...errors import DataError, MissingInputError, UsageError
from ...model import ensemble
from ...model.activations import check_layer, check_model_grid
from ...model.io import load_model, model_sha256, read_metadata, save_model, weights_path
from ...model.network import build_network
from ...model.prediction import data_dictionary, evaluate_predictions
from ...model.training import predict_batches
from ...report.figures import plot_predictions
from ...selection.rank_sweep import check_ranks
from ...utils.io import atomic_path, read_tsv, write_json, write_tsv
from .runner import GroupContext, default_tensor

LOGGER = logging.getLogger("brainage_xai.group")


def _use_given_model(ctx: GroupContext) -> None:
    source = weights_path(ctx.config.model)
    model, meta = load_model(source, device="cpu")
    check_model_grid(meta, ctx.input_shape, ctx.input_affine, "the preprocessed maps")
    if list(meta.get("targets", [])) != list(ctx.config.target):
        raise DataError(
            f"--model {source} predicts {meta.get('targets')}, but --target asks for {list(ctx.config.target)}"
        )
    sha = model_sha256(source)
    dest = ctx.out.model
    if source.resolve() != dest.resolve() and (not dest.is_file() or model_sha256(dest) != sha):
        with atomic_path(dest) as tmp:
            shutil.copyfile(source, tmp)
        write_json(ctx.out.model_json, {**meta, "source": str(source)})
    ctx.model, ctx.model_meta, ctx.model_path, ctx.model_sha = model, meta, dest, sha
    LOGGER.info("model: using %s (training skipped)", source)


def _check_ranks_fit(ctx: GroupContext, model) -> None:
    """Refuse ranks the decomposed tensor cannot hold before any training or extraction.

    The tensor has the layer's channels (twice as many for the deviation tensors) along
    mode 2, and R2 cannot exceed them; the sweep would say so only after the network
    had been trained (minutes on a CPU).
    """
    config = ctx.config
    if config.layer is None and ctx.method == "consensus":
        return  # the layer stage chooses among the layers whose tensor holds these ranks
    layer = check_layer(model, config.layer, float(voxel_sizes(ctx.input_affine).max()))
    tensor = config.tensor or default_tensor(ctx)
    channels = model.layer_channels(layer) // ctx.n_networks * (1 if tensor == "activations" else 2)
    voxels = int(np.prod(model.feature_shape(ctx.input_shape, layer)))
    if config.ranks is not None:
        (r1, r2), option = (int(r) for r in config.ranks), "--ranks"
    elif config.rank_grid:
        r1 = r2 = max(config.rank_grid)
        option = "--rank-grid"
    else:
        return
    try:
        check_ranks((len(ctx.rows("train")), channels, voxels), r1, r2,
                    tensor=f"the {tensor} tensor of {layer}")
    except UsageError as exc:
        raise UsageError(f"{option}: {exc}") from None


def _reuse_trained(ctx: GroupContext, key: str) -> bool:
    """Load ``model.safetensors`` when the same key trained it; say why not otherwise."""
    from ..._version import __version__

    path = ctx.out.model
    if not path.is_file():
        return False
    try:
        saved = read_metadata(path)
        if saved.get("stage_key") == key:
            ctx.model, ctx.model_meta = load_model(path)
            ctx.model_path, ctx.model_sha = path, model_sha256(path)
            LOGGER.info("model: up to date (%s), training skipped", path)
            return True
        trained_by = saved.get("versions", {}).get("brainage_xai")
        if trained_by and trained_by != __version__:
            LOGGER.info("model: %s was trained by brainage-xai %s (this is %s); training again "
                        "(pass --model %s to reuse it)", path, trained_by, __version__, path)
    except (DataError, MissingInputError) as exc:
        LOGGER.warning("model: cannot reuse %s (%s); training again", path, exc)
        return False
    except Exception as exc:  # a damaged file: whatever safetensors or JSON raise
        LOGGER.warning("model: %s cannot be read (%s: %s); training again", path,
                       type(exc).__name__, " ".join(str(exc).split())[:120])
        return False
    return False


def stage_model(ctx: GroupContext) -> None:
    """Train the network, or reuse the trained one, or use ``--model``."""
    config = ctx.config
    if config.model is not None:
        _use_given_model(ctx)
        ctx.n_networks = int(ctx.model_meta.get("architecture", {}).get("ensemble", 1))
        if ctx.method == "paper" and ctx.n_networks > 1:
            raise UsageError(f"--method paper explains one network; --model {config.model} holds "
                             f"{ctx.n_networks}")
        _check_ranks_fit(ctx, ctx.model)
        return
    settings = ensemble.settings(config.epochs, config.random_seed)
    arch = ensemble.architecture(ctx.targets.shape[1], config.widths, config.depths, ctx.n_networks)
    _check_ranks_fit(ctx, build_network(arch))
    key = ctx.key(
        inputs=ctx.inputs_sha, split=ctx.split_sha, targets=ctx.targets_sha,
        settings=settings.to_dict(), architecture=arch, tune=config.tune,
    )  # fmt: skip
    if _reuse_trained(ctx, key):
        return
    trained = ensemble.train_networks(
        ctx.map_dataset(standardised=False), ctx.targets.to_numpy(np.float64), ctx.rows("train"), ctx.rows("val"), arch, settings,
        run_dir=ctx.out.training_dir(key), n_trials=config.tune, device=ctx.device, quiet=config.quiet,
    )  # fmt: skip
    model = trained.model
    meta = {
        "map": config.map,
        "targets": list(config.target),
        "input_grid": {
            "shape": list(ctx.input_shape),
            "affine": np.asarray(ctx.input_affine).tolist(),
            "voxel_size": voxel_sizes(ctx.input_affine).tolist(),
        },
        "normalisation": trained.normalisation,
        "layers": list(model.layers),
        "default_layer": model.default_layer,
        "seed": config.random_seed,
        "split": {"file": ctx.out.split.name, "counts": ctx.split.value_counts().to_dict(),
                  "sha256": ctx.split_sha},
        "training": trained.training,
        "inputs_sha256": ctx.inputs_sha,
        "stage_key": key,
    }
    path = ctx.out.model
    save_model(path, model, meta)
    ctx.model, ctx.model_meta = load_model(path)
    ctx.model_path, ctx.model_sha = path, model_sha256(path)
    members = trained.training.get("members") or [trained.training]
    LOGGER.info("model: best epoch %s, written to %s", "/".join(str(m["best_epoch"]) for m in members), path)


def stage_predictions(ctx: GroupContext) -> None:
    """Predict every subject; write ``predictions.tsv``, ``metrics.json`` and plots."""
    out = ctx.out
    key = ctx.key(model=ctx.model_sha, inputs=ctx.inputs_sha, split=ctx.split_sha, targets=ctx.targets_sha)
    outputs = [out.predictions, out.predictions.with_suffix(".json"), out.metrics,
               ctx.model_path.with_suffix(".json")]
    outputs += [out.predictions_figure(t) for t in ctx.targets.columns]
    if ctx.is_done("predictions", key, outputs):
        ctx.predictions = read_tsv(out.predictions)
        ctx.metrics = json.loads(out.metrics.read_text())
        model_json = ctx.model_path.with_suffix(".json")
        if "metrics" not in json.loads(model_json.read_text()):
            # the model stage wrote it again (a damaged model retrained to the same weights)
            write_json(model_json, {**ctx.model_meta, "metrics": ctx.metrics["metrics"]})
        return
    norm = ctx.model_meta["normalisation"]
    raw = predict_batches(ctx.model, ctx.map_dataset(), device=ctx.device)
    predicted = raw * np.asarray(norm["target_std"]) + np.asarray(norm["target_mean"])
    table, metrics = evaluate_predictions(ctx.split, ctx.targets, predicted)
    write_tsv(out.predictions, table, sidecar=data_dictionary(ctx.targets.columns))
    write_json(out.metrics, metrics)
    for target in ctx.targets.columns:
        plot_predictions(table, target, metrics, out.predictions_figure(target))
    ctx.predictions, ctx.metrics = table, metrics
    # model.json also carries the metrics of this dataset (the weights' header keeps
    # the training-time metadata only).
    write_json(ctx.model_path.with_suffix(".json"), {**ctx.model_meta, "metrics": metrics["metrics"]})
    ctx.mark_done("predictions", key, outputs)
