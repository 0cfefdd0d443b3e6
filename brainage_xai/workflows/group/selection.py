"""Stage ``selection``: scree, rank sweep, λ sweep and the final decomposition."""

from __future__ import annotations

import gc
import json
import logging

import numpy as np

from ...bids.derivatives import prediction_columns
from ...errors import DataError
from ...model.activations import gradient_rms
from ...model.network import head_from_torch
from ...report.figures import plot_lambda_sweep, plot_rank_sweep, plot_scree
from ...selection import (
    SelectionFiles,
    decomposed_nbytes,
    prepare_tensor,
    run_selection,
    target_metrics,
)
from ...utils import env
from ...utils.io import atomic_path, write_json
from .layer import member
from .runner import GroupContext

LOGGER = logging.getLogger("brainage_xai.group")

#: Peak memory of the selection over the size of the tensor it decomposes, all splits
#: (float32): 3.58 GB for 1.81 GB on the demo (docs/selection.md, "Memory").
SELECTION_MEMORY_FACTOR = 2.0


def selection_key(ctx: GroupContext) -> str:
    c = ctx.config
    return ctx.key(
        model=ctx.model_sha, layer=ctx.activations.layer, inputs=ctx.inputs_sha,
        split=ctx.split_sha, targets=ctx.targets_sha, tensor=ctx.tensor, ranks=c.ranks, l1=c.l1,
        rank_grid=c.rank_grid, lambda_grid=c.lambda_grid, seed=c.random_seed, method=ctx.method,
        constraints=ctx.constraints, networks=ctx.n_networks,
    )  # fmt: skip


def member_channels(ctx: GroupContext, k: int = 0) -> slice:
    """The channels of network ``k`` in the activation tensor (all networks side by side)."""
    c = ctx.activations.array.shape[1] // ctx.n_networks
    return slice(k * c, (k + 1) * c)


def _files(ctx: GroupContext) -> SelectionFiles:
    out = ctx.out
    return SelectionFiles(
        scree=out.scree, rank_sweep=out.rank_sweep, lambda_sweep=out.lambda_sweep,
        selection=out.selection, decomposition=out.decomposition,
        decomposition_json=out.decomposition_json, loadings=out.loadings,
        rank_sweep_cache=out.rank_sweep_cache,
    )  # fmt: skip


def load_selection(ctx: GroupContext) -> dict:
    """The chosen ranks and λ and the final factors, from the selection's outputs."""
    with np.load(ctx.out.decomposition) as npz:
        arrays = {k: npz[k] for k in ("U1", "U1_val", "U1_test", "U2", "D", "U3", "roi_coefficients")}
    choice = json.loads(ctx.out.selection.read_text())
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


def merge_metrics(ctx: GroupContext, decomposition: dict, fresh: bool = False) -> None:
    """Put the decomposition's metrics into ``metrics.json`` beside the network's.

    The network's metrics (written by the predictions stage) stay at the top level and the
    decomposition's go under ``decomposition``. After the selection ran (``fresh``) the
    file is always rewritten; when it was skipped, only if its decomposition part is from
    another run, so a re-run leaves it untouched.
    """
    path = ctx.out.metrics
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


def _check_memory(shape, tensor: str, layer: str) -> None:
    """Log what the selection will hold in memory; warn when it exceeds what is available.

    A warning, not an error: the estimate is a measured ratio, not a bound, and a run
    that is killed by the out-of-memory killer resumes from its stamps.
    """
    size = decomposed_nbytes(shape, tensor)
    need = SELECTION_MEMORY_FACTOR * size
    free = env.available_memory()
    LOGGER.info("selection: the %s tensor takes %.1f GB; the selection needs about %.1f GB (%s available)",
                tensor, size / 1e9, need / 1e9, "unknown" if free is None else f"{free / 1e9:.1f} GB")
    if free is not None and need > free:
        LOGGER.warning(
            "the selection needs about %.1f GB of memory but %.1f GB is available (layer %s, "
            "%d subjects): give the job more memory, or choose a coarser --layer",
            need / 1e9, free / 1e9, layer, shape[0],
        )


def network_gradient(ctx: GroupContext, train_rows, k: int | None = None) -> np.ndarray:
    """The training subjects' output gradient at the decomposed layer, ``(c, v)``
    (``--tensor relevance``): of the model, or of its network ``k``."""
    x = ctx.map_dataset().subset(np.asarray(train_rows))
    net = ctx.model if k is None else member(ctx.model, k)
    # The first target's output: the one the report explains.
    LOGGER.info("selection: output gradient (%s) at %s over %d training subjects",
                ctx.targets.columns[0], ctx.activations.layer, len(x))
    g = gradient_rms(net, x, ctx.activations.layer, device=ctx.device, target=0)
    return g.reshape(g.shape[0], -1)


def _draw(ctx: GroupContext, result: dict) -> None:
    """The selection's figures, from what it chose."""
    out = ctx.out
    plot_scree(result["scree"], out.scree_figure, result["ranks"])
    if result["rank_sweep"] is not None:
        plot_rank_sweep(result["rank_sweep"], out.rank_sweep_figure, result["ranks"])
    if result["lambda_sweep"] is not None:
        plot_lambda_sweep(result["lambda_sweep"], out.lambda_sweep_figure, result["lambda"])


