"""Every figure of the outputs and the report (matplotlib and nilearn, no display needed).

Plots take plain tables and arrays: a stage draws the figure of the numbers it made into
``group/figures/`` (predictions, scree, sweeps, loadings), and the report embeds those
files and draws the brain views from the images (:mod:`brainage_xai.report.group`).
``matplotlib.figure.Figure`` is used directly rather than ``pyplot`` where possible so
that no GUI backend is ever touched and figures are freed as soon as they are saved.
"""

from __future__ import annotations

import base64
import io
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..bids.derivatives import prediction_columns, roi_names
from ..utils.io import atomic_path

_MODE_NAMES = {1: "by subjects", 2: "by channels", 3: "by voxels"}


def _save(fig, path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    return path


def plot_scree(scree: pd.DataFrame, path, choice: dict | None = None) -> Path:
    """Singular values per unfolding on a log scale, the chosen ranks marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.4), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, mode in zip(axes, (1, 2, 3)):
        sub = scree.loc[scree["mode"] == mode].sort_values("index")
        ax.semilogy(sub["index"], sub["singular_value"], "o-", ms=3)
        ax.set_title(_MODE_NAMES[mode], fontsize=10)
        ax.set_xlabel("index")
        if choice is not None:
            r = choice["R2"] if mode == 2 else choice["R1"]
            ax.axvline(r + 0.5, color="C3", ls="--", lw=1, label=f"{'R2' if mode == 2 else 'R1'} = {r}")
            ax.legend(fontsize=8)
    axes[0].set_ylabel("singular value")
    fig.suptitle("Scree of the training activations", fontsize=11)
    return _save(fig, path)


def plot_rank_sweep(sweep: pd.DataFrame, path, choice: dict | None = None) -> Path:
    """Validation error heat map over (R1, R2) and error curves, the chosen rank marked."""
    from matplotlib.figure import Figure

    r1s = np.sort(sweep["R1"].unique())
    r2s = np.sort(sweep["R2"].unique())
    grid = np.full((r1s.size, r2s.size), np.nan)
    pos1 = {r: i for i, r in enumerate(r1s)}
    pos2 = {r: j for j, r in enumerate(r2s)}
    for rec in sweep.itertuples():
        grid[pos1[rec.R1], pos2[rec.R2]] = rec.val_error

    fig = Figure(figsize=(13, 4), layout="constrained")
    ax0, ax1, ax2 = fig.subplots(1, 3)
    im = ax0.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    ax0.set_xticks(range(r2s.size), [str(r) for r in r2s], fontsize=7)
    ax0.set_yticks(range(r1s.size), [str(r) for r in r1s], fontsize=7)
    ax0.set_xlabel("R2")
    ax0.set_ylabel("R1")
    ax0.set_title("validation error (R2 ≥ R1: shared optimum)", fontsize=9)
    fig.colorbar(im, ax=ax0, label="relative error")
    if choice is not None and choice["R1"] in pos1 and choice["R2"] in pos2:
        ax0.plot(pos2[choice["R2"]], pos1[choice["R1"]], "r*", ms=12)

    best = sweep.loc[sweep.groupby("R1")["val_error"].idxmin()]
    ax1.plot(best["R1"], best["train_error"], "o-", ms=3, label="train")
    ax1.plot(best["R1"], best["val_error"], "s-", ms=3, label="validation")
    ax1.set_xlabel("R1 (best R2)")
    ax1.set_ylabel("relative error")
    if choice is not None:
        r1 = choice["R1"]
        ax1.axvline(r1, color="C3", ls="--", lw=1, label=f"R1 = {r1}")
        at = sweep.loc[sweep["R1"] == r1].sort_values("R2")
        ax2.plot(at["R2"], at["train_error"], "o-", ms=3, label="train")
        ax2.plot(at["R2"], at["val_error"], "s-", ms=3, label="validation")
        ax2.axvline(choice["R2"], color="C3", ls="--", lw=1, label=f"R2 = {choice['R2']}")
        ax2.set_xlabel(f"R2 at R1 = {r1}")
        ax2.set_ylabel("relative error")
        handles, labels = ax2.get_legend_handles_labels()
        if "val_mae" in at and at["val_mae"].notna().all():
            # R2 is chosen among equally good candidates by this curve (choose_ranks).
            mae_ax = ax2.twinx()
            (line,) = mae_ax.plot(at["R2"], at["val_mae"], "^:", color="C2", ms=3)
            mae_ax.set_ylabel("validation MAE, linear model")
            handles.append(line)
            labels.append("validation MAE")
        ax2.legend(handles, labels, fontsize=8)
    else:
        ax2.set_axis_off()
    ax1.legend(fontsize=8)
    return _save(fig, path)


def plot_lambda_sweep(table: pd.DataFrame, path, choice: dict | None = None) -> Path:
    """Train/validation MAE and U3 sparsity against λ (symlog x so that λ = 0 shows)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.6), layout="constrained")
    ax = fig.subplots()
    t = table.sort_values("lambda")
    ax.plot(t["lambda"], t["train_mae"], "o-", ms=3, label="train MAE")
    ax.plot(t["lambda"], t["val_mae"], "s-", ms=3, label="validation MAE")
    positive = t["lambda"][t["lambda"] > 0]
    ax.set_xscale("symlog", linthresh=float(positive.min()) if len(positive) else 1.0)
    ax.set_xlabel("λ (ℓ1 penalty on the spatial maps)")
    ax.set_ylabel("MAE")
    ax2 = ax.twinx()
    ax2.plot(t["lambda"], t["sparsity"], "^:", color="C2", ms=3, label="sparsity of the spatial maps")
    ax2.set_ylabel("fraction of zeros in the spatial maps")
    ax2.set_ylim(0, 1)
    if choice is not None:
        ax.axvline(choice["lambda"], color="C3", ls="--", lw=1, label=f"λ = {choice['lambda']:.3g}")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8)
    return _save(fig, path)


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


