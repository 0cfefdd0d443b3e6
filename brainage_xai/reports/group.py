"""The group report: one self-contained ``report.html`` (inline images, no network).

:func:`render_group_report` takes a context dict (keys below, all optional but
``title``) and writes the page atomically. Figures are drawn here from the tables and
images in the context and embedded as ``data:`` URIs (SVG for plots, PNG for brain
views); the interactive RoI viewer is nilearn's ``view_img`` document (its JavaScript
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
    or PNG): ``predictions`` (:mod:`brainage_xai.prediction`), ``scree``,
    ``rank_sweep`` and ``lambda_sweep`` (:mod:`brainage_xai.selection.plots`). The
    report draws none of these again, so there is one implementation of each plot.
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
    :func:`brainage_xai.loadings.describe_loadings` output (computed when missing).
gradcam_img : nibabel image
    Average GradCAM on the template grid.
backprojected_img : nibabel image
    The RoIs back-projected to the input (:mod:`brainage_xai.backprojection`), 4D like
    ``rois_img``; shown under each RoI, with ``input_region`` and ``agreement`` from
    ``rois_table`` when it has them.
occlusion : tuple of DataFrame
    ``(table, null)`` from :func:`brainage_xai.occlusion.occlusion_test`.
methods : str
    Methods text (a default with citations is used when missing).
versions : dict
    Software versions (filled in when missing).
subjects : list of dict
    ``{"label": ..., "href": ...}`` links to the per-subject pages.
"""

from __future__ import annotations

import base64
import io
import platform
import re
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

#: The figures the template shows (keys of ``page["figures"]``).
FIGURES = ("predictions", "scree", "rank_sweep", "lambda_sweep", "combined", "loadings",
           "gradcam", "occlusion")

DEFAULT_METHODS = (
    "A pre-activation 3D ResNet (He et al., 2016) was trained to predict {target} from "
    "template-registered brain maps. The activations of one convolutional layer over all "
    "subjects form a tensor (subjects x channels x voxels), decomposed by a constrained "
    "non-negative Tucker decomposition with diagonal core faces (Kossaifi et al., 2016; "
    "Zhou et al., 2015), solved by hierarchical alternating least squares (Cichocki et al., "
    "2007). Ranks were chosen from scree plots and the held-out reconstruction error "
    "(Kneedle, Satopaa et al., 2011); among channel ranks that reconstructed equally well, "
    "and for the l1 penalty on the spatial factor, by the validation error of a linear "
    "model on the voxel-averaged reconstruction. Each column "
    "of the spatial factor, upsampled to the template with the network's stride geometry, "
    "is a region of interest (RoI); the matching column of the subject factor holds the "
    "subjects' loadings. Each RoI's loadings were fitted on {target} by a line, a line with "
    "one breakpoint and a smoothing spline, compared by 5-fold cross-validation; the share of "
    "the loadings' variance that the best fit predicts for held-out subjects tells how much "
    "of the RoI is {target}, and an RoI below one half is reported as a component of other "
    "variation. GradCAM (Selvaraju et al., 2017), averaged over subjects, is the "
    "baseline; at a last layer followed by global average pooling and a linear head it "
    "equals CAM (Zhou et al., 2016). Faithfulness was tested by occluding each RoI with the "
    "training mean and comparing the test MAE increase with that of random blobs of the "
    "same volume."
)

#: Added to the methods when the RoIs were back-projected (the default; not with
#: ``--no-backprojection``).
BACKPROJECTION_METHODS = (
    " Each RoI's loading was also followed back to the input: the least-squares "
    "loading of the subject's tensor slice on the RoI's component, differentiated with "
    "respect to the input map and multiplied by the input's deviation from the training "
    "mean, gives each input voxel's first-order contribution; its covariance with the "
    "loading over the training subjects (negative values set to zero) is that voxel's share "
    "of the loading's variance (the back-projected RoI), which shows where in the input the "
    "differences between subjects that the RoI measures come from."
)

#: Added to the methods when ``--tensor deviations`` was used.
DEVIATIONS_METHODS = (
    " Unlike the original method (which decomposes the activations themselves), the "
    "decomposed tensor held each subject's deviation from the training subjects' mean "
    "activation, divided by each channel's standard deviation over the training subjects "
    "and voxels and split into its positive and negative parts so that it stays "
    "non-negative; the RoIs are therefore where subjects differ, not where activations "
    "are large."
)