def stage_selection(ctx: GroupContext) -> None:
    """Scree, rank sweep, λ sweep and the final decomposition (:func:`run_selection`)."""
    config, act, out = ctx.config, ctx.activations, ctx.out
    key = ctx.selection_key = selection_key(ctx)
    outputs = [out.scree, out.selection, out.decomposition, out.decomposition_json, out.loadings,
               out.selection_metrics]
    if ctx.tensor != "activations":
        outputs.append(out.tensor_parameters)
    if ctx.is_done("selection", key, outputs):
        ctx.selection = load_selection(ctx)
        merge_metrics(ctx, json.loads(out.selection_metrics.read_text()))
        return
    if list(act.subjects) != list(ctx.subjects):
        raise DataError("the activation tensor lists other subjects than the preprocessed maps; remove the work directory")
    mean, std = ctx.target_scale()
    true = ctx.targets.loc[act.subjects].to_numpy(np.float64)
    ids = ["sub-" + s for s in act.subjects]
    by_id = ctx.predictions.set_index("participant_id").loc[ids]
    network = by_id[[prediction_columns(t)["predicted"] for t in ctx.targets.columns]].to_numpy(np.float64)
    rows = ctx.split_rows()
    # Standardised as the network's training target, so that the network's head and the
    # linear model speak the same units; metrics.json converts back.
    y = rows.map(lambda r: (true[r] - mean) / std)
    # The head reads the pooled output of the last layer; an earlier layer's channels are not
    # its input. With several networks the ranks and λ are chosen on the first one's
    # channels, and the consensus stage decomposes every network.
    several = ctx.n_networks > 1
    array = act.array[:, member_channels(ctx)] if several else act.array
    last = act.layer == ctx.model.default_layer and not several
    head = head_from_torch(ctx.model.head.cpu()) if last else None
    _check_memory(array.shape, ctx.tensor, act.layer)
    gradient = None
    if ctx.tensor == "relevance":
        gradient = network_gradient(ctx, rows.train, 0 if several else None)
    A, parameters, head_on_tensor = prepare_tensor(array, rows, ctx.tensor, gradient_rms=gradient, head=head)
    if head is not None and head_on_tensor is None:
        # The weight varies over voxels, so the voxel average of the reconstruction
        # no longer gives the head's input: that comparison is left out.
        LOGGER.info("selection: --tensor relevance: the network head on the reconstruction is not computed")
    if parameters:
        # Kept so that the back-projection (explanations stage) builds the same tensor
        # without reading the training activations or taking the gradient again.
        with atomic_path(out.tensor_parameters) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **parameters)
    LOGGER.info("selection: %s tensor %s per split %s", ctx.tensor, A.train.shape[1:],
                {s: len(r) for s, r in rows.items()})
    result = run_selection(
        A, y, _files(ctx),
        ranks=config.ranks, l1=config.l1, rank_grid=config.rank_grid, lambda_grid=config.lambda_grid,
        head=head_on_tensor, network_pred=rows.map(lambda r: (network[r] - mean) / std).to_dict(),
        participant_ids=rows.map(lambda r: [ids[i] for i in r]).to_dict(),
        target_names=list(ctx.targets.columns), n_jobs=config.n_cpus or -1,
        dask_scheduler=config.dask_scheduler, random_state=config.random_seed, quiet=config.quiet,
        device=ctx.device if ctx.device.type == "cuda" else None, constraints=ctx.constraints,
        rank_rule="paper" if ctx.method == "paper" else "prediction",
        about={"layer": act.layer, "tensor": ctx.tensor, "grid_shape": list(act.grid_shape),
               "channels": int(array.shape[1]), "method": ctx.method, "networks": ctx.n_networks,
               "constraints": ctx.constraints},
    )  # fmt: skip
    _draw(ctx, result)
    # The tensors (1.8 GB at the demo's block1) can sit in reference cycles left by the
    # sweeps' parallel machinery until the cyclic collector happens to run; the next
    # stage needs that memory, so release it now.
    del A
    gc.collect()
    standardised = json.loads(out.decomposition_json.read_text())["metrics"]
    decomposition = target_metrics(result["final"], rows.map(lambda r: true[r]), mean, std,
                                   list(ctx.targets.columns), key)
    decomposition["standardised"] = standardised
    decomposition["tensor"] = ctx.tensor
    write_json(out.selection_metrics, decomposition)
    merge_metrics(ctx, decomposition, fresh=True)
    ctx.selection = load_selection(ctx)
    test = decomposition["metrics"][ctx.targets.columns[0]]["test"]
    LOGGER.info(
        "selection: ranks %s, lambda %g; test MAE %s",
        ctx.selection["ranks"], ctx.selection["lambda"], {k: round(v["mae"], 3) for k, v in test.items()},
    )  # fmt: skip
    # The sweeps' tables and the figures as well, those this run wrote (a given --ranks or
    # --lambda skips a sweep): a damaged one makes the next run redo the stage.
    written = [p for t in (out.scree, out.rank_sweep, out.lambda_sweep) for p in (t, t.with_suffix(".json"))]
    written += [out.scree_figure, out.rank_sweep_figure, out.lambda_sweep_figure]
    ctx.mark_done("selection", key, list(dict.fromkeys([*outputs, *(p for p in written if p.is_file())])))

