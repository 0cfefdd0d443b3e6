"""Stage ``consensus``: the RoIs that come back across the networks and resamples.

Every network's tensor of the chosen layer is decomposed at the selection's ranks and λ
on ``--resamples`` resamples of the training subjects, the components are clustered
into consensus RoIs with their stability (:mod:`brainage_xai.explain.consensus`), and
every subject's loadings on them are fitted with the consensus spatial factor fixed.
With one network and one resample there is nothing to agree on: the stage is skipped and
the explanations use the selection's decomposition (the single-fit path).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd

from ...bids.derivatives import prediction_columns, roi_names
from ...explain.consensus import (
    MATCH_THRESHOLD,
    MIN_FITS,
    ROBUST_STABILITY,
    consensus_decomposition,
    linear_model,
)
from ...imaging.geometry import upsample
from ...model.activations import feature_geometry
from ...report.figures import plot_consensus
from ...selection import prepare_tensor
from ...utils.io import atomic_path, write_json, write_tsv
from .runner import GroupContext
from .selection import member_channels, network_gradient

LOGGER = logging.getLogger("brainage_xai.group")

FITS_SIDECAR = {
    "network": {"Description": "Network (0-based: seed --random-seed + network)"},
    "resample": {"Description": "Resample of the training subjects: 0 all of them, then bootstraps"},
    "component": {"Description": "Column of that fit's spatial factor (1-based)"},
    "roi": {"Description": "The consensus RoI the component was matched to one-to-one, or n/a"},
    "correlation": {"Description": "Spatial correlation of the component with the RoI (feature grid)"},
}


def applies(ctx: GroupContext) -> bool:
    """Whether there is a consensus to form (more than one fit)."""
    return ctx.method == "consensus" and ctx.n_networks * ctx.config.resamples > 1


def consensus_key(ctx: GroupContext) -> str:
    return ctx.key(selection=ctx.selection_key, resamples=ctx.config.resamples, threshold=MATCH_THRESHOLD,
                   min_fits=MIN_FITS, networks=ctx.n_networks)


def outputs(ctx: GroupContext) -> list:
    out = ctx.out
    return [out.consensus, out.consensus_json, out.consensus_fits, out.consensus_loadings,
            out.consensus_figure, out.selection_work / "consensus_parameters.npz"]


def _ensemble_layout(parts: list[np.ndarray], tensor: str) -> np.ndarray:
    """Stack per-network channel rows as the ensemble's deviations are laid out.

    Each network's deviation tensor is ``[positive (c), negative (c)]``; the ensemble's
    (its activations side by side, then split) is ``[positive of every network, negative
    of every network]``. Activations are stacked as they are.
    """
    if tensor == "activations":
        return np.concatenate(parts)
    half = [p.shape[0] // 2 for p in parts]
    return np.concatenate([p[:h] for p, h in zip(parts, half)] + [p[h:] for p, h in zip(parts, half)])


def load_consensus(ctx: GroupContext) -> dict:
    """The consensus in the form the explanations use (as the selection's decomposition)."""
    with np.load(ctx.out.consensus) as npz:
        arrays = {k: npz[k] for k in npz.files}
    about = json.loads(ctx.out.consensus_json.read_text())
    Q = arrays["U3"].shape[1]
    return {
        "U1": {"train": arrays["U1"], "val": arrays["U1_val"], "test": arrays["U1_test"]},
        "U2": arrays["W"], "D": np.eye(Q), "U3": arrays["U3"],
        "roi_coefficients": arrays["roi_coefficients"], "ranks": (Q, Q),
        "stability": arrays["stability"], "spread": arrays["spread"],
        "networks": about["rois"], "about": about,
    }


def _figure(ctx: GroupContext, result, geometry) -> None:
    """The consensus RoIs beside each network's own (full-data fit) RoI matched to it."""
    cons = result.consensus
    mask = np.asarray(ctx.template.mask.dataobj) > 0 if tuple(ctx.template.shape) == tuple(ctx.input_shape) else None
    grid = geometry.feature_shape

    def projection(column):
        vol = upsample(np.asarray(column).reshape(grid), geometry)
        if mask is not None:
            vol = vol * mask
        return vol.max(axis=2)

    names = cons.names
    m = cons.matches
    own = m[m["resample"] == 0]
    cells = []
    for q, name in enumerate(names):
        row = [(projection(cons.U3[:, q]), f"{name}: stability {cons.stability[q]:.2f}")]
        for k in range(ctx.n_networks):
            hit = own[(own["network"] == k) & (own["roi"] == name)]
            if hit.empty:
                row.append((None, "not found"))
            else:
                j = int(hit["component"].iloc[0]) - 1
                row.append((projection(result.own[k][:, j]), f"r = {float(hit['correlation'].iloc[0]):.2f}"))
        cells.append(row)
    plot_consensus(cells, [f"network {k + 1}" for k in range(ctx.n_networks)], ctx.out.consensus_figure)


def stage_consensus(ctx: GroupContext) -> None:
    """Form the consensus RoIs (more than one fit); load them into ``ctx.consensus``."""
    if not applies(ctx):
        ctx.consensus = {}
        return
    key = ctx.consensus_key = consensus_key(ctx)
    if ctx.is_done("consensus", key, outputs(ctx)):
        ctx.consensus = load_consensus(ctx)
        return
    config, act, out = ctx.config, ctx.activations, ctx.out
    rows = ctx.split_rows()
    parameters: list[dict] = [{} for _ in range(ctx.n_networks)]
    gradients = {}

    def tensors(k):
        gradient = None
        if ctx.tensor == "relevance":
            if k not in gradients:
                gradients[k] = network_gradient(ctx, rows.train, k)
            gradient = gradients[k]
        A, params, _ = prepare_tensor(act.array[:, member_channels(ctx, k)], rows, ctx.tensor,
                                      gradient_rms=gradient)
        parameters[k] = params
        return A

    ranks, lam = ctx.selection["ranks"], ctx.selection["lambda"]
    LOGGER.info("consensus: %d networks x %d resamples at ranks %s, lambda %g", ctx.n_networks,
                config.resamples, ranks, lam)
    result = consensus_decomposition(
        tensors, ctx.n_networks, ranks, l1=lam, n_resamples=config.resamples,
        constraints=ctx.constraints, random_state=config.random_seed,
        progress=lambda msg: LOGGER.debug("consensus: fitted %s", msg),
    )  # fmt: skip
    cons = result.consensus
    mean, std = ctx.target_scale()
    true = ctx.targets.loc[act.subjects].to_numpy(np.float64)
    y = rows.map(lambda r: (true[r, :1] - mean[0]) / std[0])
    model, pred = linear_model(result.loadings, y)
    ids = ["sub-" + s for s in act.subjects]
    network = ctx.predictions.set_index("participant_id").loc[ids][prediction_columns(ctx.targets.columns[0])["predicted"]]
    network = network.to_numpy(np.float64)
    metrics = {}
    for split in ("val", "test"):
        r = rows[split]
        t = true[r, 0]
        lin = pred[split][:, 0] * std[0] + mean[0]
        metrics[split] = {
            "network": {"mae": float(np.mean(np.abs(network[r] - t)))},
            "linear_model_on_consensus": {"mae": float(np.mean(np.abs(lin - t)))},
            "mean_predictor": {"mae": float(np.mean(np.abs(true[rows.train, 0].mean() - t)))},
        }
    W = _ensemble_layout([result.fixed.W[ch] for ch in result.channels], ctx.tensor)
    own = {f"own_{k}": u for k, u in result.own.items()}
    for k, splits in result.own_loadings.items():  # in the activation tensor's subject order
        u1 = np.zeros((len(act.subjects), splits.train.shape[1]))
        for split, r in rows.items():
            u1[r] = splits[split]
        own[f"own_loadings_{k}"] = u1
    with atomic_path(out.consensus) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, U3=cons.U3, U1=result.loadings.train, U1_val=result.loadings.val,
                            U1_test=result.loadings.test, W=W, stability=cons.stability,
                            spread=cons.spread, roi_coefficients=np.atleast_2d(model.coef_).T, **own)
    if parameters[0]:
        stacked = {name: _ensemble_layout([p[name] for p in parameters], "activations")
                   for name in parameters[0]}
        with atomic_path(out.selection_work / "consensus_parameters.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **stacked)
    else:  # the activations: nothing to rebuild; the file says so
        with atomic_path(out.selection_work / "consensus_parameters.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh)
    write_tsv(out.consensus_fits, cons.matches, sidecar=FITS_SIDECAR)
    names = roi_names(cons.U3.shape[1])
    target = ctx.targets.columns[0]
    table = pd.DataFrame({"participant_id": ids, "split": list(act.split)})
    column = f"predicted_{target}"
    for name in [*names, column]:
        table[name] = 0.0
    for split, r in rows.items():
        table.loc[r, names] = result.loadings[split]
        table.loc[r, column] = pred[split][:, 0] * std[0] + mean[0]
    write_tsv(out.consensus_loadings, table, sidecar={
        "participant_id": {"Description": "Participant"}, "split": {"Description": "Data split"},
        **{n: {"Description": f"Loading of the consensus {n} (fitted with the consensus spatial "
                              "factor fixed, on all networks)"} for n in names},
        column: {"Description": f"{target} predicted by the linear model on the consensus loadings"},
    })
    write_json(out.consensus_json, {
        "Description": "Consensus RoIs: the spatial components of every network's decompositions "
        "on resamples of the training subjects, clustered by spatial correlation and matched "
        "one-to-one per fit; loadings fitted with the consensus spatial factor fixed.",
        "networks": ctx.n_networks, "resamples": config.resamples, "fits": cons.n_fits,
        "rank": list(ranks), "lambda": lam, "layer": act.layer, "tensor": ctx.tensor,
        "match_threshold": MATCH_THRESHOLD, "min_fits": MIN_FITS, "robust_stability": ROBUST_STABILITY,
        "rois": {name: {"stability": float(cons.stability[q]), "spread": float(cons.spread[q]),
                        "networks": [int(k) for k in cons.networks[q]]} for q, name in enumerate(names)},
        "reconstruction_error": result.errors,
        "metrics": {"Description": "MAE in the target's units of the network (the networks' mean), "
                    "the linear model on the consensus loadings and the training-mean predictor",
                    **metrics},
        "stage_key": key,
    })  # fmt: skip
    geometry = feature_geometry(ctx.model, ctx.model.activation_module(act.layer), ctx.input_shape)
    _figure(ctx, result, geometry)
    ctx.consensus = load_consensus(ctx)
    LOGGER.info("consensus: %d RoIs (%d robust) from %d fits; test MAE linear model %.3f, network %.3f",
                len(names), int(np.sum(cons.stability >= ROBUST_STABILITY)), cons.n_fits,
                metrics["test"]["linear_model_on_consensus"]["mae"], metrics["test"]["network"]["mae"])
    ctx.mark_done("consensus", key, outputs(ctx))