#: Added after :data:`DEVIATIONS_METHODS` when ``--tensor relevance`` was used.
RELEVANCE_METHODS = (
    " Each channel and voxel of these deviations was further weighted by the square root "
    "of how far the network's prediction moves for a one-spread change of that activation "
    "(the root mean square over the training subjects of the output's gradient with "
    "respect to the activation, times the channel's standard deviation; weights normalised "
    "to mean 1), so that tissue that varies between subjects but that the network ignores "
    "does not form RoIs."
)

#: Added to the methods when the network is an ensemble (``--ensemble K``); ``{k}`` is K.
ENSEMBLE_METHODS = (
    " The network was an ensemble of {k} such networks trained on the same subjects from "
    "different random initialisations, predicting with the mean of their outputs; the "
    "decomposed activations were all {k} networks' channels of the layer side by side, so "
    "that the regions of interest and the loadings are shared by the ensemble, and GradCAM "
    "and the occlusion test used the ensemble's prediction."
)

CITATIONS = [
    "He K, Zhang X, Ren S, Sun J (2016). Identity mappings in deep residual networks. ECCV.",
    "Kossaifi J, Panagakis Y, Anandkumar A, Pantic M (2016). TensorLy: Tensor learning in "
    "Python. arXiv:1610.09555.",
    "Zhou G, Cichocki A, Zhao Q, Xie S (2015). Efficient nonnegative Tucker decompositions: "
    "algorithms and uniqueness. IEEE Trans Image Process 24(12).",
    "Cichocki A, Zdunek R, Amari S (2007). Hierarchical ALS algorithms for nonnegative "
    "matrix and 3D tensor factorization. ICA.",
    "Satopaa V, Albrecht J, Irwin D, Raghavan B (2011). Finding a 'kneedle' in a haystack. "
    "ICDCS Workshops.",
    "Selvaraju RR et al. (2017). Grad-CAM: visual explanations from deep networks via "
    "gradient-based localization. ICCV.",
    "Zhou B, Khosla A, Lapedriza A, Oliva A, Torralba A (2016). Learning deep features for "
    "discriminative localization. CVPR.",
    "Kokhlikyan N et al. (2020). Captum: a unified and generic model interpretability "
    "library for PyTorch. arXiv:2009.07896.",
    "Abraham A et al. (2014). Machine learning for neuroimaging with scikit-learn "
    "(nilearn). Front Neuroinform 8:14.",
]