def file_uri(path) -> str:
    """A figure file (SVG or PNG) as a ``data:`` URI."""
    path = Path(path)
    mime = {".svg": "image/svg+xml", ".png": "image/png"}.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"figure {path} must be .svg or .png; got {path.suffix!r}")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def index_img(img, r):
    from nilearn.image import index_img

    return index_img(img, r)


def roi_mosaics(rois_img, background_img=None, names=None) -> list[dict]:
    """Per RoI: a glass brain and axial slices (PNG data URIs)."""
    from nilearn import plotting

    out = []
    n = rois_img.shape[3]
    names = names or roi_names(n)
    for r in range(n):
        vol = index_img(rois_img, r)
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


#: Where :func:`roi_viewer`'s page takes each RoI's data.
VIEWER_SLOTS = ("@@PARAMS@@", "@@OVERLAY@@", "@@COLORMAP@@")


def roi_viewer(rois_img, background_img=None, names=None) -> dict | None:
    """One interactive viewer (nilearn's ``view_img`` page) for all RoIs of a 4D image.

    The background is drawn once; each RoI contributes its overlay sprite, colour map and
    viewer parameters. Returns ``{"page": the page with the first RoI (for an
    ``iframe srcdoc``), "template": the page with :data:`VIEWER_SLOTS` in place of the
    RoI's data, "rois": [{"name", "params", "overlay", "colormap"}]}``; the report's
    RoI selector fills the template with another RoI's data. The page's favicon link (a
    remote URL) is dropped: the report makes no request. ``None`` without RoIs.
    """
    import json

    from nilearn.plotting import view_img
    from nilearn.plotting.html_stat_map import create_brainsprite

    n = rois_img.shape[3]
    if n == 0:
        return None
    names = names or roi_names(n)
    bg = background_img if background_img is not None else False
    rois, page, uid = [], None, None
    for r in range(n):
        vol = index_img(rois_img, r)
        data = np.asarray(vol.dataobj, dtype=float)
        peak = float(np.max(np.abs(data))) if data.size else 0.0
        kw = dict(bg_img=bg, threshold=0.2 * peak if peak > 0 else None, cmap="hot",
                  symmetric_cmap=False, title=names[r], black_bg=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if page is None:
                page = view_img(vol, **kw).get_standalone()
                uid = re.search(r"div_viewer-([0-9a-f]+)", page).group(1)
            view = create_brainsprite(vol, unique_id=uid, **kw)
        rois.append({"name": names[r], "params": json.dumps(view["params"]),
                     "overlay": view["stat_map_base64"], "colormap": view["cm_base64"]})
    page = re.sub(r"<link[^>]*rel=\"?(shortcut )?icon\"?[^>]*>", "", page)
    template = page
    for slot, key in zip(VIEWER_SLOTS, ("params", "overlay", "colormap")):
        if template.count(rois[0][key]) != 1:  # not the page this code knows: one RoI only
            return {"page": page, "template": None, "rois": rois[:1]}
        template = template.replace(rois[0][key], slot)
    return {"page": page, "template": template, "rois": rois}


def plot_predictions(table: pd.DataFrame, target: str, metrics: dict, path: Path) -> Path:
    """Scatter of predicted against true ``target``, one panel per split (SVG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = prediction_columns(target)
    true, pred = table[col["true"]], table[col["predicted"]]
    lo, hi = float(min(true.min(), pred.min())), float(max(true.max(), pred.max()))
    pad = 0.05 * (hi - lo or 1.0)
    splits = [s for s in ("train", "val", "test") if (table["split"] == s).any()]
    fig, axes = plt.subplots(1, len(splits), figsize=(3.6 * len(splits), 3.6), sharex=True, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, splits):
        rows = table["split"] == name
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=1, zorder=0)
        ax.scatter(true[rows], pred[rows], s=12, alpha=0.8)
        m = metrics["metrics"][target][name]
        ax.set_title(f"{name} (n={m['n']})\nMAE {m['mae']:.2f}, r {m['r']:.2f}", fontsize=9)
        ax.set_xlabel(f"true {target}")
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
    axes[0].set_ylabel(f"predicted {target}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="svg")
    plt.close(fig)
    return Path(path)


def plot_occlusion(table: pd.DataFrame, null: pd.DataFrame, *, unit: str = "years"):
    """Each RoI's MAE increase (red) over its random-blob null (grey dots, 95th pct bar).

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3.5, 0.9 * len(table) + 1.5), 3.2))
    rng = np.random.default_rng(0)
    for i, row in enumerate(table.itertuples()):
        vals = null.loc[null["roi"] == row.roi, "mae_increase"].to_numpy()
        ax.scatter(i + rng.uniform(-0.18, 0.18, vals.size), vals, s=9, color="0.6",
                   label="random blobs" if i == 0 else None)
        ax.hlines(row.null_p95, i - 0.3, i + 0.3, color="0.3", lw=1.2,
                  label="95th percentile" if i == 0 else None)
        ax.scatter([i], [row.mae_increase], s=45, marker="D",
                   color="#c44e52" if row.above_null else "#4c72b0",
                   label="RoI occluded" if i == 0 else None, zorder=3)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(table)), [str(r) for r in table["roi"]], rotation=30, ha="right")
    ax.set_ylabel(f"test MAE increase ({unit})")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def plot_loadings(loadings: pd.DataFrame, age, curves: dict, split=None, *, target: str = "age"):
    """Scatter of each RoI's loadings against the target, with the fitted curves.

    Parameters
    ----------
    loadings : DataFrame
        One column per RoI named in ``curves``.
    age : array-like
        The target of each row.
    curves : dict
        Per RoI column: ``relation`` and the curves ``linear``, ``smooth`` (and
        ``piecewise``) evaluated on ``grid`` (:func:`brainage_xai.explain.loadings.trajectory_curves`).
    split : array-like, optional
        Subjects are coloured by it (train / validation / test).

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _plt()
    roi_columns = [c for c in curves if c != "grid"]
    grid = np.asarray(curves["grid"], dtype=float)
    x = np.asarray(age, dtype=float)
    n = len(roi_columns)
    ncols = min(n, 4)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    colours = {"train": "#4c72b0", "val": "#dd8452", "validation": "#dd8452", "test": "#55a868"}
    for ax, col in zip(axes.ravel(), roi_columns):
        y = loadings[col].to_numpy(dtype=float)
        if split is None:
            ax.scatter(x, y, s=8, color="#4c72b0", alpha=0.7)
        else:
            split_arr = np.asarray(split)
            for name in pd.unique(split_arr):
                sel = split_arr == name
                ax.scatter(x[sel], y[sel], s=8, alpha=0.7, label=str(name),
                           color=colours.get(str(name)))
        fit = curves[col]
        ax.plot(grid, fit["linear"], color="k", lw=1.2, label="linear")
        ax.plot(grid, fit["smooth"], color="#c44e52", lw=1.5, label="smooth")
        if fit["relation"] == "piecewise-linear":
            ax.plot(grid, fit["piecewise"], color="#8172b2", lw=1.2, ls="--", label="piecewise")
        ax.set_title(f"{col}: {fit['relation']}", fontsize=9)
        ax.set_xlabel(target)
        ax.set_ylabel("loading")
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    axes.ravel()[0].legend(fontsize=6, frameon=False)
    fig.tight_layout()
    return fig


def save_figure(fig, path) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix) atomically and close it."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_consensus(cells, networks: list[str], path) -> Path:
    """The consensus RoIs (first column) beside each network's own RoI matched to them.

    Parameters
    ----------
    cells : list of rows
        Per consensus RoI: ``(projection, title)`` for the consensus and then for each
        network, a 2D image (a maximum-intensity projection) or ``None`` where the
        network's own decomposition has no component matched to the RoI.
    networks : list of str
        Column headings after "consensus".
    path : path
        PNG to write.
    """
    from matplotlib.figure import Figure

    n_rows, n_cols = len(cells), len(networks) + 1
    fig = Figure(figsize=(1.7 * n_cols, 1.9 * max(n_rows, 1)))
    axes = fig.subplots(max(n_rows, 1), n_cols, squeeze=False)
    for i, row in enumerate(cells):
        for j, (image, title) in enumerate(row):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if image is not None:
                ax.imshow(np.rot90(image), cmap="hot", interpolation="nearest")
            else:
                ax.set_facecolor("0.92")
            ax.set_title(title, fontsize=7)
            if i == 0:
                ax.set_xlabel("consensus" if j == 0 else networks[j - 1], fontsize=8)
                ax.xaxis.set_label_position("top")
    fig.tight_layout()
    return _save(fig, path)
