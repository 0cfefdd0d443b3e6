"""Stage ``layer``: which layer and tensor are decomposed.

Given (``--layer``, ``--tensor``), or the method's (the paper's: the last layer's
activations), or chosen on the validation subjects (the consensus method's default):
the finest candidate whose decomposition predicts the target about as well as the
network does (:mod:`brainage_xai.selection.layer_choice`), written to
``layer_choice.tsv``.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from nibabel.affines import voxel_sizes

from ...model.activations import check_layer, gradient_rms, iter_activations
from ...model.training import predict_batches
from ...selection import Splits, decomposed_nbytes, prepare_tensor
from ...selection.layer_choice import LAYER_CHOICE_SIDECAR, Candidate, choose_layer
from ...utils import env
from ...utils.io import read_tsv, write_tsv
from .runner import GroupContext, default_tensor

LOGGER = logging.getLogger("brainage_xai.group")

#: R1 = R2 of the probe decompositions unless the rank grid is smaller.
PROBE_RANK = 10
#: Share of the available memory one candidate's tensor may take.
MEMORY_SHARE = 0.25
#: Tensors tried at each layer when ``--tensor`` is not given, in order.
CANDIDATE_TENSORS = ("deviations", "relevance")


def member(model, k: int = 0):
    """Network ``k`` of an ensemble (the model itself for one network)."""
    members = getattr(model, "members", None)
    return model if members is None else members[k]


def _probe_rank(ctx: GroupContext) -> int:
    config = ctx.config
    if config.ranks is not None:
        return int(config.ranks[0])
    if config.rank_grid:
        return min(PROBE_RANK, max(config.rank_grid))
    return PROBE_RANK


def layer_key(ctx: GroupContext) -> str:
    c = ctx.config
    return ctx.key(model=ctx.model_sha, inputs=ctx.inputs_sha, split=ctx.split_sha, targets=ctx.targets_sha,
                   method=ctx.method, layer=c.layer, tensor=c.tensor, rank=_probe_rank(ctx),
                   constraints=ctx.constraints, seed=c.random_seed)


def _given(ctx: GroupContext) -> pd.DataFrame:
    config = ctx.config
    layer = check_layer(ctx.model, config.layer, float(voxel_sizes(ctx.input_affine).max()))
    if ctx.method == "paper" and config.layer is None:
        status = "the paper's: the last layer"
    else:
        status = "given (--layer)"
    return pd.DataFrame([{"layer": layer, "tensor": config.tensor or default_tensor(ctx), "rank": np.nan,
                          "val_mae": np.nan, "network_val_mae": np.nan, "ratio": np.nan,
                          "carries": np.nan, "status": status}])


def _choose(ctx: GroupContext) -> pd.DataFrame:
    """Probe the candidates with the first network (all subjects' activations in memory;
    the maps read from disk for each layer)."""
    config = ctx.config
    net = member(ctx.model, 0)
    x = ctx.map_dataset()
    rows = Splits(ctx.rows("train"), ctx.rows("val"), ctx.rows("test"))
    mean, std = ctx.target_scale()
    y_true = ctx.targets.to_numpy(np.float64)[:, :1]
    y = rows.map(lambda r: (y_true[r] - mean[0]) / std[0])
    raw = predict_batches(net, x.subset(rows.val), device=ctx.device)[:, :1]
    network_mae = float(np.mean(np.abs(raw * std[0] + mean[0] - y_true[rows.val])))
    rank = _probe_rank(ctx)
    free = env.available_memory()
    budget = MEMORY_SHARE * free if free is not None else 8e9
    need_r2 = max(config.rank_grid) if config.rank_grid else (config.ranks[1] if config.ranks else rank)
    tensors = [config.tensor] if config.tensor else list(CANDIDATE_TENSORS)
    candidates = [Candidate(layer, t) for layer in net.layers for t in tensors]
    cache: dict = {}

    def activations(layer):
        if layer not in cache:
            cache.clear()
            cache[layer] = np.concatenate(list(iter_activations(net, x, layer, device=ctx.device)))
        return cache[layer].reshape(len(x), net.layer_channels(layer), -1)

    def tensors_of(cand: Candidate):
        c = net.layer_channels(cand.layer) * (1 if cand.tensor == "activations" else 2)
        v = int(np.prod(net.feature_shape(ctx.input_shape, cand.layer)))
        if max(rank, need_r2) > c:
            return f"{c} channels, fewer than the rank {max(rank, need_r2)}"
        size = decomposed_nbytes((len(x), c // (1 if cand.tensor == "activations" else 2), v), cand.tensor)
        if size > budget:
            return f"the tensor takes {size / 1e9:.1f} GB, over {budget / 1e9:.1f} GB"
        A = activations(cand.layer)
        gradient = None
        if cand.tensor == "relevance":
            g = gradient_rms(net, x.subset(rows.train), cand.layer, device=ctx.device, target=0)
            gradient = g.reshape(g.shape[0], -1)
        tensors, _, _ = prepare_tensor(A, rows, cand.tensor, gradient_rms=gradient)
        return tensors

    LOGGER.info("layer: probing %d candidates (rank %d) on the validation subjects; network MAE %.3f",
                len(candidates), rank, network_mae)
    table, chosen, carries = choose_layer(candidates, tensors_of, y, network_mae, rank, scale=float(std[0]),
                                          constraints=ctx.constraints, random_state=config.random_seed)
    if not carries:
        LOGGER.warning("no layer's decomposition predicts %s within 20 %% of the network on the "
                       "validation subjects; %s %s comes closest", ctx.targets.columns[0],
                       table.loc[chosen, "layer"], table.loc[chosen, "tensor"])
    return table


def stage_layer(ctx: GroupContext) -> None:
    """Resolve ``ctx.layer`` and ``ctx.tensor``; write ``layer_choice.tsv``."""
    key = ctx.layer_key = layer_key(ctx)
    path = ctx.out.layer_choice
    if not ctx.is_done("layer", key, [path]):
        choosing = ctx.config.layer is None and ctx.method == "consensus"
        table = _choose(ctx) if choosing else _given(ctx)
        write_tsv(path, table, sidecar=LAYER_CHOICE_SIDECAR)
        ctx.mark_done("layer", key, [path])
    table = read_tsv(path)
    row = table[table["status"].astype(str).str.startswith(("chosen", "given", "the paper"))].iloc[0]
    ctx.layer, ctx.tensor = str(row["layer"]), str(row["tensor"])
    LOGGER.info("layer: %s, %s tensor (%s)", ctx.layer, ctx.tensor, row["status"])
