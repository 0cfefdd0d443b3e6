"""Stage ``activations``: the activation tensor ``A`` of the decomposed layer (work folder)."""

from __future__ import annotations

import logging

import numpy as np

from ...model.activations import (
    iter_activations,
    load_activation_tensor,
    read_participant_activations,
    write_activation_tensor,
)
from ...model.data import batches as load_batches
from .runner import GroupContext

LOGGER = logging.getLogger("brainage_xai.group")

#: Subjects per forward pass.
BATCH = 8


def stage_activations(ctx: GroupContext) -> None:
    """Store ``A`` (reusing participant-level activation NIfTIs made by the same model)."""
    layer = ctx.layer
    key = ctx.key(model=ctx.model_sha, layer=layer, inputs=ctx.inputs_sha, split=ctx.split_sha)
    paths = ctx.out.activations(layer)
    if not ctx.is_done("activations", key, paths):
        x = ctx.map_dataset(workers=0)  # read in this process: the batches are few here
        reused = 0

        def batches():
            nonlocal reused
            for start in range(0, len(ctx.subjects), BATCH):
                stop = min(start + BATCH, len(ctx.subjects))
                stored = [read_participant_activations(ctx.paths[i], layer, ctx.model_sha) for i in range(start, stop)]
                if all(s is not None for s in stored):
                    reused += len(stored)
                    yield np.stack(stored)
                else:
                    (inputs,) = load_batches(x, [range(start, stop)], ctx.device)
                    yield from iter_activations(ctx.model, inputs, layer, batch_size=BATCH, device=ctx.device)

        write_activation_tensor(
            paths, batches(), subjects=ctx.subjects, split=list(ctx.split.loc[ctx.subjects]),
            model=ctx.model, layer=layer, input_shape=ctx.input_shape,
            input_affine=ctx.input_affine, model_sha=ctx.model_sha,
        )  # fmt: skip
        LOGGER.info("activations: %s (%d subjects from participant-level files)", paths[0], reused)
        ctx.mark_done("activations", key, paths)
    ctx.activations = load_activation_tensor(paths[1])
