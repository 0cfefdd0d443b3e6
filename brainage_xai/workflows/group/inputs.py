"""Stages ``inputs`` (the preprocessed maps and the targets) and ``split`` (60/20/20)."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import pandas as pd

from ...bids import load_targets
from ...bids.derivatives import collect_preprocessed, format_resolution
from ...errors import DataError, MissingInputError
from ...model.data import files_sha256
from ...model.training import SPLITS, stratified_split
from ...utils.io import damage, read_tsv, write_json, write_tsv
from .runner import GroupContext

LOGGER = logging.getLogger("brainage_xai.group")

#: Fewest subjects a group run accepts (a 60/20/20 split and 5-fold fits of the loadings).
MIN_SUBJECTS = 10

SPLIT_SIDECAR = {
    "participant_id": {"Description": "Participant label"},
    "split": {
        "Description": "Data split: 60/20/20, stratified by quantile bins of the first target",
        "Levels": {"train": "training", "val": "validation", "test": "test"},
    },
}


def stage_inputs(ctx: GroupContext) -> None:
    """Find the preprocessed maps and read the targets."""
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
    first = nib.load(str(ctx.paths[0]))
    ctx.input_shape, ctx.input_affine = tuple(int(s) for s in first.shape[:3]), first.affine
    analysis = {"map": config.map, "targets": list(config.target), "resolution": config.resolution,
                "subjects": len(ctx.subjects)}  # fmt: skip
    try:
        same = json.loads(ctx.out.analysis.read_text()) == analysis
    except (OSError, ValueError):
        same = False
    if not same:  # a re-run leaves the folder untouched
        write_json(ctx.out.analysis, analysis)
    LOGGER.info("group level: %d subjects, %s map on grid %s", len(ctx.subjects), config.map, ctx.input_shape)


def stage_split(ctx: GroupContext) -> None:
    """Write ``split.tsv`` (60/20/20, stratified by the first target) or reuse it."""
    path = ctx.out.split
    problem = None if not path.is_file() else damage(path) or damage(path.with_suffix(".json"))
    if path.is_file() and problem is None:
        old = read_tsv(path)
        if {"participant_id", "split"} <= set(old.columns):
            labels = old["participant_id"].astype(str).str.replace(r"^sub-", "", regex=True)
            if sorted(labels) == sorted(ctx.subjects) and old["split"].isin(SPLITS).all():
                ctx.split = pd.Series(old["split"].to_numpy(), index=labels.to_numpy())
                LOGGER.info("split: reusing %s", path)
                return
        LOGGER.warning("split: %s lists other subjects than this run; writing a new split", path)
    elif problem is not None:
        LOGGER.warning("split: %s or its sidecar %s; writing the split again", path, problem)
    table = stratified_split(ctx.subjects, ctx.targets.iloc[:, 0].to_numpy(), seed=ctx.config.random_seed)
    ctx.split = pd.Series(table["split"].to_numpy(), index=table["participant_id"].to_numpy())
    table["participant_id"] = "sub-" + table["participant_id"]
    write_tsv(path, table, sidecar=SPLIT_SIDECAR)
    LOGGER.info("split: %s", table["split"].value_counts().to_dict())
