"""The group report: one self-contained ``report.html`` (inline images, no network).

:func:`read_context` reads what the group level's stages wrote into ``group/`` (tables,
images, figure files) into a context dict; :func:`render_group_report` takes such a
context (keys below, all optional but ``title``) and writes the page atomically. The
report computes nothing of the science: figures of the numbers are the files their stages
drew (:mod:`brainage_xai.report.figures`), embedded as ``data:`` URIs; only the brain views
are drawn here from the images (PNG); the interactive RoI viewer is nilearn's ``view_img`` document (its JavaScript
inlined by nilearn) inside an ``iframe srcdoc``, so the file can be mailed or opened from
a cluster without a server. Every value from the dataset (labels, column names) goes
through Jinja2 autoescape, so a label with HTML in it is shown as text.

Context keys
------------
title : str
summary : dict
    Label -> value rows of the run summary (data, map, target, split sizes, grid, layer,
    ranks, lambda).
metrics : DataFrame or list of dict
    Rows of predictor x split metrics (network, linear model on loadings, network head on
    the reconstruction, mean predictor).
target : str
    Target name (default ``age``).
figures : dict
    Figure files drawn by the stages that made the numbers, embedded as they are (SVG
    or PNG): ``predictions``, ``scree``, ``rank_sweep``, ``lambda_sweep``, ``loadings``
    and ``occlusion``. The report draws none of these again, so there is one
    implementation of each plot (:mod:`brainage_xai.report.figures`).
ranks : (int, int)
    The chosen ``(R1, R2)``; with ``rank_reason`` (str), the rule that chose them.
lambda : float
    The chosen l1 penalty; with ``lambda_reason`` (str).
rois_img, dseg_img, background_img, mask_img : nibabel images
    RoI components (4D), combined map, template for display, brain mask.
rois_table : DataFrame
    ``rois.tsv``. With ``occlusion``, each RoI's two readings are summed up under the
    summary (:func:`roi_findings`).
loadings : DataFrame
    ``participant_id``, ``split``, the target column and one column per RoI.
loading_fits : DataFrame
    ``loadings_vs_<target>.tsv``: each RoI's fits and the statement of its relation.
gradcam_img : nibabel image
    Average GradCAM on the template grid.
backprojected_img : nibabel image
    The RoIs back-projected to the input (:mod:`brainage_xai.explain.backprojection`), 4D like
    ``rois_img``; shown under each RoI, with ``input_region`` and ``agreement`` from
    ``rois_table`` when it has them.
occlusion : tuple of DataFrame
    ``(table, null)``: ``occlusion.tsv`` and ``occlusion_null.tsv``.
methods : str
    Methods text (a default with citations is used when missing).
versions : dict
    Software versions (filled in when missing).
subjects : list of dict
    ``{"label": ..., "href": ...}`` links to the per-subject pages.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from ..bids.derivatives import GroupOutputs, prediction_columns, roi_names
from ..imaging.geometry import spatial_correlation
from ..utils.io import read_tsv
from .figures import combined_map_uri, file_uri, glass_uri, roi_mosaics, roi_viewer
from .findings import (  # noqa: F401  (the report's readings, importable from here)
    CLAUSES,
    CONSENSUS_READINGS,
    READINGS,
    consensus_findings,
    findings_sentence,
    roi_findings,
)
from .methods import (
    DEFAULT_METHODS,
    boilerplate,
    methods_text,
    preprocessing_methods,
    settings_sentence,
)
from .references import REFERENCES
from .run_info import about_run
from .tables import empty_rois, records, roi_tables

#: The figures the template shows (keys of ``page["figures"]``).
FIGURES = ("predictions", "scree", "rank_sweep", "lambda_sweep", "combined", "loadings",
           "gradcam", "occlusion", "consensus")


_VERSION_PACKAGES = (
    "brainage-xai", "torch", "numpy", "scipy", "tensorly", "scikit-learn", "nibabel",
    "nilearn", "pybids", "captum", "jinja2", "matplotlib",
)


def software_versions() -> dict[str, str]:
    """Versions of Python and of the packages that made the results."""
    out = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


# -- figures --------------------------------------------------------------------------


def roi_gradcam_correlations(rois_img, gradcam_img, mask=None) -> pd.DataFrame:
    """Spatial correlation of the GradCAM average with each RoI, on the template grid."""
    rois = np.asarray(rois_img.dataobj, dtype=float)
    cam = np.asarray(gradcam_img.dataobj, dtype=float)
    within = None if mask is None else np.asarray(
        mask.dataobj if hasattr(mask, "dataobj") else mask, dtype=bool)
    return pd.DataFrame({
        "roi": roi_names(rois.shape[3]),
        "correlation_with_gradcam": [
            spatial_correlation(rois[..., r], cam, within) for r in range(rois.shape[3])
        ],
    })


# -- reading the group folder --------------------------------------------------------

#: The predictors compared in ``metrics.json``, as the report names them.
PREDICTORS = {
    "network": "network",
    "linear_model_on_decomposition": "linear model on the decomposition",
    "network_head_on_reconstruction": "network head on the reconstruction",
    "mean_predictor": "training-mean predictor",
}


def _read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def summary_rows(config, out: GroupOutputs, input_shape, template_name: str) -> dict:
    """The run summary: data, split, network, decomposed layer and tensor, choices, MAE.

    From the run's configuration and the files the stages wrote (``model.json``,
    ``split.tsv``, ``decomposition.json``, ``selection.json``, ``metrics.json``).
    """
    meta = _read_json(out.model_json)
    counts = read_tsv(out.split)["split"].value_counts()
    about = _read_json(out.decomposition_json)
    choice = _read_json(out.selection)
    metrics = _read_json(out.metrics)
    targets = list(meta.get("targets") or config.target)
    training = meta.get("training") or {}
    n_members = int(meta.get("architecture", {}).get("ensemble", 1))
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
    test = metrics["decomposition"]["metrics"][targets[0]]["test"]
    tensor = about.get("tensor", config.tensor)
    method = about.get("method", config.method)
    consensus = _read_json(out.consensus_json) if out.consensus_json.is_file() else None
    if consensus is not None:
        robust = sum(r["stability"] >= consensus["robust_stability"] for r in consensus["rois"].values())
        method_row = (f"consensus of {consensus['networks']} networks x {consensus['resamples']} resamples "
                      f"of the training subjects ({consensus['fits']} decompositions): "
                      f"{len(consensus['rois'])} RoIs, {robust} robust")
    elif method == "paper":
        method_row = "the paper's: one network, its last layer's activations, eq. 2's constraints"
    else:
        method_row = "one decomposition of one network"
    channels = int(about["channels"])
    grid = " × ".join(map(str, about["grid_shape"]))
    n_subjects = int(counts.sum())
    return {
        "Method": method_row,
        "Dataset": str(config.bids_dir),
        "Map": config.map,
        "Target": ", ".join(targets),
        "Subjects": f"{n_subjects} (train {counts.get('train', 0)}, validation "
        f"{counts.get('val', 0)}, test {counts.get('test', 0)})",
        "Model grid": f"{template_name}, {config.resolution} mm, {' × '.join(map(str, input_shape))} voxels",
        "Network": f"{meta.get('architecture', {}).get('name', 'network')}, {model}",
        "Decomposed layer": f"{about['layer']}: {channels} channels × {grid} voxels",
        "Decomposed tensor": (
            "the activations (as in the paper)" if tensor == "activations" else
            "deviations from the training mean activation, positive and negative parts "
            f"({2 * channels} channels)"
            + (", weighted by the network's output gradient" if tensor == "relevance" else "")),
        "Ranks": f"R1 = {choice['ranks']['R1']}, R2 = {choice['ranks']['R2']} ({choice['ranks'].get('rule')})"
        + (" (chosen on the first network)" if consensus is not None else ""),
        "l1 penalty (lambda)": f"{choice['lambda']['lambda']:.4g} ({choice['lambda'].get('rule')})",
        "Test MAE": (f"network {consensus['metrics']['test']['network']['mae']:.2f}; linear model on the "
                     f"consensus RoIs {consensus['metrics']['test']['linear_model_on_consensus']['mae']:.2f}; "
                     f"training-mean predictor {consensus['metrics']['test']['mean_predictor']['mae']:.2f}")
        if consensus is not None else "; ".join(f"{PREDICTORS[k]} {v['mae']:.2f}" for k, v in test.items()),
    }


def metrics_rows(metrics: dict, consensus: dict | None = None) -> pd.DataFrame:
    """Predictor × target × split rows of MAE and MSE (``metrics.json``'s decomposition part,
    and the consensus's linear model when there is one)."""
    rows = []
    renamed = {}
    if consensus is not None:
        # the selection's decomposition is then the first network's, used to choose the ranks
        renamed = {"linear_model_on_decomposition": "linear model on the first network's decomposition",
                   "network_head_on_reconstruction": "first network's head on its reconstruction"}
        target = next(iter(metrics["decomposition"]["metrics"]))
        for split in ("test", "val"):
            m = consensus["metrics"][split]["linear_model_on_consensus"]
            rows.append({"predictor": "linear model on the consensus RoIs", "target": target, "split": split,
                         "MAE": m["mae"], "MSE": np.nan})
    for target, splits in metrics["decomposition"]["metrics"].items():
        for split in ("test", "val"):
            for name, m in splits.get(split, {}).items():
                rows.append({"predictor": renamed.get(name, PREDICTORS[name]), "target": target,
                             "split": split, "MAE": m["mae"], "MSE": m["mse"]})  # fmt: skip
    return pd.DataFrame(rows)


def carries_prediction(metrics: dict, consensus: dict | None = None, margin: float = 0.2) -> tuple[bool, float, float]:
    """Whether the explained decomposition's linear model reaches the network's test MAE
    within ``margin``: ``(carries, linear model MAE, network MAE)``."""
    if consensus is not None:
        test = consensus["metrics"]["test"]
        lin, net = test["linear_model_on_consensus"]["mae"], test["network"]["mae"]
    else:
        target = next(iter(metrics["decomposition"]["metrics"]))
        test = metrics["decomposition"]["metrics"][target]["test"]
        lin, net = test["linear_model_on_decomposition"]["mae"], test["network"]["mae"]
    return bool(lin <= (1 + margin) * net), float(lin), float(net)


def _probed(table: pd.DataFrame) -> pd.DataFrame:
    """The layer choice's rows that say something (not the candidates left unprobed)."""
    keep = ~table["status"].astype(str).str.startswith("not probed")
    return table.loc[keep, [c for c in ("layer", "tensor", "rank", "val_mae", "network_val_mae", "ratio", "status")
                            if c in table]]


def group_boilerplate(out: GroupOutputs, config, template, *, backprojection: bool):
    """The methods boilerplate of the group run (:func:`brainage_xai.report.methods.boilerplate`)
    from the settings that ran, as the stages wrote them."""
    meta = _read_json(out.model_json)
    target = list(meta.get("targets") or config.target)[0]
    about = _read_json(out.decomposition_json)
    choice = _read_json(out.selection)
    consensus = _read_json(out.consensus_json) if out.consensus_json.is_file() else None
    training = meta.get("training") or {}
    tensor = about.get("tensor", config.tensor)
    tuned = int(config.tune or 0) if config.model is None else 0
    run = {
        "target": target, "subjects": read_tsv(out.split)["split"].value_counts().to_dict(),
        "networks": None if config.model is not None else int(meta.get("architecture", {}).get("ensemble", 1)),
        "epochs": len(training.get("history") or []) or config.epochs, "tuned": tuned,
        "layer": about.get("layer"), "channels": about.get("channels"), "grid": about.get("grid_shape"),
        "tensor": tensor, "constraints": about.get("constraints"),
        "ranks": (choice["ranks"]["R1"], choice["ranks"]["R2"]), "rank_rule": choice["ranks"].get("rule"),
        "lambda": choice["lambda"]["lambda"], "lambda_rule": choice["lambda"].get("rule"),
        "method": about.get("method", config.method), "consensus": consensus,
        "atlases": _naming_atlases(out),
    }
    text = methods_text(target=target, tensor=tensor, backprojection=backprojection,
                        method=about.get("method", config.method), consensus=consensus)
    return boilerplate(preprocessing_methods(config, template),
                       {"methods": text, "settings": settings_sentence(run),
                        "consensus": consensus is not None, "tuned": bool(tuned),
                        "atlases": run["atlases"]})


def _naming_atlases(out: GroupOutputs) -> list[str]:
    """The atlases that named the RoIs (``rois.tsv``'s ``atlas`` column), in order of use."""
    if not out.rois.is_file():
        return []
    table = read_tsv(out.rois)
    return list(dict.fromkeys(table["atlas"].astype(str))) if "atlas" in table else []


def read_context(out: GroupOutputs, config, *, input_shape, template_name: str,
                 background_img=None, mask_img=None, subject_pages: dict | None = None,
                 template=None) -> dict:
    """The report's context from the files of one group analysis.

    Parameters
    ----------
    out : GroupOutputs
        The analysis' files.
    config : brainage_xai.config.Config
        The run's settings (what the summary and methods say about them).
    input_shape : tuple of int
        The model grid's shape.
    template_name : str
        The template space.
    background_img, mask_img : nibabel images, optional
        The template on the model grid and its brain mask (display only).
    subject_pages : dict, optional
        Participant label -> path of its ``sub-X.html``, for the links.
    template : brainage_xai.imaging.templates.Template, optional
        The template (its source is cited); by default only its name is known.
    """
    import types

    import nibabel as nib

    meta = _read_json(out.model_json)
    targets = list(meta.get("targets") or config.target)
    target = targets[0]
    predictions = read_tsv(out.predictions)
    loadings = read_tsv(out.consensus_loadings if out.consensus_json.is_file() else out.loadings)
    loadings = loadings.merge(predictions[["participant_id", target]], on="participant_id", how="left")
    choice = _read_json(out.selection)
    n_members = int(meta.get("architecture", {}).get("ensemble", 1))
    decomposition = _read_json(out.decomposition_json)
    consensus = _read_json(out.consensus_json) if out.consensus_json.is_file() else None
    metrics = _read_json(out.metrics)
    carries, lin, net = carries_prediction(metrics, consensus)
    unit = "years" if target == "age" else f"{target} units"
    optional = {
        "backprojected_img": nib.load(str(out.backprojected)) if out.backprojected.is_file() else None,
        "layer_choice": _probed(read_tsv(out.layer_choice)) if out.layer_choice.is_file() else None,
        "consensus": consensus,
        "warning": None if carries else (
            f"The RoIs do not carry the network's prediction: a linear model on their loadings "
            f"predicts {target} with a test MAE of {lin:.2f} {unit}, against {net:.2f} for the "
            f"network. They describe variation in the layer's activations, not what the network "
            f"bases its prediction on; read them as such."),
    }
    if template is None:
        template = types.SimpleNamespace(name=template_name, source=None, shape=tuple(input_shape))
    cited = group_boilerplate(out, config, template, backprojection=optional["backprojected_img"] is not None)
    group_section = cited.sections[-1][1]
    predicted = prediction_columns(target)["predicted"]
    pages = subject_pages or {}
    return {
        **optional,
        "boilerplate": cited,
        "preprocessing": cited.sections[0][1][0],
        "settings_text": group_section[1],
        "notation": group_section[-1],
        "citations": [ref.text for ref in cited.references],
        "about": about_run(config.output_dir, getattr(config, "run_uuid", None), "group"),
        "title": f"brainage-xai group report: {config.map} map, {', '.join(targets)}",
        "summary": summary_rows(config, out, input_shape, template_name),
        "methods": methods_text(target=target, tensor=decomposition.get("tensor", config.tensor),
                                n_members=n_members, backprojection=optional["backprojected_img"] is not None,
                                method=decomposition.get("method", config.method), consensus=consensus),
        "metrics": metrics_rows(metrics, consensus),
        "predictions": predictions,
        "target": target,
        "target_unit": "years" if target == "age" else f"{target} units",
        "figures": {
            "predictions": out.predictions_figure(target),
            "scree": out.scree_figure,
            "rank_sweep": out.rank_sweep_figure if config.ranks is None else None,
            "lambda_sweep": out.lambda_sweep_figure if config.l1 is None else None,
            "loadings": out.loadings_figure(target),
            "occlusion": out.occlusion_figure,
            "consensus": out.consensus_figure if consensus is not None else None,
        },
        "ranks": (int(choice["ranks"]["R1"]), int(choice["ranks"]["R2"])),
        "rank_reason": f"Rule: {choice['ranks'].get('rule')}.",
        "lambda": float(choice["lambda"]["lambda"]),
        "lambda_reason": f"Rule: {choice['lambda'].get('rule')}.",
        "rois_img": nib.load(str(out.components)),
        "dseg_img": nib.load(str(out.dseg)),
        "rois_table": read_tsv(out.rois),
        "loadings": loadings,
        "loading_fits": read_tsv(out.loading_fits(target)),
        "gradcam_img": nib.load(str(out.gradcam)),
        "occlusion": (read_tsv(out.occlusion), read_tsv(out.occlusion_null)),
        "background_img": background_img,
        "mask_img": mask_img,
        "subjects": [
            {"label": f"sub-{s}", "href": os.path.relpath(p, out.group_dir), **_subject_row(predictions, s, target, predicted)}
            for s, p in pages.items()],
    }


def _subject_row(predictions: pd.DataFrame, subject: str, target: str, predicted: str) -> dict:
    """The subject index's cells: split, true and predicted target."""
    row = predictions.loc[predictions["participant_id"] == f"sub-{subject}"]
    if row.empty:
        return {}
    row = row.iloc[0]
    return {"split": str(row.get("split", "")), "true": float(row[target]), "predicted": float(row[predicted])}


# -- rendering ------------------------------------------------------------------------


def _num(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.1f}"


def build_page(context: dict) -> dict:
    """Turn the context (tables, images) into what the template shows."""
    target = context.get("target", "age")
    page: dict = {
        "title": context.get("title", f"brainage-xai group report ({target})"),
        "target": target,
        "unit": context.get("target_unit", "years" if target == "age" else f"{target} units"),
        "summary": list((context.get("summary") or {}).items()),
        "metrics": records(context.get("metrics")),
        "subjects": [{**s, "true": _num(s.get("true")), "predicted": _num(s.get("predicted"))}
                     for s in context.get("subjects") or []],
        "sections": [],
    }
    figs = {name: file_uri(path) for name, path in (context.get("figures") or {}).items()
            if path is not None and Path(path).is_file()}
    page["warning"] = context.get("warning")
    page["layer_choice"] = records(context.get("layer_choice"))
    consensus = context.get("consensus")
    page["consensus"] = None if consensus is None else {
        "networks": consensus["networks"], "resamples": consensus["resamples"], "fits": consensus["fits"],
        "threshold": consensus["match_threshold"], "robust": consensus["robust_stability"],
    }
    page["ranks"] = context.get("ranks")
    page["rank_reason"] = context.get("rank_reason")
    page["lambda"] = context.get("lambda")
    page["lambda_reason"] = context.get("lambda_reason")
    bg = context.get("background_img")
    rois_img = context.get("rois_img")
    table = context.get("rois_table")
    page["rois_table"], page["rois_table_all"] = roi_tables(table, target)
    page["mosaics"] = roi_mosaics(rois_img, bg) if rois_img is not None else []
    rows = {} if table is None else {str(row["name"]): row for _, row in table.iterrows()}
    empty = empty_rois(table)
    for mosaic in page["mosaics"]:
        mosaic["input"] = None
        mosaic["empty"] = mosaic["name"] in empty
        row = rows.get(mosaic["name"])
        # how much of the RoI is the target: a component of other variation is said so
        has_r2 = row is not None and "cv_r2" in row
        mosaic["cv_r2"] = float(row["cv_r2"]) if has_r2 else None
        mosaic["related"] = str(row["target_related"]).lower() == "true" if has_r2 else None
    bp_img = context.get("backprojected_img")
    if bp_img is not None and rois_img is not None and bp_img.shape == rois_img.shape:
        for mosaic, bp in zip(page["mosaics"], roi_mosaics(bp_img, bg)):
            row = rows.get(mosaic["name"])
            known = row is not None and "input_region" in row
            mosaic["input"] = {
                "glass": bp["glass"], "slices": bp["slices"],
                "region": row["input_region"] if known else None,
                "agreement": float(row["agreement"]) if known else None,
            }
    if context.get("dseg_img") is not None:
        figs["combined"] = combined_map_uri(context["dseg_img"], bg)
    page["viewer"] = roi_viewer(rois_img, bg) if rois_img is not None else None
    fits = context.get("loading_fits")
    page["statements"] = [] if fits is None else list(fits["statement"])
    if fits is not None:
        keep = [c for c in ("roi", "relation", "cv_r2", "pearson_r", "slope", "breakpoint",
                            "cv_rmse_linear", "cv_rmse_piecewise", "cv_rmse_smooth",
                            "coefficient") if c in fits]
        page["loading_fits"] = records(fits[keep])
    else:
        page["loading_fits"] = None
    cam = context.get("gradcam_img")
    page["gradcam_table"] = None
    if cam is not None:
        figs["gradcam"] = glass_uri(cam, "GradCAM average")
        if rois_img is not None:
            page["gradcam_table"] = records(
                roi_gradcam_correlations(rois_img, cam, context.get("mask_img")))
    occ = context.get("occlusion")
    unit = context.get("target_unit", "years" if target == "age" else "target units")
    page["occlusion_table"] = None if occ is None else records(occ[0])
    rois_table = context.get("rois_table")
    if rois_table is not None and "stability" in rois_table:
        findings = consensus_findings(rois_table, target=target)
    else:
        findings = roi_findings(rois_table, None if occ is None else occ[0], target=target, unit=unit)
    page["findings"] = records(findings)
    page["findings_sentence"] = findings_sentence(findings, target)
    # every figure the template names, so that a run without one (e.g. --ranks given:
    # no rank sweep) drops the figure instead of failing on an undefined key
    page["figures"] = dict.fromkeys(FIGURES) | figs
    page["methods"] = context.get("methods") or DEFAULT_METHODS.format(target=target)
    page["citations"] = context.get("citations") or [ref.text for ref in REFERENCES.values()]
    for key in ("preprocessing", "settings_text", "notation", "about"):
        page[key] = context.get(key)
    page["versions"] = list((context.get("versions") or software_versions()).items())
    return page


def render_group_report(context: dict, out_path) -> Path:
    """Render ``report.html`` from ``context`` (see the module docstring) atomically.

    Returns
    -------
    pathlib.Path
        ``out_path``.
    """
    from ..utils.io import write_text
    from . import render

    return write_text(out_path, render("group.html", page=build_page(context)))


