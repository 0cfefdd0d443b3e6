"""The per-subject page ``sub-X.html``: the participant level's map and QC, and the group
level's section (predicted age, gap, the subject's RoI loadings) once it has run."""

from __future__ import annotations

import os

import pandas as pd

from ..bids import derivatives as deriv
from ..bids.derivatives import prediction_columns
from . import render
from .methods import INTERPOLATION, preprocessing_methods


def subject_page(config, subject: str, template, meta: dict, group: dict | None = None) -> str:
    """The HTML of ``sub-X.html`` from the map's sidecar ``meta``.

    Parameters
    ----------
    config : brainage_xai.config.Config
    subject : str
        Label without ``sub-``.
    template : brainage_xai.imaging.templates.Template
        The template on the model grid.
    meta : dict
        The preprocessed map's JSON sidecar (as :func:`process_subject` writes it), so
        the group level can render the page again without redoing the subject.
    group : dict, optional
        The group level's section (:func:`subject_rois`):
        predicted age, gap and the subject's RoI loadings.
    """
    out_dir = config.output_dir
    out_path = deriv.preproc_path(out_dir, subject, config.map, config.resolution, template.name)
    figure = deriv.qc_figure_path(out_dir, subject, config.map, config.resolution, template.name)
    report = deriv.report_path(out_dir, subject)
    return render(
        "subject.html",
        subject=subject,
        map_name=config.map,
        source=meta["Sources"][0],
        template=template,
        resolution=config.resolution,
        grid_shape=list(template.shape),
        qc=meta["RegistrationQC"],
        normalisation=meta["IntensityNormalization"],
        interpolation=meta.get("Interpolation", INTERPOLATION),
        figure=os.path.relpath(figure, report.parent),
        outputs={
            "map": os.path.relpath(out_path, out_dir),
            "sidecar": os.path.relpath(deriv.sidecar_path(out_path), out_dir),
            "activations": None,
        },
        group_rois=group,
        preprocessing=preprocessing_methods(config, template)[0],
    )


def subject_rois(participant_id: str, predictions: pd.DataFrame | None,
                 loadings: pd.DataFrame | None, target: str = "age", report_href: str | None = None) -> dict:
    """Context for the per-subject RoI partial (``group_subject_rois.html``).

    Parameters
    ----------
    participant_id : str
        ``sub-X``.
    predictions : DataFrame, optional
        ``predictions.tsv`` (columns named by :func:`brainage_xai.bids.derivatives.prediction_columns`).
    loadings : DataFrame, optional
        ``participant_id`` and one ``RoI <r>`` column per RoI, all subjects.
    target : str
    report_href : str, optional
        The group report, relative to the subject page (the page links to it).

    Returns
    -------
    dict
        ``predicted``, ``true``, ``gap``, ``gap_corrected`` (when in the table), ``split``
        and ``loadings`` (list of ``(roi, value, percentile among all subjects)``).
    """
    col = prediction_columns(target)
    out: dict = {"participant_id": participant_id, "target": target, "loadings": [], "report_href": report_href}
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
