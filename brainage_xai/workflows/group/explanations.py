"""Stage ``explanations``: RoI maps, loadings against the target, GradCAM, occlusion and
the back-projection of each RoI to the input.

Everything is computed first and written at the end, each file once: the RoIs as a 4D
image and a combined label map, ``rois.tsv`` (atlas overlap, how much of each RoI is the
target, where its loading comes from), ``loadings_vs_<target>.tsv`` and its figure, the
GradCAM average, the occlusion test's tables and figure, and the back-projected RoIs.
"""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pandas as pd

from ...bids.derivatives import roi_names, sidecar_path
from ...errors import DataError
from ...explain import backprojection as bp
from ...explain import gradcam, loadings, occlusion
from ...explain.consensus import ROBUST_STABILITY
from ...explain.rois import (
    CONSENSUS_SIDECAR,
    RELATION_SIDECAR,
    ROIS_SIDECAR,
    combined_dseg,
    name_rois,
    roi_components,
    roi_masks,
)
from ...imaging.atlas import naming_atlas_names, naming_atlases
from ...model.activations import feature_geometry, layer_modules
from ...model.training import resolve_precision
from ...report.figures import plot_loadings, plot_occlusion, save_figure
from ...utils.io import save_nifti, write_json, write_tsv
from .layer import member
from .runner import GroupContext

LOGGER = logging.getLogger("brainage_xai.group")

#: Random blobs per RoI in the occlusion test (the test's minimum for a 95th percentile).
N_RANDOM_BLOBS = occlusion.MIN_DRAWS
#: Raised when the explanations' outputs change, so that an earlier run redoes them (and
#: the report) on its next run. 2: cv_r2 and target_related in rois.tsv. 3: RoI columns
#: of loadings.tsv named as the RoIs; the loadings and occlusion figures are files.
#: 4: the atlas column of rois.tsv.
EXPLANATIONS_OUTPUTS = 4
#: Subjects per GradCAM pass (forward and backward, so memory grows fast with it) and
#: per forward pass of the occlusion test (no gradients: larger batches are faster).
GRADCAM_BATCH, PREDICT_BATCH = 4, 16


def template_grid(ctx: GroupContext):
    """``(template_img, mask, background)`` on the model grid.

    The template of the participant level when it is on the maps' grid; otherwise (maps
    made elsewhere) an empty image on the maps' grid, no brain mask and no background.
    """
    tpl = ctx.template
    if tuple(tpl.shape) == tuple(ctx.input_shape) and np.allclose(tpl.affine, ctx.input_affine, atol=1e-3):
        return tpl.t1, np.asarray(tpl.mask.dataobj) > 0, tpl.t1
    LOGGER.warning("explanations: the maps' grid differs from the template's; RoIs are not masked")
    return nib.Nifti1Image(np.zeros(ctx.input_shape, np.float32), ctx.input_affine), None, None


def decomposition(ctx: GroupContext) -> dict:
    """What is explained: the consensus when one was formed, else the selection's fit."""
    return ctx.consensus or ctx.selection


def roi_loadings(ctx: GroupContext) -> pd.DataFrame:
    """``participant_id``, ``split``, the first target and one column per RoI (U1), in the
    activation tensor's subject order."""
    target = ctx.targets.columns[0]
    source = decomposition(ctx)
    u1 = np.zeros((len(ctx.activations.subjects), source["U3"].shape[1]))
    for split, r in ctx.split_rows().items():
        u1[r] = source["U1"][split]
    table = ctx.predictions.set_index("participant_id").loc[["sub-" + s for s in ctx.activations.subjects]]
    out = pd.DataFrame({
        "participant_id": table.index.to_numpy(), "split": table["split"].to_numpy(),
        target: table[target].to_numpy(float),
    })  # fmt: skip
    for r, name in enumerate(roi_names(u1.shape[1])):
        out[name] = u1[:, r]
    return out


def outputs(ctx: GroupContext) -> list:
    out, target = ctx.out, ctx.targets.columns[0]
    files = [out.components, sidecar_path(out.components), out.dseg, sidecar_path(out.dseg), out.dseg_tsv,
             out.rois, sidecar_path(out.gradcam),
             out.loading_fits(target), out.loadings_figure(target), out.gradcam, out.occlusion,
             out.occlusion_null, out.occlusion_figure]
    if ctx.config.backprojection:
        files += [out.backprojected, sidecar_path(out.backprojected)]
    return files


def explanations_key(ctx: GroupContext) -> str:
    return ctx.key(selection=ctx.selection_key, consensus=ctx.consensus_key if ctx.consensus else None,
                   template=ctx.template.source,
                   atlas=naming_atlas_names(ctx.config.resolution), blobs=N_RANDOM_BLOBS, volume_ratio=occlusion.VOLUME_RATIO,
                   backprojection=int(ctx.config.backprojection), outputs=EXPLANATIONS_OUTPUTS)


