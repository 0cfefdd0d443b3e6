"""Registration QC figure: the map's contours over the template.

One SVG per subject (``sub-X/figures/``), drawn with nilearn: axial slices of the
template T1 with the template brain outline (green) and the subject's map outline (red).
A misregistered map shows as red contours that do not follow the green ones.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..utils.io import atomic_path


def registration_figure(
    map_img, template, out_path: str | os.PathLike, title: str | None = None
) -> Path:
    """Draw the registration QC figure and write it atomically as SVG.

    Parameters
    ----------
    map_img : nibabel.Nifti1Image
        The map on the template grid (before intensity normalisation is fine: only its
        support is drawn).
    template : brainage_xai.imaging.templates.Template
        The template; its T1 is the background and its brain mask the reference outline.
    out_path : path-like
        Destination ``.svg``.
    title : str, optional
        Title drawn on the figure.

    Returns
    -------
    Path
        ``out_path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from nilearn import plotting

    data = np.asarray(map_img.dataobj, dtype=np.float32)
    positive = data[data > 0]
    level = 0.2 * float(np.percentile(positive, 99)) if positive.size else 0.5
    fig = plt.figure(figsize=(12, 2.6), facecolor="black")
    with warnings.catch_warnings():
        # nilearn warns about empty contour levels on edge slices; they are harmless.
        warnings.simplefilter("ignore")
        display = plotting.plot_anat(
            template.t1,
            display_mode="z",
            cut_coords=[-40, -20, -5, 10, 25, 40, 55],
            figure=fig,
            title=title,
            annotate=True,
            draw_cross=False,
            dim=-0.5,
        )
        display.add_contours(template.mask, levels=[0.5], colors="lime", linewidths=0.8)
        display.add_contours(map_img, levels=[level], colors="red", linewidths=0.8)
        # No date and a fixed salt for the SVG's ids: the same run gives the same file.
        with atomic_path(out_path, suffix=".svg") as tmp, matplotlib.rc_context({"svg.hashsalt": "brainage-xai"}):
            display.savefig(str(tmp), metadata={"Date": None})
        display.close()
    plt.close(fig)
    return Path(out_path)