_VERSION_PACKAGES = (
    "brainage-xai", "torch", "numpy", "scipy", "tensorly", "scikit-learn", "nibabel",
    "nilearn", "pybids", "captum", "jinja2", "matplotlib",
)


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def figure_uri(fig, fmt: str = "svg", dpi: int = 90) -> str:
    """Close ``fig`` and return it as a ``data:`` URI (SVG or PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    mime = "image/svg+xml" if fmt == "svg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _display_uri(display, dpi: int = 80) -> str:
    """A nilearn display as a PNG ``data:`` URI."""
    buf = io.BytesIO()
    fig = display.frame_axes.figure
    fig.savefig(buf, format="png", dpi=dpi, facecolor=fig.get_facecolor())
    display.close()
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def software_versions() -> dict[str, str]:
    """Versions of Python and of the packages that made the results."""
    out = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _records(table) -> dict | None:
    """A table as ``{"columns": [...], "rows": [[...]]}`` with readable numbers."""
    if table is None:
        return None
    df = pd.DataFrame(table)
    rows = []
    for row in df.itertuples(index=False):
        cells = []
        for value in row:
            if isinstance(value, float | np.floating):
                cells.append("n/a" if not np.isfinite(value) else f"{value:.4g}")
            elif value is None or (isinstance(value, float) and np.isnan(value)):
                cells.append("n/a")
            else:
                cells.append(str(value))
        rows.append(cells)
    return {"columns": [str(c) for c in df.columns], "rows": rows}


# -- figures --------------------------------------------------------------------------


def file_uri(path) -> str:
    """A figure file (SVG or PNG) as a ``data:`` URI."""
    path = Path(path)
    mime = {".svg": "image/svg+xml", ".png": "image/png"}.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"figure {path} must be .svg or .png; got {path.suffix!r}")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _index_img(img, r):
    from nilearn.image import index_img

    return index_img(img, r)


def roi_mosaics(rois_img, background_img=None, names=None) -> list[dict]:
    """Per RoI: a glass brain and axial slices (PNG data URIs)."""
    from nilearn import plotting

    out = []
    n = rois_img.shape[3]
    names = names or [f"RoI {r + 1}" for r in range(n)]
    for r in range(n):
        vol = _index_img(rois_img, r)
        peak = float(np.max(vol.get_fdata()))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            glass = plotting.plot_glass_brain(vol, display_mode="lyrz", colorbar=False,
                                              threshold=0.2 * peak if peak > 0 else None,
                                              cmap="hot", plot_abs=False)
            slices = plotting.plot_stat_map(vol, bg_img=background_img, display_mode="z",
                                            cut_coords=6, colorbar=False, cmap="hot",
                                            threshold=0.2 * peak if peak > 0 else None,
                                            draw_cross=False, annotate=False)
        out.append({"name": names[r], "glass": _display_uri(glass),
                    "slices": _display_uri(slices)})
    return out


def combined_map_uri(dseg_img, background_img=None) -> str:
    """The combined RoI map (each voxel coloured by its strongest RoI)."""
    from nilearn import plotting

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        display = plotting.plot_roi(dseg_img, bg_img=background_img, display_mode="ortho",
                                    cmap="tab10", colorbar=True, draw_cross=False)
    return _display_uri(display)


def glass_uri(img, title=None) -> str:
    from nilearn import plotting

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        display = plotting.plot_glass_brain(img, display_mode="lyrz", cmap="hot",
                                            plot_abs=False, colorbar=True, title=title)
    return _display_uri(display)


def viewer_html(img, background_img=None, title: str = "") -> str:
    """nilearn's interactive viewer as a standalone page (for ``iframe srcdoc``).

    The page's favicon link (a remote URL) is dropped: the report makes no request.
    """
    from nilearn.plotting import view_img

    data = np.asarray(img.dataobj, dtype=float)
    peak = float(np.max(np.abs(data))) if data.size else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        view = view_img(img, bg_img=background_img if background_img is not None else False,
                        threshold=0.2 * peak if peak > 0 else None, cmap="hot",
                        symmetric_cmap=False, title=title, black_bg=False)
    html = view.get_standalone()
    return re.sub(r"<link[^>]*rel=\"?(shortcut )?icon\"?[^>]*>", "", html)


def roi_gradcam_correlations(rois_img, gradcam_img, mask=None) -> pd.DataFrame:
    """Spatial correlation of the GradCAM average with each RoI, on the template grid."""
    from ..rois import spatial_correlation

    rois = np.asarray(rois_img.dataobj, dtype=float)
    cam = np.asarray(gradcam_img.dataobj, dtype=float)
    within = None if mask is None else np.asarray(
        mask.dataobj if hasattr(mask, "dataobj") else mask, dtype=bool)
    return pd.DataFrame({
        "roi": [f"RoI {r + 1}" for r in range(rois.shape[3])],
        "correlation_with_gradcam": [
            spatial_correlation(rois[..., r], cam, within) for r in range(rois.shape[3])
        ],
    })


def _true(value) -> bool:
    """A boolean cell as written to and read back from a TSV (``True``/``true``/bool)."""
    return str(value).strip().lower() == "true"


#: What each combination of the two readings makes an RoI, for the summary.
READINGS = {
    (True, True): "follows {target}; the network relies on it",
    (True, False): "follows {target}; the network relies on it no more than on random blobs",
    (False, True): "mostly other variation, yet the network relies on it",
    (False, False): "mostly other variation",
}


def roi_findings(rois_table=None, occlusion_table=None, *, target: str = "age",
                 unit: str = "years") -> pd.DataFrame | None:
    """One row per RoI: what the two readings that need no ground truth say of it.

    Whether the RoI's loadings follow the target (``cv_r2`` and ``target_related`` of
    ``rois.tsv``) and whether occluding it raises the network's test MAE more than the 95th
    percentile of random blobs of its volume (``occlusion.tsv``). On the simulated cohort
    the two agree for most RoIs (docs/report.md, stop 16), and an RoI for which both say
    yes is what the method set out to find. Columns: ``RoI``, ``region`` (atlas region),
    ``loading comes from`` (the atlas region of its back-projection, when ``rois.tsv``
    has it), ``<target> share`` (percent of the loadings' variance, cross-validated),
    ``occlusion`` (the RoI's MAE increase against the random blobs' 95th percentile) and
    ``reading``.
    ``None`` when neither table is given.
    """
    if rois_table is None and occlusion_table is None:
        return None
    rois = {} if rois_table is None else {str(r["name"]): r for _, r in pd.DataFrame(rois_table).iterrows()}
    occ = {} if occlusion_table is None else {str(r["roi"]): r for _, r in pd.DataFrame(occlusion_table).iterrows()}
    rows = []
    for name in list(dict.fromkeys([*rois, *occ])):
        roi, o = rois.get(name), occ.get(name)
        related = None if roi is None or "target_related" not in roi else _true(roi["target_related"])
        empty = o is not None and not np.isfinite(float(o["mae_increase"]))
        relied = None if o is None or empty else _true(o["above_null"])
        if empty:
            reading = "empty after thresholding"
        elif related is not None and relied is not None:
            reading = READINGS[(related, relied)]
        elif related is not None:  # no occlusion test
            reading = "follows {target}" if related else "mostly other variation"
        elif relied is not None:  # a rois.tsv written before cv_r2
            reading = "the network relies on it" if relied else "the network relies on it no more than on random blobs"
        else:
            reading = "n/a"
        back = {} if roi is None or "input_region" not in roi else {
            "loading comes from": "n/a" if pd.isna(roi["input_region"]) else str(roi["input_region"])}
        rows.append({
            "RoI": name,
            "region": "n/a" if roi is None or "region" not in roi else str(roi["region"]),
            **back,
            f"{target} share": ("n/a" if roi is None or "cv_r2" not in roi or pd.isna(roi["cv_r2"])
                                else f"{100 * float(roi['cv_r2']):.0f} %"),
            "occlusion": ("n/a" if o is None or empty else
                          f"{float(o['mae_increase']):.2f} vs {float(o['null_p95']):.2f} {unit}"),
            "reading": reading.format(target=target),
        })
    return pd.DataFrame(rows)


#: How :func:`findings_sentence` says each reading of a group of ``{k}`` RoIs, in its
#: order: (one, several).
CLAUSES = {
    READINGS[(True, True)]: ("{k} follows {target} and the network relies on it",
                             "{k} follow {target} and the network relies on them"),
    READINGS[(True, False)]: ("{k} follows {target}, but the network relies on it no more than on random blobs",
                              "{k} follow {target}, but the network relies on them no more than on random blobs"),
    "follows {target}": ("{k} follows {target}", "{k} follow {target}"),
    READINGS[(False, True)]: ("{k} is mostly other variation, yet the network relies on it",
                              "{k} are mostly other variation, yet the network relies on them"),
    READINGS[(False, False)]: ("{k} is mostly other variation", "{k} are mostly other variation"),
    "the network relies on it": ("the network relies on {k}", "the network relies on {k}"),
    "the network relies on it no more than on random blobs": (
        "the network relies on {k} no more than on random blobs",
        "the network relies on {k} no more than on random blobs"),
    "empty after thresholding": ("{k} is empty after thresholding", "{k} are empty after thresholding"),
}


def findings_sentence(findings: pd.DataFrame | None, target: str = "age") -> str | None:
    """One sentence that accounts for every RoI, grouped by reading.

    Where the occlusion test ran it starts with the RoIs that follow the target and that
    the network relies on (their number even when none); the other readings follow in the
    order of :data:`CLAUSES`.
    """
    if findings is None or findings.empty:
        return None
    clauses = {reading.format(target=target): forms for reading, forms in CLAUSES.items()}
    combined = [r.format(target=target) for r in READINGS.values()]
    # Both readings ran when the occlusion test did and some reading combines the two.
    both_ran = ("occlusion" in findings and bool((findings["occlusion"] != "n/a").any())
                and bool(findings["reading"].isin(combined).any()))
    parts = []
    for reading in dict.fromkeys([*clauses, *findings["reading"]]):
        names = findings.loc[findings["reading"] == reading, "RoI"].tolist()
        if not names and not (reading == combined[0] and both_ran):
            continue
        k = len(names)
        if reading in clauses:
            said = clauses[reading][k != 1].format(k=k, target=target)
        else:  # a reading this sentence does not know: quoted as it is
            said = f"{k} {'reads' if k == 1 else 'read'} \u201c{reading}\u201d"
        parts.append(said + (f" ({', '.join(names)})" if names else ""))
    return f"Of the {len(findings)} RoIs, " + "; ".join(parts) + "."


# -- rendering ------------------------------------------------------------------------


def build_page(context: dict) -> dict:
    """Turn the context (tables, images) into what the template shows."""
    target = context.get("target", "age")
    page: dict = {
        "title": context.get("title", f"brainage-xai group report ({target})"),
        "target": target,
        "summary": list((context.get("summary") or {}).items()),
        "metrics": _records(context.get("metrics")),
        "subjects": context.get("subjects") or [],
        "sections": [],
    }
    figs = {name: file_uri(path) for name, path in (context.get("figures") or {}).items()
            if path is not None and Path(path).is_file()}
    page["ranks"] = context.get("ranks")
    page["rank_reason"] = context.get("rank_reason")
    page["lambda"] = context.get("lambda")
    page["lambda_reason"] = context.get("lambda_reason")
    bg = context.get("background_img")
    rois_img = context.get("rois_img")
    page["rois_table"] = _records(context.get("rois_table"))
    page["mosaics"] = roi_mosaics(rois_img, bg) if rois_img is not None else []
    table = context.get("rois_table")
    rows = {} if table is None else {str(row["name"]): row for _, row in table.iterrows()}
    for mosaic in page["mosaics"]:
        mosaic["input"] = None
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
    page["viewers"] = []
    if rois_img is not None:
        for r in range(rois_img.shape[3]):
            page["viewers"].append({
                "name": f"RoI {r + 1}",
                "html": viewer_html(_index_img(rois_img, r), bg, title=f"RoI {r + 1}"),
            })
    loadings = context.get("loadings")
    fits = context.get("loading_fits")
    if loadings is not None:
        from ..loadings import describe_loadings, plot_loadings

        roi_cols = [c for c in loadings.columns if str(c).startswith("RoI")]
        split = loadings["split"] if "split" in loadings else None
        figs["loadings"] = figure_uri(plot_loadings(loadings, loadings[target], split,
                                                    roi_columns=roi_cols, target=target))
        if fits is None:
            fits = describe_loadings(loadings, loadings[target], roi_columns=roi_cols,
                                     target=target)
    page["statements"] = [] if fits is None else list(fits["statement"])
    if fits is not None:
        keep = [c for c in ("roi", "relation", "cv_r2", "pearson_r", "slope", "breakpoint",
                            "cv_rmse_linear", "cv_rmse_piecewise", "cv_rmse_smooth",
                            "coefficient") if c in fits]
        page["loading_fits"] = _records(fits[keep])
    else:
        page["loading_fits"] = None
    cam = context.get("gradcam_img")
    page["gradcam_table"] = None
    if cam is not None:
        figs["gradcam"] = glass_uri(cam, "GradCAM average")
        if rois_img is not None:
            page["gradcam_table"] = _records(
                roi_gradcam_correlations(rois_img, cam, context.get("mask_img")))
    occ = context.get("occlusion")
    unit = context.get("target_unit", "years" if target == "age" else "target units")
    page["occlusion_table"] = None
    if occ is not None:
        from ..occlusion import plot_occlusion

        table, null = occ
        figs["occlusion"] = figure_uri(plot_occlusion(table, null, unit=unit))
        page["occlusion_table"] = _records(table)
    findings = roi_findings(context.get("rois_table"), None if occ is None else occ[0], target=target,
                            unit=unit)
    page["findings"] = _records(findings)
    page["findings_sentence"] = findings_sentence(findings, target)
    # every figure the template names, so that a run without one (e.g. --ranks given:
    # no rank sweep) drops the figure instead of failing on an undefined key
    page["figures"] = dict.fromkeys(FIGURES) | figs
    page["methods"] = context.get("methods") or DEFAULT_METHODS.format(target=target)
    page["citations"] = context.get("citations") or CITATIONS
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


def subject_rois(participant_id: str, predictions: pd.DataFrame | None,
                 loadings: pd.DataFrame | None, target: str = "age") -> dict:
    """Context for the per-subject RoI partial (``group_subject_rois.html``).

    Parameters
    ----------
    participant_id : str
        ``sub-X``.
    predictions : DataFrame, optional
        ``predictions.tsv`` (columns named by :func:`brainage_xai.prediction.columns`).
    loadings : DataFrame, optional
        ``participant_id`` and one ``RoI <r>`` column per RoI, all subjects.
    target : str

    Returns
    -------
    dict
        ``predicted``, ``true``, ``gap``, ``gap_corrected`` (when in the table), ``split``
        and ``loadings`` (list of ``(roi, value, percentile among all subjects)``).
    """
    from ..prediction import columns

    col = columns(target)
    out: dict = {"participant_id": participant_id, "target": target, "loadings": []}
    if predictions is not None:
        row = predictions.loc[predictions["participant_id"] == participant_id]
        if not row.empty:
            row = row.iloc[0]
            out["true"] = float(row[col["true"]])
            out["predicted"] = float(row[col["predicted"]])
            out["gap"] = float(row.get(col["gap"], out["predicted"] - out["true"]))
            if col["gap_corrected"] in row:
                out["gap_corrected"] = float(row[col["gap_corrected"]])
            out["split"] = row.get("split")
    if loadings is not None:
        row = loadings.loc[loadings["participant_id"] == participant_id]
        if not row.empty:
            for col in [c for c in loadings.columns if str(c).startswith("RoI")]:
                value = float(row.iloc[0][col])
                pct = float((loadings[col] < value).mean() * 100)
                out["loadings"].append((col, f"{value:.4g}", f"{pct:.0f}"))
    return out