def predictors(ctx: GroupContext, mean, std) -> dict | object:
    """The networks the occlusion test asks: each network of the consensus, or the one model."""
    def wrap(net):
        return occlusion.torch_predictor(
            net, device=ctx.device, batch_size=PREDICT_BATCH, scale=float(std[0]), shift=float(mean[0]),
            # the training's precision: bf16 is many times faster on CPUs with AMX and on GPUs
            dtype=resolve_precision("auto", ctx.device),
        )  # fmt: skip

    if ctx.consensus and ctx.n_networks > 1:
        return {f"network {k + 1}": wrap(member(ctx.model, k)) for k in range(ctx.n_networks)}
    return wrap(ctx.model)


def consensus_columns(ctx: GroupContext, names, occ_table: pd.DataFrame) -> pd.DataFrame:
    """``rois.tsv``'s columns of the consensus: stability, spread, and the networks that
    contain each RoI and that rely on it (occlusion)."""
    cons = ctx.consensus
    relied = (occ_table.groupby("roi")["above_null"].sum() if "network" in occ_table
              else occ_table.set_index("roi")["above_null"].astype(int))
    return pd.DataFrame({
        "name": names,
        "stability": np.round(cons["stability"], 4),
        "spread": np.round(cons["spread"], 4),
        "robust": cons["stability"] >= ROBUST_STABILITY,
        "networks_with_roi": [len(cons["networks"][n]["networks"]) for n in names],
        "networks_relying": [int(relied.get(n, 0)) for n in names],
        "networks": ctx.n_networks,
    })


def _back_projection(ctx: GroupContext, template_img, mask, rois_img, atlases):
    """Each RoI's loading back-projected to the input (:mod:`brainage_xai.explain.backprojection`)."""
    rows = ctx.split_rows().train
    parts = {}
    if ctx.tensor != "activations":  # what the tensor was built with
        source = ctx.out.selection_work / "consensus_parameters.npz" if ctx.consensus else ctx.out.tensor_parameters
        with np.load(source) as npz:
            parts = {k: npz[k] for k in npz.files}
    U2, D, U3 = (decomposition(ctx)[k] for k in ("U2", "D", "U3"))
    LOGGER.info("explanations: back-projecting %d RoIs over %d training subjects", U3.shape[1], len(rows))
    result = bp.back_project(
        ctx.model, ctx.map_dataset(workers=0).stack(rows), ctx.activations.layer, U2, D, U3,
        tensor=ctx.tensor, centre=parts.get("centre"), scale=parts.get("scale"),
        weight=parts.get("weight"), device=ctx.device, progress=not ctx.config.quiet,
        # the training's precision, as the occlusion test: bf16 is 2.8 times faster on
        # CPUs with AMX and gives the same maps (correlation >= 0.998)
        dtype=resolve_precision("auto", ctx.device),
    )  # fmt: skip
    img = bp.backprojection_image(result.maps, template_img, mask)
    table = bp.backprojection_table(img, rois_img, mask=mask, atlases=atlases)
    return img, table


