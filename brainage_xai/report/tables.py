"""Tables for people: readable column names and numbers, and the RoI table in two parts.

A volume reads ``18,880 mm³``, a correlation two decimals, a share a percentage, a
boolean yes or no; an RoI left empty by thresholding is said to be empty instead of being
shown with the peak of an all-zero map (a corner of the grid).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Column names of the group folder's tables, as the report says them.
COLUMN_NAMES = {
    "name": "RoI", "roi": "RoI", "region": "region (most of it)", "overlap": "atlas regions",
    "fraction_in_atlas": "inside the atlas", "atlas": "atlas", "volume_mm3": "volume", "cv_r2": "{target} share",
    "target_related": "follows {target}", "input_region": "loading comes from",
    "input_overlap": "back-projection's atlas regions", "agreement": "agreement with back-projection",
    "stability": "stability", "spread": "spread", "robust": "robust",
    "networks_with_roi": "networks with it", "networks_relying": "networks relying on it",
    "networks": "networks", "relation": "relation", "pearson_r": "Pearson r", "slope": "slope",
    "breakpoint": "breakpoint", "cv_rmse_linear": "RMSE, line", "cv_rmse_piecewise": "RMSE, broken line",
    "cv_rmse_smooth": "RMSE, spline", "coefficient": "linear-model weight",
    "correlation_with_gradcam": "correlation with GradCAM", "val_mae": "validation MAE",
    "network_val_mae": "network's validation MAE", "ratio": "ratio", "status": "status",
    "voxels": "voxels", "null_voxels": "blob voxels", "mae_baseline": "MAE intact",
    "mae_occluded": "MAE occluded", "mae_increase": "MAE increase", "null_mean": "blobs' mean increase",
    "null_p95": "blobs' 95th percentile", "p_value": "p", "above_null": "relied on",
}
_PERCENT = ("cv_r2", "fraction_in_atlas", "stability", "share")
_TWO_DECIMALS = ("agreement", "pearson_r", "spread", "correlation", "mae", "mse", "rmse", "ratio",
                 "p_value", "null_")
#: Columns of ``rois.tsv`` the report shows in its main RoI table (the rest are in a
#: collapsed table under it).
ROI_MAIN = ("name", "region", "peak", "volume_mm3", "cv_r2", "target_related", "stability",
            "networks_relying", "input_region", "agreement")


def number(value: float) -> str:
    """A number for reading: thousands separated, no exponent for ordinary sizes."""
    if not np.isfinite(value):
        return "n/a"
    if value != 0 and abs(value) < 1e-3:
        return f"{value:.2e}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def cell(column: str, value) -> str:
    """One value of ``column`` as the report shows it."""
    col = str(column).lower()
    if isinstance(value, (bool, np.bool_)) or str(value) in ("True", "False", "true", "false"):
        return "yes" if str(value).lower() == "true" else "no"
    if value is None or (isinstance(value, str) and value in ("", "nan", "n/a")):
        return "n/a"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return f"{value:,}" if "mm3" not in col else f"{value:,}\u00a0mm³"
    if not isinstance(value, (float, np.floating)):
        return str(value)
    value = float(value)
    if not np.isfinite(value):
        return "n/a"
    if "mm3" in col:
        return f"{value:,.0f}\u00a0mm³"
    if col.startswith("peak_"):
        return f"{value:.0f}"
    if any(key in col for key in _PERCENT):
        return f"{100 * value:.0f}\u00a0%"
    if any(key in col for key in _TWO_DECIMALS):
        return f"{value:.2f}".replace("-0.00", "0.00")
    return number(value)


def records(table, target: str = "age", rename: bool = True) -> dict | None:
    """A table as ``{"columns": [...], "rows": [[...]]}``, numbers and names for people."""
    if table is None:
        return None
    df = pd.DataFrame(table)
    columns = [COLUMN_NAMES[str(c)].format(target=target) if rename and str(c) in COLUMN_NAMES else str(c)
               for c in df.columns]
    rows = [[cell(c, v) for c, v in zip(df.columns, row)] for row in df.itertuples(index=False)]
    return {"columns": columns, "rows": rows}


def empty_rois(rois_table) -> set[str]:
    """The RoIs that are empty after thresholding (no voxel: the peak is meaningless)."""
    if rois_table is None or "volume_mm3" not in rois_table:
        return set()
    df = pd.DataFrame(rois_table)
    volume = pd.to_numeric(df["volume_mm3"], errors="coerce").fillna(0)
    return set(df.loc[volume <= 0, "name"].astype(str))


def roi_tables(rois_table, target: str = "age") -> tuple[dict | None, dict | None]:
    """``rois.tsv`` as the report's main RoI table and the table of every column.

    The main table has the columns a reader needs (:data:`ROI_MAIN`, the peak as one
    ``x, y, z`` cell); an empty RoI reads "empty after thresholding" in place of its region
    and peak.
    """
    if rois_table is None:
        return None, None
    df = pd.DataFrame(rois_table).copy()
    empty = empty_rois(df)
    if {"peak_x", "peak_y", "peak_z"} <= set(df.columns):
        df["peak"] = [f"{x:.0f},\u00a0{y:.0f},\u00a0{z:.0f}" for x, y, z in zip(df["peak_x"], df["peak_y"], df["peak_z"])]
    full = df.drop(columns=["peak"], errors="ignore")
    if "networks_relying" in df and "networks" in df:
        df["networks_relying"] = [f"{int(a)} of {int(b)}" for a, b in zip(df["networks_relying"], df["networks"])]
    main = df[[c for c in ROI_MAIN if c in df]].copy()
    for frame in (main, full):
        names = frame["name"].astype(str)
        for col in ("region", "peak", "input_region", "overlap"):
            if col in frame:
                frame[col] = frame[col].astype(object)
                frame.loc[names.isin(empty), col] = "empty after thresholding"
        for col in ("peak_x", "peak_y", "peak_z"):
            if col in frame:
                frame[col] = frame[col].astype(object)
                frame.loc[names.isin(empty), col] = "n/a"
    out = records(main, target)
    if "peak" in main:
        out["columns"][list(main.columns).index("peak")] = "peak (x, y, z mm)"
    return out, records(full, target)