def stage_explanations(ctx: GroupContext) -> None:
    """RoI maps, loadings against the target, GradCAM and the occlusion test."""
    out, config = ctx.out, ctx.config
    target = ctx.targets.columns[0]
    key = ctx.explanations_key = explanations_key(ctx)
    if ctx.is_done("explanations", key, outputs(ctx)):
        return
    if not config.backprojection:
        # an earlier run's maps would no longer match these RoIs
        for path in (out.backprojected, sidecar_path(out.backprojected)):
            path.unlink(missing_ok=True)
    template_img, mask, _ = template_grid(ctx)
    grid = ctx.template.grid if mask is not None else f"{config.resolution} mm, the preprocessed maps' grid"
    model, layer = ctx.model, ctx.activations.layer
    # the maps, read when a pass needs them: GradCAM one batch at a time, the occlusion
    # test holds the test subjects only
    maps = ctx.map_dataset(workers=0)
    table = roi_loadings(ctx)
    source = decomposition(ctx)
    names = roi_names(source["U3"].shape[1])
    mean, std = ctx.target_scale()
    geometry = feature_geometry(model, model.activation_module(layer), maps.shape)
    if mask is None:
        mask = np.ones(maps.shape, dtype=bool)
    # TemplateFlow's atlas when on disk; the package ships its own, so RoIs are always named.
    atlases = naming_atlases(template_img)

    # where the RoIs are
    rois_img = roi_components(source["U3"], geometry, template_img, mask=mask)
    dseg_img, dseg_table = combined_dseg(rois_img)
    rois_table = name_rois(rois_img, atlases)
    # how much of each RoI is the target: per-RoI coefficients in target units per unit
    # loading (the selection's are on the standardised target)
    fits = loadings.describe_loadings(table, table[target], roi_columns=names,
                                      coefficients=source["roi_coefficients"][:, 0] * std[0],
                                      target=target, seed=config.random_seed)
    rois_table["cv_r2"] = fits["cv_r2"].to_numpy()
    rois_table["target_related"] = fits["cv_r2"].to_numpy() >= loadings.RELATED_R2
    curves = loadings.trajectory_curves(table, table[target], names, seed=config.random_seed)
    # the baseline
    cam_img, _ = gradcam.average_gradcam(model, layer_modules(model, layer), (maps[i] for i in range(len(maps))), geometry,
                                         template_img, mask=mask, batch_size=GRADCAM_BATCH,
                                         device=ctx.device)
    # does the network rely on them
    split = table["split"].to_numpy()
    test, train = split == "test", split == "train"
    if not test.any() or not train.any():
        raise DataError("the occlusion test needs subjects in the 'train' and 'test' splits")
    predict = predictors(ctx, mean, std)
    zooms = tuple(float(z) for z in template_img.header.get_zooms()[:3])
    occ_table, null = occlusion.occlusion_test(
        predict, maps.stack(np.flatnonzero(test)).numpy()[:, 0], table[target].to_numpy()[test],
        roi_masks(rois_img), maps.subset(np.flatnonzero(train)).mean(),
        mask, n_random=N_RANDOM_BLOBS, seed=config.random_seed, zooms=zooms, progress=not config.quiet,
    )  # fmt: skip
    # where each RoI's loading comes from in the input
    sidecar = {**ROIS_SIDECAR, **RELATION_SIDECAR}
    if ctx.consensus:
        rois_table = rois_table.merge(consensus_columns(ctx, names, occ_table), on="name", how="left")
        sidecar.update(CONSENSUS_SIDECAR)
    if config.backprojection:
        bp_img, bp_table = _back_projection(ctx, template_img, mask, rois_img, atlases)
        rois_table = rois_table.merge(bp_table, on="name", how="left")
        sidecar.update(bp.BACKPROJECTION_SIDECAR)
    model.cpu()

    save_nifti(rois_img, out.components)
    write_json(sidecar_path(out.components), {
        "Description": "RoIs: columns of the spatial factor U3 upsampled (trilinear) from the feature "
        "grid with the network's stride geometry; one volume per RoI",
        "FeatureGeometry": geometry.to_dict(), "Layer": layer,
    })  # fmt: skip
    save_nifti(dseg_img, out.dseg)
    write_json(sidecar_path(out.dseg), {
        "Description": "Each voxel labelled with its strongest RoI (RoIs scaled to their peak; "
        "background where none reaches 0.2 of its peak); labels in the _dseg.tsv",
        "Sources": [out.components.name], "SpatialReference": out.space,
        "Resolution": grid,
    })  # fmt: skip
    write_tsv(out.dseg_tsv, dseg_table)
    write_tsv(out.loading_fits(target), fits, sidecar=loadings.FITS_SIDECAR)
    save_figure(plot_loadings(table, table[target], curves, table["split"], target=target),
                out.loadings_figure(target))
    save_nifti(cam_img, out.gradcam)
    write_json(sidecar_path(out.gradcam), {
        "Description": f"GradCAM of the network's {target} prediction at layer {layer}, per subject, "
        "averaged over all subjects and upsampled with the layer's stride geometry; at the last "
        "layer of a network with global average pooling and a linear head it equals CAM",
        "Layer": layer, "Sources": [out.model.name], "SpatialReference": out.space,
        "Resolution": grid,
    })  # fmt: skip
    write_tsv(out.occlusion, occ_table, sidecar={c: occlusion.TABLE_SIDECAR[c] for c in occ_table.columns})
    write_tsv(out.occlusion_null, null, sidecar={c: occlusion.NULL_SIDECAR[c] for c in null.columns})
    unit = "years" if target == "age" else f"{target} units"
    save_figure(plot_occlusion(occ_table, null, unit=unit), out.occlusion_figure)
    if config.backprojection:
        save_nifti(bp_img, out.backprojected)
        write_json(sidecar_path(out.backprojected),
                   {"Description": bp.DESCRIPTION, "Sources": [out.components.name]})
    write_tsv(out.rois, rois_table, sidecar=sidecar)
    LOGGER.info("explanations: %d RoIs, GradCAM and occlusion test in %s", len(names), out.group_dir)
    ctx.mark_done("explanations", key, outputs(ctx))
